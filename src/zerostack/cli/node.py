"""`zerostack node`: run a Zero-OS node agent, and look at one (read-only)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import typer

from zerostack.cli.output import fail, print_json, print_table

app = typer.Typer(help="Run a Zero-OS node agent (no shell, no exec: contracts only).",
                  no_args_is_help=True, rich_markup_mode=None)


def _size(text: str | None, option: str) -> int | None:
    from zerostack.workloads import parse_size

    if text is None:
        return None
    try:
        return int(parse_size(text))
    except ValueError as exc:
        fail(f"{option}: {exc}")


@app.command("run")
def run(
    ledger: str = typer.Option(..., "--ledger", envvar="ZEROSTACK_LEDGER",
                               help="Ledger URL, e.g. http://127.0.0.1:7700; or the "
                                    "URLs of a ledger cluster's replicas, comma-separated "
                                    "(tried in turn)."),
    farm: int = typer.Option(..., "--farm", help="Farm id this node belongs to."),
    data: Path = typer.Option(..., "--data", help="The node's state dir (identity, state, zdb)."),
    zdb_port: int = typer.Option(9900, "--zdb-port", help="Port of the node's Zero-DB."),
    zdb_listen: str = typer.Option("127.0.0.1", "--zdb-listen",
                                   help="Address the node's Zero-DB listens on."),
    pool: list[str] = typer.Option([], "--pool", help="Storage pool NAME:PATH:ssd|hdd "
                                   "(repeatable; default: an ssd and an hdd pool in --data)."),
    cpu: int | None = typer.Option(None, "--cpu", help="Cores to offer (default: all)."),
    memory: str | None = typer.Option(None, "--memory",
                                      help="Memory to offer, e.g. 8G (default: all)."),
    country: str = typer.Option("BE", "--country", help="Location: country code."),
    city: str = typer.Option("", "--city", help="Location: city."),
    endpoint: str = typer.Option(
        "127.0.0.1", "--endpoint",
        help="Public address users reach this node's workloads on; '' for a node nothing "
             "can dial (behind NAT): its workloads are then reported at --zdb-listen."),
    status_port: int | None = typer.Option(None, "--status-port",
                                           help="Serve read-only JSON status on this port."),
    status_listen: str = typer.Option("127.0.0.1", "--status-listen",
                                      help="Address the status endpoint listens on."),
    heartbeat: float = typer.Option(10.0, "--heartbeat", help="Seconds between heartbeats."),
    resync: float = typer.Option(10.0, "--resync",
                                 help="Seconds between full reconcile/self-healing passes."),
    dry: bool = typer.Option(False, "--dry", help="Record actions only; touch nothing."),
    hub: str | None = typer.Option(None, "--hub",
                                   help="Default flist hub (Zero-DB address) for containers."),
    flist_publisher: list[str] = typer.Option(
        [], "--flist-publisher",
        help="Publisher key trusted for flists when a workload names none (repeatable)."),
    gateway_acme_email: str | None = typer.Option(
        None, "--gateway-acme-email",
        help="On a gateway node: get certificates from ACME (Let's Encrypt) with this "
             "account email; default: Caddy's internal CA (test grids)."),
    ledger_key: str | None = typer.Option(
        None, "--ledger-key", envvar="ZEROSTACK_LEDGER_KEY",
        help="The ledger operator's public key (hex); default: learnt on first contact, "
             "then pinned in --data."),
) -> None:
    """Run the node agent until interrupted."""
    from zerostack.ledger.errors import LedgerError
    from zerostack.node.agent import AgentConfig, NodeAgent
    from zerostack.node.provisioners import Pool, ProvisionError

    try:
        pools = [Pool.parse(p) for p in pool]
    except ProvisionError as exc:
        fail(str(exc))
    if not dry and os.geteuid() != 0:
        logging.getLogger("zerostack.node").warning("event=not_root volumes_need_root=true")
    cfg = AgentConfig(
        ledger_url=ledger, farm=farm, data_dir=data, zdb_port=zdb_port, zdb_listen=zdb_listen,
        pools=pools, cpu=cpu, memory=_size(memory, "--memory"), country=country, city=city,
        endpoint=endpoint, status_port=status_port, status_listen=status_listen,
        heartbeat=heartbeat, resync=resync, dry=dry,
        extra={k: v for k, v in (("hub", hub), ("flist_publishers", flist_publisher),
                                 ("gateway_acme_email", gateway_acme_email)) if v},
        ledger_key=ledger_key,
    )
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    async def serve() -> None:
        # SIGTERM stops the agent cleanly (its Zero-DB, connections, state file).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await NodeAgent(cfg).run()
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except (LedgerError, RuntimeError, OSError) as exc:
        fail(f"node agent stopped: {exc}")


@app.command("status")
def status(
    port: int = typer.Option(..., "--status-port", help="The agent's --status-port."),
    host: str = typer.Option("127.0.0.1", "--host", help="The agent's --status-listen."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a node's contracts and workloads (from its read-only status endpoint)."""
    import httpx

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        snap = httpx.get(f"http://{where}/", timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        fail(f"no node status on {where}: {exc}")
    if json_out:
        print_json(snap)
        return
    print_table(f"node {snap['node']} (twin {snap['twin']})",
                ["contract", "workload", "type", "state", "message"],
                [(w["contract"], w["name"], w["type"], w["state"], w["message"])
                 for w in snap["workloads"]])


@app.command("create-farm")
def create_farm(
    name: str = typer.Argument(..., help="Farm name (unique on the ledger)."),
    ledger: str = typer.Option("http://127.0.0.1:7700", "--ledger", envvar="ZEROSTACK_LEDGER",
                               help="Ledger URL."),
    identity: str = typer.Option("default", "--identity", "-i", envvar="ZEROSTACK_IDENTITY",
                                 help="The farmer's identity (see `zerostack id`)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a farm owned by your twin (registered on first use); nodes join it with --farm."""
    from zerostack.cli.identity import load_named
    from zerostack.cli.output import console, styled
    from zerostack.ledger import LedgerClient, LedgerError

    ident = load_named(identity)
    try:
        with LedgerClient(ledger) as client:
            twin = client.register_twin(ident)
            farm = client.create_farm(ident, name)
    except LedgerError as exc:
        fail(f"cannot create farm {name!r}: {exc}")
    if json_out:
        print_json({"farm": farm, "name": name, "owner": twin})
    else:
        console.print(styled("farm ", (farm, "bold"), f" ({name}) owned by twin {twin}"),
                      highlight=False)
