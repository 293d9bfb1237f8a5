"""`zerostack up`, `zerostack down`, `zerostack grid status`: a standing local grid for
trying templates: a ledger, a hub with the example image, nodes on two sites (pretend
countries BE and CH), gateway nodes if asked (gw1.grid.test, …, with a client host on
the WAN to try them from) and demo identities (an expert, a user, a legal and a budget
officer). The grid keeps running after `up` returns; `down` removes everything it made."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from zerostack.cli.output import console, fail, print_json, print_table, styled

if TYPE_CHECKING:
    from zerostack.crypto import Identity
    from zerostack.grid import LocalGrid
    from zerostack.ledger import LedgerClient

app = typer.Typer(help="The local grid `zerostack up` started.", no_args_is_help=True,
                  rich_markup_mode=None)

RECORD = "up.json"
GATEWAY_ZONE = "grid.test"
CLIENT_HOST = "client"
COUNTRIES = ("BE", "CH")
IDENTITIES = ("expert", "alice", "legal", "budget")
DIR = typer.Option(Path("./var/grid"), "--dir", help="Where the grid keeps its state.")


def _record(directory: Path) -> dict[str, Any]:
    path = directory / RECORD
    try:
        data: dict[str, Any] = json.loads(path.read_text()[:1 << 20])
    except FileNotFoundError:
        fail(f"no grid in {directory} (start one with `zerostack up --dir {directory}`)")
    except (OSError, ValueError) as exc:
        fail(f"{path} is unreadable: {exc}")
    return data


def _holds_grid(directory: Path) -> bool:
    """Whether `directory` holds what `zerostack up` made (a record, or a ledger)."""
    return any((directory / name).exists()
               for name in (RECORD, "ledger.db", "ledger-cluster", "grid.pids"))


def bring_up(grid: LocalGrid, nodes: int, hub_port: int,
             gateways: int = 0) -> tuple[str, str, Identity, dict[str, int]]:
    """Start the ledger, the hub with the example image and `nodes` nodes on `grid`, then
    `gateways` gateway nodes (`make_gateways`); register the demo identities. Returns
    (hub, image reference, publisher, twins)."""
    from zerostack.grid.images import publish_example

    client = grid.start_ledger()
    hub = grid.start_hub(hub_port)
    publisher = grid.identity("publisher")
    with grid.on_wan():
        image = publish_example(grid.root / "image", hub, publisher)
    for i in range(nodes):
        site = i % 2
        grid.start_node(client, f"node{i + 1}", "--hub", hub, "--flist-publisher",
                        publisher.public_hex, "--country", COUNTRIES[site], site=site)
    if gateways:
        make_gateways(grid, client, gateways, hub, publisher)
    twins = {name: client.register_twin(grid.identity(name)) for name in IDENTITIES}
    return hub, image, publisher, twins


def gateway_domain(index: int) -> str:
    return f"gw{index + 1}.{GATEWAY_ZONE}"


def make_gateways(grid: LocalGrid, client: LedgerClient, count: int, hub: str,
                  publisher: Identity) -> None:
    """`count` more nodes, each on a host of its own, that the farmer makes gateways
    (`node.gateway`: domain gwK.grid.test on the host's WAN addresses), and a `client`
    host on the WAN to try them from (what a browser out there would be)."""
    farmer = grid.identity("farmer")
    for j in range(count):
        site = j % 2
        node = grid.start_node(client, f"gw{j + 1}", "--hub", hub, "--flist-publisher",
                               publisher.public_hex, "--country", COUNTRIES[site], site=site)
        assert node.host is not None  # gateways are refused on loopback
        client.send(farmer, "node.gateway", {
            "node": node.node_id, "domain": gateway_domain(j),
            "ipv4": f"{node.host.address}/24",
            **({"ipv6": f"{node.host.address6}/64"} if node.host.address6 else {})})
    grid._add_host(CLIENT_HOST, 1, False)


def up(
    directory: Path = DIR,
    nodes: int = typer.Option(3, "--nodes", min=1, max=16, help="How many node agents."),
    gateways: int = typer.Option(0, "--gateways", min=0, max=4,
                                 help="Gateway nodes (gw1.grid.test, …; needs --netns)."),
    ledger_port: int = typer.Option(7700, "--ledger-port", help="The ledger's HTTP port."),
    zdb_port: int = typer.Option(9901, "--zdb-port", help="First node's Zero-DB port."),
    hub_port: int = typer.Option(9890, "--hub-port", help="The hub's Zero-DB port."),
    netns: bool | None = typer.Option(None, "--netns/--loopback",
                                      help="Each node on a host of its own (network "
                                           "namespaces; root; the default as root without "
                                           "--ledger-replicas) or all on loopback."),
    ledger_replicas: int = typer.Option(0, "--ledger-replicas", min=0, max=16,
                                        help="Run the ledger as a cluster: an etcd cluster "
                                             "and N replicas on --ledger-port and the next "
                                             "ports (on loopback; 0: one ledger process)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Start a local grid and leave it running: ledger, hub, nodes, demo identities."""
    from zerostack.flist import FlistError
    from zerostack.grid import GridError, LocalGrid
    from zerostack.ledger import LedgerError

    if directory.is_symlink():
        fail(f"{directory} is a symbolic link; give the folder itself as --dir")
    if directory.exists() and any(directory.iterdir()) and not _holds_grid(directory):
        fail(f"{directory} is not empty and holds no grid; pick another --dir")
    if netns is None:
        netns = os.geteuid() == 0 and not ledger_replicas
    if netns and os.geteuid() != 0:
        fail("--netns makes network namespaces: run as root, or pass --loopback")
    if netns and ledger_replicas:
        fail("--ledger-replicas runs the replicas on 127.0.0.1: pass --loopback as well")
    if gateways and not netns:
        fail("gateway nodes serve ports 80, 443 and 53 on hosts of their own: run "
             "`zerostack up` with --netns (as root) or with --gateways 0")
    grid = LocalGrid(directory.resolve(), ledger_port=ledger_port, zdb_base_port=zdb_port,
                     netns=netns, ledger_replicas=ledger_replicas)
    try:
        grid.reset()
        hub, image, publisher, twins = bring_up(grid, nodes, hub_port, gateways)
    except (GridError, FlistError, LedgerError, OSError) as exc:
        try:
            grid.stop()
        except GridError:
            pass
        fail(str(exc))
    gws = _gateways(grid)
    record = {"url": grid.url, "home": str(grid.home), "netns": netns, "hub": hub,
              "ledger_replicas": ledger_replicas,
              "etcd": grid.cluster.etcd_urls if grid.cluster else [],
              "image": image, "publisher": publisher.public_hex, "twins": twins,
              "nodes": [{"name": n.name, "node": n.node_id, "address": n.address,
                         "zdb_port": n.zdb_port,
                         "namespace": n.host.namespace if n.host else None}
                        for n in grid.nodes],
              "gateways": gws}
    path = grid.root / RECORD
    path.write_text(json.dumps(record, indent=2))
    path.chmod(0o600)
    if json_out:
        print_json(record)
        return
    ledger = (f"ledger cluster of {ledger_replicas} replicas {grid.url}" if ledger_replicas
              else f"ledger {grid.url}")
    console.print(styled(("grid up", "bold"), f": {ledger}, {nodes} nodes "
                         f"({', '.join(COUNTRIES[:min(nodes, 2)])}), hub {hub}"),
                  highlight=False)
    console.print(f"example image: {image}\nidentities: "
                  + ", ".join(f"{n} (twin {t})" for n, t in twins.items())
                  + f"\n  export ZEROSTACK_HOME={grid.home} ZEROSTACK_LEDGER={grid.url}\n"
                  f"  zerostack template publish examples/templates/crm.yaml -i expert\n"
                  f"  zerostack deploy crm -p users=50 --stakeholder legal={twins['legal']} "
                  f"--stakeholder budget={twins['budget']} -i alice\n"
                  f"  zerostack grid status --dir {directory}    zerostack down --dir "
                  f"{directory}", highlight=False)
    if ledger_replicas:
        console.print(f"  zerostack ledger status --ledger {grid.url}", highlight=False)
    for gw in gws:
        console.print(f"gateway {gw['name']}: NAME.{gw['domain']} at {gw['ipv4']} (node "
                      f"{gw['node']}; its CA: {gw['caddy_root']})", highlight=False)


def _gateways(grid: LocalGrid) -> list[dict[str, Any]]:
    """The gateway nodes `up` made, and the WAN client host to try them from."""
    from zerostack.gateway import Caddy

    out: list[dict[str, Any]] = []
    client = next((h for h in (grid.topology.hosts if grid.topology else [])
                   if h.name == CLIENT_HOST), None)
    for j, n in enumerate(n for n in grid.nodes if n.name.startswith("gw")):
        assert n.host is not None
        out.append({"name": n.name, "node": n.node_id, "domain": gateway_domain(j),
                    "ipv4": n.host.address, "ipv6": n.host.address6,
                    "caddy_root": str(Caddy(n.data / "gateway").root_certificate),
                    "client_namespace": client.namespace if client else None})
    return out


def down(directory: Path = DIR) -> None:
    """Stop everything `zerostack up` started in DIR (processes, containers, mounts,
    namespaces and links) and delete the folder."""
    from zerostack.grid import GridError, LocalGrid

    if not _holds_grid(directory):
        fail(f"no grid in {directory}")
    try:
        LocalGrid(directory.resolve()).reset()
    except GridError as exc:
        fail(str(exc))
    console.print(f"grid in {directory} stopped and removed", highlight=False)


@app.command("status")
def status(directory: Path = DIR, json_out: bool = typer.Option(False, "--json",
                                                                help="Print JSON.")) -> None:
    """The grid's nodes (country, free capacity, up or down) and its solutions."""
    from zerostack.ledger import LedgerClient, LedgerError

    rec = _record(directory)
    try:
        with LedgerClient(rec["url"], timeout=10) as client:
            nodes = client.nodes(limit=1000)
            solutions = client.solutions(limit=1000)
            states = {}
            for s in solutions:
                states[s["id"]] = sorted({(client.contract(p["contract"]) or {})
                                          .get("state", "?") for p in s["parts"]})
    except LedgerError as exc:
        fail(f"the grid's ledger at {rec['url']}: {exc}")
    if json_out:
        print_json({"url": rec["url"], "nodes": nodes,
                    "solutions": [{**s, "states": states[s["id"]]} for s in solutions]})
        return
    gib = 1 << 30
    print_table(f"nodes of {rec['url']}", ["node", "country", "status", "free cpu",
                                            "free memory", "free ssd", "free hdd"],
                [(n["id"], n["location"]["country"], n["status"], n["free"]["cru"],
                  f"{n['free']['mru'] / gib:.1f} GiB", f"{n['free']['sru'] / gib:.0f} GiB",
                  f"{n['free']['hru'] / gib:.0f} GiB") for n in nodes])
    print_table("solutions", ["id", "owner", "parts", "states", "metadata"],
                [(s["id"], s["owner"], len(s["parts"]), ", ".join(states[s["id"]]),
                  s["metadata"]) for s in solutions])
