"""`zerostack deploy | approve | status | cancel`: the user's side of a smart contract."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from zerostack.cli.identity import load_named
from zerostack.cli.output import console, fail, print_json, print_table, styled

if TYPE_CHECKING:
    from zerostack.bot import ThreeBot

# zerostack.bot (pydantic models, the ledger client) is imported inside the commands: every other
# `zerostack` command starts faster without it.

LEDGER = typer.Option("http://127.0.0.1:7700", "--ledger", envvar="ZEROSTACK_LEDGER",
                      help="Ledger URL.")
IDENTITY = typer.Option("default", "--identity", "-i", envvar="ZEROSTACK_IDENTITY",
                        help="Identity name (see `zerostack id`).")
JSON = typer.Option(False, "--json", help="Print JSON.")
LEDGER_KEY = typer.Option(None, "--ledger-key", envvar="ZEROSTACK_LEDGER_KEY",
                          help="The ledger operator's public key (hex); default: learnt on "
                               "first contact and pinned in $ZEROSTACK_HOME/ledgers.")


@contextmanager
def _session(ledger: str, identity: str, ledger_key: str | None) -> Iterator[ThreeBot]:
    """The bot for one command, on a ledger that extends the last header this user saw;
    a BotError (or a refused ledger) becomes the command's one-line failure."""
    from zerostack.bot import BotError, ThreeBot
    from zerostack.cli.identity import zerostack_home
    from zerostack.crypto import CryptoError, KeyPins
    from zerostack.ledger import LedgerError
    from zerostack.ledger.pin import HeaderPin, pin_path

    try:
        head = pin_path(zerostack_home(), ledger)
        pin = HeaderPin(head, ledger_key)
        pins = KeyPins(head.with_name(head.stem + ".keys.json"))
        with ThreeBot(ledger, load_named(identity), pins=pins, pin=pin) as bot:
            bot.check_ledger()
            yield bot
    except (BotError, CryptoError, LedgerError) as exc:
        fail(str(exc))


def _summary(c: dict[str, Any]) -> str:
    from zerostack.bot import quorum_progress

    report = c.get("report") or {}
    ws = report.get("workloads") or []
    done = sum(1 for w in ws if w["state"] in ("ok", "deleted"))
    if c["state"] == "created":
        return f"waiting for approvals: {quorum_progress(c)}"
    if c["state"] == "approved" and not ws:
        return "approved: waiting for the node"
    return f"{c['state']}: {done}/{len(ws)} workloads ready" if ws else c["state"]


def _settled(c: dict[str, Any], version: int) -> bool:
    """The node has reported on this version: every workload ok, or an error."""
    report = c.get("report") or {}
    if c["state"] in ("error", "deleted", "expired"):
        return True
    return c["state"] == "deployed" and int(report.get("version", 0)) >= version


def _print_result(bot: ThreeBot, c: dict[str, Any]) -> None:
    report = c.get("report") or {}
    if report.get("error"):
        console.print(styled(("node error:", "bold red"), " ", report["error"]), highlight=False)
    rows = []
    for w in report.get("workloads", []):
        rows.append((w["name"], w["type"], w["state"], w.get("message", ""),
                     ", ".join(f"{k}={v}" for k, v in sorted(w.get("data", {}).items()))))
    if rows:
        print_table(f"contract {c['id']} ({c['state']})",
                    ["workload", "type", "state", "message", "result"], rows)
    for w in report.get("workloads", []):
        d = w.get("data", {})
        if w["type"] == "zdb" and w["state"] == "ok":
            console.print(styled("connect to ", (w["name"], "bold"),
                                 f": redis-cli -h {d['host']} -p {d['port']}  then  "
                                 f"SELECT {d['namespace']} <password>"), highlight=False)


def _json_contract(bot: ThreeBot, c: dict[str, Any]) -> dict[str, Any]:
    out = dict(c)
    out.pop("instructions", None)
    if out.get("active"):
        out["active"] = {k: v for k, v in out["active"].items() if k != "instructions"}
    report = out.get("report")
    if report and any(w.get("sealed") for w in report["workloads"]):
        from zerostack.bot import BotError

        try:
            mine = int(c["owner"]) == bot.twin_id(register=False)
        except BotError:
            mine = False
        for w in report["workloads"]:
            if mine and w.get("sealed"):
                w["secret"] = bot.open_secret(w["sealed"])
    return out


