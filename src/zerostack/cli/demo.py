"""`zerostack demo`: a grid on this machine, and one smart contract taken through its life.

Starts a ledger and two node agents (each with its own Zero-DB; with --netns each on a
host of its own: a network namespace on a simulated WAN), creates a user and two
stakeholders, deploys a Zero-DB namespace that needs two of three signatures, shows that
nothing happens until the quorum holds, writes to the namespace once the node reports it,
and leaves the grid running for the CLI until Ctrl-C or SIGTERM. Stopping it (or a
failure) stops everything the grid started, containers and mounts included; a crashed
demo's leftovers in the same folder are stopped by the next start before it wipes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import typer

from zerostack.bot import BotError, ThreeBot
from zerostack.cli.output import console, fail, print_table, styled
from zerostack.grid import GridError, GridNode, LocalGrid, inside

NAMESPACE_PASSWORD = "demo-password"


def _step(*parts: object | tuple[object, str]) -> None:
    console.print(styled(("▸", "bold cyan"), " ", *parts), highlight=False)


def _deployed(c: dict[str, Any]) -> bool:
    return c["state"] in ("deployed", "error") and bool(c.get("report"))


def placement(index: int) -> tuple[int, bool]:
    """(site, hidden) of the demo's node `index` on a grid with hosts: the first on site 0,
    the second behind NAT, the third on site 1 behind the router, then sites in turn."""
    return {0: (0, False), 1: (0, True), 2: (1, False)}.get(index, (index % 2, False))


@contextlib.contextmanager
def _on_host_of(node: GridNode) -> Iterator[None]:
    """Where the node's addresses are reachable: its host's namespace, if it has one."""
    if node.host is None:
        yield
    else:
        with inside(node.host.namespace):
            yield


def _start_nodes(grid: LocalGrid, nodes: int) -> None:
    client = grid.start_ledger()
    if grid.topology is not None:
        _step(f"WAN of grid {grid.topology.grid}: bridges "
              f"{', '.join(grid.topology.wan_links()[:grid.topology.sites])}, router namespace "
              f"{grid.topology.router}; the ledger is {grid.wan_url} there")
    for i in range(nodes):
        site, hidden = placement(i) if grid.netns else (0, False)
        node = grid.start_node(client, f"node{i + 1}", site=site, hidden=hidden)
        where = f"its Zero-DB on port {node.zdb_port}"
        if node.host is not None:
            where = (f"host {node.host.namespace}, Zero-DB at {node.address}:{node.zdb_port}, "
                     + ("hidden behind NAT (no public endpoint)" if hidden
                        else f"site {site}"))
        _step(f"node {node.node_id} ({node.name}) registered; {where}")


def _run(grid: LocalGrid, nodes: int, once: bool) -> int:
    _step(f"ledger on {grid.url} (data: {grid.root / 'ledger.db'})")
    _start_nodes(grid, nodes)

    alice, bob, carol = (grid.identity(n) for n in ("alice", "bob", "carol"))
    with ThreeBot(grid.url, alice) as a, ThreeBot(grid.url, bob) as b, \
            ThreeBot(grid.url, carol) as c:
        twins = {name: bot.twin_id() for name, bot in (("alice", a), ("bob", b), ("carol", c))}
        _step("twins: " + ", ".join(f"{n}={t}" for n, t in twins.items()))
        deployment = a.build(
            {"metadata": "demo/sessions",
             "workloads": [{"type": "zdb", "name": "sessions", "size": "64M", "mode": "user",
                            "password": NAMESPACE_PASSWORD, "public": False}]},
            [f"{twins['bob']}:1", f"{twins['carol']}:1"], weight_required=2)
        node_id = grid.nodes[0].node_id
        cid = a.deploy(deployment, node_id)
        _step(f"alice created contract {cid} on node {node_id}: a Zero-DB namespace, "
              "2 of 3 signatures needed (alice required)")
        time.sleep(1.0)
        state = a.contract(cid)["state"]
        _step("with alice's signature alone the contract is ", (state, "bold"),
              ": the node provisions nothing")
        review = b.review(cid)
        _step(f"bob opened the sealed deployment himself: {len(review.deployment.workloads)} "
              f"workload(s), hash {review.hash[:16]}… recomputed and matching the ledger")
        b.approve(cid, expect_hash=deployment.hash())
        _step("bob signed his approval of that hash for this contract, version and node: "
              "the quorum holds")
        contract = a.wait(cid, _deployed, timeout=60)
        report = contract["report"]
        rows = [(w["name"], w["type"], w["state"], w.get("message", ""),
                 ", ".join(f"{k}={v}" for k, v in sorted(w.get("data", {}).items())))
                for w in report["workloads"]]
        print_table(f"contract {cid}: {contract['state']} (signed report from node {node_id})",
                    ["workload", "type", "state", "message", "result"], rows)
        if contract["state"] != "deployed":
            console.print(styled(("the node reported an error", "bold red")))
            return 1
        data = report["workloads"][0]["data"]
        with _on_host_of(grid.nodes[0]):
            r = redis.Redis(host=str(data["host"]), port=int(data["port"]))
            r.execute_command("SELECT", data["namespace"], NAMESPACE_PASSWORD)
            r.execute_command("SET", "greeting", "hello from the grid")
            value = r.execute_command("GET", "greeting")
            r.close()
        _step(f"redis-py wrote and read back {value!r} in namespace {data['namespace']}")

    if once:
        return 0
    host = grid.nodes[0].host
    redis_cli = (f"ip netns exec {host.namespace} redis-cli -h {data['host']} -p {data['port']}"
                 if host else f"redis-cli -p {data['port']}")
    console.print(styled(
        "\n", ("The grid keeps running.", "bold"), " Use the CLI against it from another shell:\n"
        f"  export ZEROSTACK_HOME={grid.home} ZEROSTACK_LEDGER={grid.url}\n"
        "  .venv/bin/zerostack status --identity alice\n"
        f"  {redis_cli}   # then: SELECT {data['namespace']} {NAMESPACE_PASSWORD}\n"
        f"  .venv/bin/zerostack cancel {cid} --identity alice\n"
        + (f"  ip netns exec {host.namespace} ip addr   # look inside a host\n"
           f"  ip netns exec {host.namespace} .venv/bin/zerostack node status "
           f"--host {host.address} --status-port {grid.status_port}\n" if host else "")
        + f"Logs: {grid.root}/*.log.  Ctrl-C stops the grid."), highlight=False)
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def demo(
    directory: Path = typer.Option(
        Path("./var/demo"), "--dir",
        help="Where the grid keeps its state (an earlier demo there is stopped and wiped)."),
    nodes: int = typer.Option(2, "--nodes", min=1, max=8, help="How many node agents."),
    ledger_port: int = typer.Option(7700, "--ledger-port", help="The ledger's HTTP port."),
    zdb_port: int = typer.Option(9901, "--zdb-port",
                                 help="First node's Zero-DB port (--netns: every host's)."),
    once: bool = typer.Option(False, "--once", help="Stop the grid after the walk-through."),
    netns: bool = typer.Option(
        False, "--netns",
        help="Run each node on a host of its own: a network namespace on a simulated WAN "
             "(node2 behind NAT, node3 on a second site behind a router). Needs root."),
) -> None:
    """Run a local grid and take one smart contract through its life."""
    if directory.is_symlink():
        fail(f"{directory} is a symbolic link; give the folder itself as --dir")
    if (directory.exists() and any(directory.iterdir())
            and not (directory / "ledger.db").exists()):
        fail(f"{directory} is not empty and holds no demo grid; pick another --dir")
    if netns and os.geteuid() != 0:
        fail("--netns makes network namespaces: run the demo as root")
    grid = LocalGrid(directory.resolve(), ledger_port=ledger_port, zdb_base_port=zdb_port,
                     netns=netns)
    try:
        grid.reset()
    except GridError as exc:
        fail(str(exc))
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in stops:
        signal.signal(sig, _interrupt)
    code = 0
    try:
        code = _run(grid, nodes, once)
        if not once and code == 0:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except (GridError, BotError) as exc:
        console.print(styled(("error:", "bold red"), " ", exc), highlight=False)
        code = 1
    finally:
        # Stopping must finish: a second Ctrl-C would leave containers and mounts behind.
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        _step("stopping the grid: its processes, containers and mounts"
              + (", network namespaces and links" if netns else ""))
        try:
            grid.stop()
        except GridError as exc:
            console.print(styled(("error:", "bold red"), f" {exc}"), highlight=False)
            code = 1
    raise typer.Exit(code)
