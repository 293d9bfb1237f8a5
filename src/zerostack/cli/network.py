"""`zerostack network add | deploy | extend | remove | access`: a user network over
several nodes, the workloads that join it, and the user's machine on it."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from zerostack.cli.bot import IDENTITY, JSON, LEDGER, LEDGER_KEY, _session, _settled
from zerostack.cli.output import fail, print_json, print_table

if TYPE_CHECKING:
    from zerostack.bot import ThreeBot

app = typer.Typer(help="User networks: WireGuard between a deployment's nodes.",
                  no_args_is_help=True, rich_markup_mode=None)


def _node_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--nodes {text[:50]!r} is not a list of node ids like 1,3,5")
    if not ids or any(i < 1 for i in ids):
        fail("--nodes needs node ids like 1,3,5")
    return ids


def _wait_updates(bot: ThreeBot, record: dict[str, Any], wait: float) -> None:
    """Wait until every node of a network record reported on its contract's latest
    version; fail with the report of the first that did not deploy."""
    for n in record["nodes"].values():
        cid = int(n["contract"])
        version = int(bot.contract(cid)["version"])
        c = bot.wait(cid, partial(_settled, version=version), wait)
        if c["state"] != "deployed":
            fail(f"contract {cid} failed its update: {c.get('report')}")


@app.command("add")
def add(
    name: str = typer.Argument(..., help="The network's name (also its workload name)."),
    nodes: str = typer.Option(..., "--nodes", help="Node ids, comma-separated: 1,3,5."),
    ip_range: str = typer.Option("10.20.0.0/16", "--range", help="IPv4 range (a /24 each)."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535,
                                    help="WireGuard port on every node (default: a random "
                                    "one of 20000-29999 none of your networks uses)."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the nodes (0: none)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Deploy a network over NODES: one contract per node, a /24 each, WireGuard between."""
    from zerostack.bot.networks import create
    from zerostack.cli.identity import zerostack_home

    ids = _node_list(nodes)
    with _session(ledger, identity, ledger_key) as bot:
        record = create(bot, zerostack_home(), name, ids, ip_range, port)
        states = {}
        for nid, n in record["nodes"].items():
            c = bot.contract(int(n["contract"]))
            if wait > 0:
                c = bot.wait(int(n["contract"]), lambda c: c["state"] in ("deployed", "error")
                             and bool(c.get("report")), wait)
            states[nid] = c["state"]
    rows = [(nid, n["subnet"], n["endpoint"] or "(hidden)", n["contract"], states[nid])
            for nid, n in record["nodes"].items()]
    if json_out:
        print_json({**record, "states": states})
    else:
        print_table(f"network {name} ({record['range']})",
                    ["node", "subnet", "endpoint", "contract", "state"], rows)
    if "error" in states.values():
        raise typer.Exit(1)


@app.command("access")
def access(
    name: str = typer.Argument(..., help="The network."),
    via: int | None = typer.Option(None, "--via", help="Node to go through (default: the "
                                   "first with a public endpoint)."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the nodes (0: none)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Add this machine to the network and print its wg-quick configuration (it holds a
    private key: keep it)."""
    from zerostack.bot.networks import access as add_access
    from zerostack.bot.networks import load
    from zerostack.cli.identity import zerostack_home

    with _session(ledger, identity, ledger_key) as bot:
        config = add_access(bot, zerostack_home(), name, via)
        record = load(zerostack_home(), name)
        if wait > 0:
            _wait_updates(bot, record, wait)
    sys.stdout.write(config)


@app.command("remove")
def remove(
    name: str = typer.Argument(..., help="The network."),
    node: int = typer.Option(..., "--node", help="The node to take out of the network."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the nodes (0: none)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Take a node out of the network: the other nodes drop it in place (their tunnels
    stay up), then its contract is cancelled."""
    from zerostack.bot.networks import load, remove_node
    from zerostack.cli.identity import zerostack_home

    with _session(ledger, identity, ledger_key) as bot:
        cid = remove_node(bot, zerostack_home(), name, node)
        if wait > 0:
            _wait_updates(bot, load(zerostack_home(), name), wait)
            bot.wait(cid, lambda c: c["state"] == "deleted", wait)
    sys.stdout.write(f"node {node} left network {name}; contract {cid} cancelled\n")


@app.command("deploy")
def deploy(
    name: str = typer.Argument(..., help="The network."),
    file: Path = typer.Argument(..., help="Deployment YAML: the workloads to run on NODE."),
    node: int = typer.Option(..., "--node", help="The node of the network to run them on."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the node (0: none)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Run the file's workloads (containers with `network: {network: NAME}`) on a node of
    the network, as the next version of that node's network contract."""
    from zerostack.bot import load_deployment_file
    from zerostack.bot.networks import deploy_on
    from zerostack.cli.identity import zerostack_home

    with _session(ledger, identity, ledger_key) as bot:
        cid = deploy_on(bot, zerostack_home(), name, node, load_deployment_file(file))
        c = bot.contract(cid)
        if wait > 0:
            c = bot.wait(cid, partial(_settled, version=int(c["version"])), wait)
    rows = [(w["name"], w["type"], w["state"], (w.get("data") or {}).get("ip", ""))
            for w in (c.get("report") or {}).get("workloads") or []]
    if json_out:
        print_json({"contract": cid, "state": c["state"], "report": c.get("report")})
    else:
        print_table(f"contract {cid} on node {node}", ["workload", "type", "state", "ip"], rows)
    if c["state"] != "deployed":
        raise typer.Exit(1)


@app.command("extend")
def extend(
    name: str = typer.Argument(..., help="The network."),
    nodes: str = typer.Option(..., "--nodes", help="Nodes to add, comma-separated: 5,7."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the nodes (0: none)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Add nodes to the network: the present nodes take them as peers in place, each new
    node gets a contract of its own."""
    from zerostack.bot.networks import add_nodes
    from zerostack.cli.identity import zerostack_home

    with _session(ledger, identity, ledger_key) as bot:
        record = add_nodes(bot, zerostack_home(), name, _node_list(nodes))
        if wait > 0:
            _wait_updates(bot, record, wait)
    sys.stdout.write(f"network {name}: nodes {', '.join(record['nodes'])}\n")