def deploy(
    target: str = typer.Argument(..., metavar="FILE|TEMPLATE",
                                 help="Deployment YAML (workloads, optional metadata), or a "
                                      "template: a published name or hash, or a template "
                                      "YAML file."),
    param: list[str] = typer.Option([], "--param", "-p",
                                    help="Template parameter KEY=VALUE (repeatable)."),
    node: int | None = typer.Option(None, "--node", help="Node id (default: one with room)."),
    stakeholder: list[str] = typer.Option([], "--stakeholder",
                                          help="TWIN:WEIGHT[:required] (repeatable); for a "
                                               "template ROLE=TWIN."),
    weight_required: int | None = typer.Option(None, "--weight-required",
                                               help="Approval weight the quorum needs."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the node (0: none)."),
    update: int | None = typer.Option(None, "--update", metavar="CONTRACT",
                                      help="Deploy FILE as the next version of CONTRACT."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the node(s) it would go to "
                                 "and what it would cost per hour and month (a template: "
                                 "its whole plan); deploy nothing."),
    max_cost: int | None = typer.Option(None, "--max-cost", min=1, help="The most it may "
                                        "cost per month, in base units (also `max_cost:` in "
                                        "the file): the cheapest node within it is chosen."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Deploy workloads to a node under a signed contract, and wait for the node's report
    (without --node, the cheapest node that is up and has room is chosen); or deploy a
    template (-p KEY=VALUE, --stakeholder ROLE=TWIN) as a solution of one contract per node."""
    from zerostack.bot import load_deployment_file, quorum_progress

    file = Path(target)
    if param or _is_template(file):
        from zerostack.cli.templates import deploy_template

        deploy_template(target, param, stakeholder, dry_run, wait, ledger, identity, json_out,
                        ledger_key)
        return
    with _session(ledger, identity, ledger_key) as bot:
        data, cap = _max_cost(load_deployment_file(file), max_cost)
        if dry_run:
            _dry_run(bot, data, node, cap, file.name, json_out)
            return
        if update is None and node is not None and cap is not None:
            _within(bot, data, node, cap)
        if update is not None:
            version = int(bot.contract(update)["version"]) + 1
            dep = bot.build(data, stakeholder, weight_required, version)
            bot.update(update, dep)
            cid = update
        else:
            dep = bot.build(data, stakeholder, weight_required)
            cid = bot.deploy(dep, node, max_cost=cap)
        c = bot.contract(cid)
        if not json_out:
            console.print(styled("contract ", (cid, "bold"), f" on node {c['node']}, "
                                 f"deployment {dep.hash()[:16]}…"), highlight=False)
        if c["pending"]:
            if json_out:
                print_json(_json_contract(bot, c))
            else:
                console.print(f"{quorum_progress(c)}; each stakeholder runs "
                              f"`zerostack approve {cid} -i NAME`", highlight=False)
            return
        if wait <= 0:
            return
        with console.status("waiting for the node…") as spinner:
            c = bot.wait(cid, lambda c: _settled(c, dep.version), wait,
                         lambda c: spinner.update(_summary(c)))
        if json_out:
            print_json(_json_contract(bot, c))
        else:
            _print_result(bot, c)
        if c["state"] == "error":
            raise typer.Exit(1)


def _max_cost(data: dict[str, Any], option: int | None) -> tuple[dict[str, Any], int | None]:
    """The file without its `max_cost`, and the monthly cap: the lower of the file's and
    the option's."""
    data = dict(data)
    raw = data.pop("max_cost", None)
    if raw is not None and (type(raw) is not int or raw < 1):
        fail(f"max_cost in the file must be a whole number of base units, at least 1; got "
             f"{str(raw)[:40]!r}")
    caps = [c for c in (raw, option) if c is not None]
    return data, min(caps) if caps else None


def _node_prices(bot: ThreeBot, node: int) -> dict[str, int]:
    found = bot.ledger.node_prices(node)
    if found is None:
        fail(f"node {node} does not exist")
    return found["prices"] or {}


def _within(bot: ThreeBot, data: dict[str, Any], node: int, cap: int) -> None:
    from zerostack.cli.billing import price_of

    month = price_of(data, _node_prices(bot, node))["total_per_month"]
    if month > cap:
        fail(f"on node {node} this deployment costs {month} per month, above max_cost {cap}")


def _dry_run(bot: ThreeBot, data: dict[str, Any], node: int | None, cap: int | None,
             name: str, json_out: bool) -> None:
    """Where the deployment would go and what it would cost there; nothing is signed."""
    from zerostack.cli.billing import HOURS_PER_MONTH, price_of
    from zerostack.ledger.pricing import RESERVED

    units = price_of(data, {})["units"]
    offers = bot.offers(units, cap)
    if node is None:
        if not offers:
            within = "" if cap is None else f" within max_cost {cap} per month"
            fail(f"no node that is up has enough free capacity{within}")
        node = offers[0].node
    result = price_of(data, _node_prices(bot, node))
    result.update(node=node, max_cost=cap, dry_run=True,
                  alternatives=[{"node": o.node, "farm": o.farm, "per_hour": o.per_hour,
                                 "per_month": o.per_month} for o in offers[:5]])
    if cap is not None and result["total_per_month"] > cap:
        fail(f"on node {node} this deployment costs {result['total_per_month']} per month, "
             f"above max_cost {cap}")
    if json_out:
        print_json(result)
        return
    print_table(f"dry run: {name} on node {node}",
                ["resource", "units", "price per unit-hour", "per hour", "per month"],
                [[r, result["units"][r], result["prices"][r], result["per_hour"][r],
                  result["per_month"][r]] for r in RESERVED])
    console.print(f"total: {result['total_per_hour']} per hour, {result['total_per_month']} "
                  f"per month ({HOURS_PER_MONTH} h), plus {result['traffic_per_gib']} per GiB "
                  "of traffic; nothing was deployed", highlight=False)


def _is_template(path: Path) -> bool:
    """A template target: not a file here (a published name or hash), or a YAML file
    whose top level has `parts:` (a deployment file has `workloads:`)."""
    if not path.is_file():
        return path.suffix not in (".yaml", ".yml", ".json")
    try:
        with open(path, "rb") as f:
            head = f.read(256 * 1024)
    except OSError:
        return False
    return any(line.startswith(b"parts:") for line in head.splitlines())


def _show_review(summary: dict[str, Any]) -> None:
    """What a stakeholder is asked to sign, readable (every value is outside text: the
    console prints it as plain text, control characters spelled out)."""

    def line(text: str) -> None:
        console.print(text, highlight=False)

    line(f"contract {summary['contract']} version {summary['version']} on node "
         f"{summary['node']}, owned by twin {summary['owner']['twin']}")
    if summary["description"] or summary["metadata"]:
        line(f"  {summary['description'] or summary['metadata']}")
    for w in summary["workloads"]:
        extra = ", ".join(f"{k}={v}" for k, v in w.items() if k not in ("name", "type")
                          and v not in (None, [], ""))
        line(f"  {w['type']} {w['name']}: {extra}")
    r = summary["resources"]
    line(f"  resources: {r['cpu']} CPU, {r['memory']} memory, {r['ssd']} SSD, {r['hdd']} HDD")
    signed = set(summary["approved_by"])
    for s in summary["signers"]:
        mark = "signed" if s["twin"] in signed else "not yet signed"
        line(f"  signer twin {s['twin']} (key {s['key'][:16]}…) weight {s['weight']}"
             f"{', required' if s['required'] else ''}: {mark}")
    line(f"  quorum: weight {summary['weight_required']}; cancelling needs weight "
         f"{summary['delete_weight_required']} of twins "
         f"{', '.join(str(d['twin']) for d in summary['delete'])}")
    line(f"  deployment hash (recomputed here): {summary['hash']}")


def approve(
    contract: int = typer.Argument(..., help="Contract id."),
    expect_hash: str | None = typer.Option(None, "--hash",
                                           help="Refuse unless the deployment hash is this."),
    yes: bool = typer.Option(False, "--yes", "-y",
                             help="Sign without asking (after the same checks)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Open a contract's pending deployment, check it, show it, and approve it as a
    stakeholder: signs the hash recomputed here, for this contract, version and node."""
    from zerostack.bot import Review

    def confirm(review: Review) -> bool:
        if json_out:
            return yes
        _show_review(review.summary())
        if yes:
            return True
        if not sys.stdin.isatty():
            fail("not approved: add --yes to sign without a terminal to confirm on")
        return typer.confirm("sign this deployment?", default=False)

    with _session(ledger, identity, ledger_key) as bot:
        if json_out and not yes:
            print_json(bot.review(contract).summary())
            fail("not approved: --json shows what you would sign; add --yes to sign it")
        receipt = bot.approve(contract, expect_hash, confirm)
        c = bot.contract(contract)
        if json_out:
            print_json({"receipt": receipt, "state": c["state"]})
        else:
            console.print(f"approved contract {contract}: {_summary(c)}", highlight=False)


def status(
    contract: int | None = typer.Argument(None, help="Contract id (default: all of yours)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Show one contract (workloads and results) or all contracts you own."""
    with _session(ledger, identity, ledger_key) as bot:
        if contract is not None:
            c = bot.contract(contract)
            if json_out:
                print_json(_json_contract(bot, c))
                return
            console.print(f"contract {c['id']} on node {c['node']}: {_summary(c)}",
                          highlight=False)
            _print_result(bot, c)
            return
        cs = bot.contracts()
        if json_out:
            print_json([_json_contract(bot, c) for c in cs])
            return
        print_table("contracts", ["id", "node", "version", "state", "summary"],
                    [(c["id"], c["node"], c["version"], c["state"], _summary(c))
                     for c in cs])


def cancel(
    contract: int = typer.Argument(..., help="Contract id."),
    wait: float = typer.Option(60.0, "--wait", help="Seconds to wait for removal (0: none)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Vote to cancel a contract; once the delete quorum holds, the node checks the votes
    itself, removes the workloads and reports them deleted."""
    with _session(ledger, identity, ledger_key) as bot:
        bot.cancel(contract)
        c = bot.contract(contract)
        if wait > 0 and c["state"] == "cancelled":
            with console.status("waiting for the node to remove the workloads…"):
                c = bot.wait(contract, lambda c: c["state"] == "deleted", wait)
        if json_out:
            print_json({"contract": contract, "state": c["state"]})
        else:
            console.print(f"contract {contract} is {c['state']}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the top-level user commands to the `zerostack` app."""
    for fn in (deploy, approve, status, cancel):
        app.command(fn.__name__)(fn)
