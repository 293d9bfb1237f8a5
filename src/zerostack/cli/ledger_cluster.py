"""`zerostack ledger cluster up|init` and `zerostack ledger status`: run a ledger cluster on
this machine, and see its replicas, validators, heads and lag."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from zerostack.cli.output import console, fail, print_json, print_table

cluster_app = typer.Typer(help="A ledger cluster: etcd and several replicas.",
                          no_args_is_help=True, rich_markup_mode=None)


@cluster_app.command("up")
def up(
    directory: Path = typer.Option(..., "--dir", help="Where the cluster keeps its etcd data, "
                                   "replica files and validator keys (reused on restart)."),
    replicas: int = typer.Option(3, "--replicas", min=1, max=16, help="Ledger replicas."),
    etcd_members: int = typer.Option(3, "--etcd-members", min=1, max=7, help="etcd members."),
    name: str = typer.Option("default", "--cluster", help="The cluster's name in etcd."),
    dev_faucet: bool = typer.Option(False, "--dev-faucet", help="A development grid: anyone "
                                    "may mint money with `zerostack faucet` (fixed by the "
                                    "cluster's first pricing policy)."),
    policy_file: Path = typer.Option(None, "--policy", help="JSON pricing policy the cluster "
                                     "starts with (docs/billing.md); with --dev-faucet "
                                     "alone: the development prices."),
    json_out: bool = typer.Option(False, "--json", help="Print the cluster as JSON."),
) -> None:
    """Start an etcd cluster and ledger replicas on 127.0.0.1; stop them on Ctrl-C/SIGTERM."""
    from zerostack.cli.ledger import _policy
    from zerostack.ledger.cluster import start_cluster
    from zerostack.ledger.errors import LedgerError

    try:
        cluster = start_cluster(directory, replicas=replicas, etcd_members=etcd_members,
                                name=name, policy=_policy(policy_file, dev_faucet))
    except (LedgerError, OSError) as exc:
        fail(escape(f"cannot start the ledger cluster: {exc}"))
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if json_out:
            print_json(cluster.describe())
        else:
            console.print(f"ledger cluster {name}: {etcd_members} etcd members, {replicas} "
                          "replicas", highlight=False)
            console.print("ledger URLs: " + ",".join(cluster.urls), highlight=False)
            console.print("etcd: " + ",".join(cluster.etcd_urls), highlight=False)
        while not stopping:
            time.sleep(0.5)
            for r in cluster.replicas:
                if r.proc is not None and r.proc.poll() is not None:
                    console.print(f"replica {r.index} exited ({r.proc.returncode}); see "
                                  f"{r.dir / 'replica.log'}", highlight=False)
                    r.proc = None
    finally:
        cluster.stop()


@cluster_app.command("init")
def init(
    etcd: str = typer.Option(..., "--etcd", help="etcd URLs: http://HOST:PORT[,…]."),
    validator: list[str] = typer.Option(..., "--validator", help="A genesis validator's "
                                        "public key (hex); repeat for each."),
    name: str = typer.Option("default", "--cluster", help="The cluster's name in etcd."),
) -> None:
    """Write a new cluster's genesis (its validator set) into etcd; an existing one stays."""
    import re

    from zerostack.ledger.cluster import init_genesis
    from zerostack.ledger.errors import LedgerError

    for v in validator:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            fail(f"--validator {escape(v[:80])!r} is not a 64-hex public key")
    try:
        vals = init_genesis(etcd.split(","), name, validator, timeout=10)
    except LedgerError as exc:
        fail(escape(str(exc)))
    console.print(f"cluster {name}: {len(vals)} validators", highlight=False)


def status(
    url: str = typer.Option(None, "--ledger", help="The replicas' URLs, comma-separated "
                            "(default $ZEROSTACK_LEDGER)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Each replica's heads and lag, the validator set, and replicas that disagree."""
    from zerostack.cli.ledger import default_url

    data = cluster_status((url or default_url()).split(","))
    if json_out:
        print_json(data)
    else:
        print_table("replicas", ["url", "key", "final", "materialized", "lag", "head hash",
                                 "state"],
                    [[r["url"], (r.get("key") or "")[:16], r.get("final"),
                      r.get("materialized"), r.get("lag"), (r.get("hash") or "")[:16],
                      r["state"]] for r in data["replicas"]])
        vals = data["validators"]
        console.print(f"validators (epoch {vals.get('epoch')}, quorum {vals.get('quorum')}): "
                      + ", ".join(k[:16] for k in vals.get("validators", [])), highlight=False)
        for problem in data["problems"]:
            console.print(f"problem: {escape(problem)}", highlight=False)
    if data["problems"]:
        raise typer.Exit(1)


def cluster_status(urls: list[str]) -> dict[str, Any]:
    """What `zerostack ledger status` shows, as data: per replica its key, final and
    materialized heights, head hash and lag behind the most advanced one; the validator
    set; and the problems found (unreachable replicas, replicas whose block at a common
    height differs, validators a replica saw sign another history)."""
    from zerostack.ledger import LedgerClient, LedgerError

    rows: list[dict[str, Any]] = []
    validators: dict[str, Any] = {}
    problems: list[str] = []
    for u in urls:
        row: dict[str, Any] = {"url": u.strip()}
        try:
            with LedgerClient(u, timeout=5) as c:
                info = c._get("/cluster")
                head = c.head()
                if not validators:
                    validators = c.validators()
            row.update(key=info.get("key"), final=head["height"], hash=head["hash"],
                       materialized=info.get("materialized"), state="ok",
                       disagree=info.get("disagree") or {})
            if info.get("broken"):
                row["state"] = "stopped"
                problems.append(f"{u}: {info['broken']}")
        except LedgerError as exc:
            row.update(state="unreachable")
            problems.append(f"{u}: {exc}")
        rows.append(row)
    live = [r for r in rows if r["state"] != "unreachable"]
    top = max((r["final"] for r in live), default=0)
    for r in live:
        r["lag"] = top - r["final"]
    # every replica must hold the same block at the lowest final height among them
    if live:
        low = min(r["final"] for r in live)
        hashes: dict[str, list[str]] = {}
        for r in live:
            try:
                with LedgerClient(r["url"], timeout=5) as c:
                    h = c.header(low) if low else {"hash": "genesis"}
            except LedgerError:
                h = None
            hashes.setdefault(str((h or {}).get("hash")), []).append(r["url"])
        if len(hashes) > 1:
            problems.append(f"replicas disagree on block {low}: " + "; ".join(
                f"{h[:16]}… at {', '.join(us)}" for h, us in hashes.items()))
            for r in live:
                if len(hashes) > 1 and r["url"] in min(hashes.values(), key=len):
                    r["state"] = "forked"
        for r in live:
            for key, height in r.get("disagree", {}).items():
                problems.append(f"{r['url']} saw validator {key[:16]}… sign another block "
                                f"at height {height}")
    return {"replicas": rows, "validators": validators, "problems": problems}
