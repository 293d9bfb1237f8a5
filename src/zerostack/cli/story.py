"""`zerostack story`: the seed's "smart contract for IT" in five steps on a local grid.

(1) an IT expert publishes the `crm` template, signed; (2) a user asks for "a CRM for
100 users in BE" and their 3Bot translates it into a low-level plan (nodes, workloads,
resources, price); (3) the solution is registered on the ledger and capacity is
reserved; (4) the legal and budget officers each read what they sign and approve the
solution once (nothing runs before the last one); (5) the nodes verify everything
themselves and run it; on a grid of hosts, the user also deploys `webapp` behind the
grid's gateway and its page is fetched through it from a host on the WAN; a summary is
printed. The grid then keeps running for the CLI (`--once` stops it after the summary).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from zerostack.cli.output import console, fail, print_table, styled

if TYPE_CHECKING:
    from zerostack.grid import LocalGrid

CRM = Path(__file__).resolve().parents[3] / "examples" / "templates" / "crm.yaml"
WEBAPP = CRM.parent / "webapp.yaml"
WEB_NAME = "hello"


def _step(n: int | str, *parts: object | tuple[object, str]) -> None:
    console.print(styled((f"[{n}]", "bold cyan"), " ", *parts), highlight=False)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _tell(grid_dir: Path, nodes: int, netns: bool, ledger_port: int, zdb_port: int,
          hub_port: int, once: bool) -> int:
    from zerostack.bot import ThreeBot
    from zerostack.bot import solutions as sol
    from zerostack.cli.grid import bring_up
    from zerostack.contracts import load_text
    from zerostack.grid import LocalGrid

    grid = LocalGrid(grid_dir, ledger_port=ledger_port, zdb_base_port=zdb_port, netns=netns)
    grid.reset()
    try:
        _step("grid", f"starting a ledger, a hub and {nodes} nodes in BE and CH"
              + (" (each on a host of its own)" if netns else ""))
        _, image, _, twins = bring_up(grid, nodes, hub_port, 1 if netns else 0)
        _step("grid", f"up: ledger {grid.url}; identities "
              + ", ".join(f"{n}={t}" for n, t in twins.items()))
        text = CRM.read_text()
        template = load_text(text)
        with ThreeBot(grid.url, grid.identity("expert")) as expert:
            digest = sol.publish(expert, template)
        _step(1, "the IT expert wrote ", (f"{template.name} {template.spec.version}", "bold"),
              f" (parameters: {', '.join(template.spec.parameters)}; roles: "
              f"{', '.join(s.role for s in template.spec.stakeholders)}) and published it, "
              f"signed: {digest[:16]}…")
        request = {"users": "100", "country": "BE", "image": image}
        with ThreeBot(grid.url, grid.identity("alice")) as alice, \
                ThreeBot(grid.url, grid.identity("legal")) as legal, \
                ThreeBot(grid.url, grid.identity("budget")) as budget:
            found, thash = sol.load_template(alice, "crm")
            d = sol.draft(alice, found, request,
                          {"legal": twins["legal"], "budget": twins["budget"]}, thash)
            s = d.summary()
            _step(2, "alice asked her 3Bot for \"a CRM for 100 users in BE\"; it became:")
            print_table("plan", ["node", "workloads", "cpu", "memory MiB", "hdd MiB"],
                        [(n["node"], ", ".join(n["workloads"]), n["resources"]["cru"],
                          n["resources"]["mru"] >> 20, n["resources"]["hru"] >> 20)
                         for n in s["nodes"]])
            sid = sol.create(alice, d)
            st = sol.status(alice, sid)
            _step(3, f"registered on the ledger as solution {sid}: contracts "
                  f"{', '.join(str(p['contract']) for p in st['parts'])}, capacity reserved, "
                  f"waiting for twins {', '.join(map(str, st['waiting_for']))}")
            r = sol.review(legal, sid)
            sol.approve(legal, sid)
            _step(4, f"legal opened {len(r.parts)} sealed part(s), recomputed each hash "
                  "and approved the solution once")
            time.sleep(2.0)
            states = {p["state"] for p in sol.status(alice, sid)["parts"]}
            _step(4, f"with legal's signature alone every part is {', '.join(states)}: "
                  "no node provisions anything")
            sol.approve(budget, sid)
            _step(4, "budget approved too: the quorum holds on every part at once")
            deadline = time.monotonic() + 120
            while True:
                st = sol.status(alice, sid)
                if all(p["state"] in ("deployed", "error") for p in st["parts"]):
                    break
                if time.monotonic() > deadline:
                    _step(5, ("the nodes did not report in time", "bold red"))
                    return 1
                time.sleep(0.5)
            ok = all(p["state"] == "deployed" for p in st["parts"])
            _step(5, "each node checked the owner's signature, the solution approvals "
                  "against the keys its own deployment names, and the image's signature, "
                  "then ran its part:")
            print_table(f"solution {sid}", ["contract", "node", "state", "workloads"],
                        [(p["contract"], p["node"], p["state"],
                          ", ".join(f"{w['name']}={w['state']}" for w in p["workloads"]))
                         for p in st["parts"]])
            if not ok:
                console.print(styled(("a node reported an error", "bold red")))
                return 1
        fetched = ""
        if netns:
            got = _web_through_gateway(grid, image)
            if got is None:
                return 1
            fetched = f" The webapp's page was fetched through gateway {got}."
        console.print(styled(("summary:", "bold"), f" template {template.name} published by "
                             f"twin {twins['expert']}, deployed by twin {twins['alice']} as "
                             f"solution {sid} on {len(st['parts'])} node(s), approved by "
                             f"legal (twin {twins['legal']}) and budget (twin "
                             f"{twins['budget']}), verified and running.{fetched}"),
                      highlight=False)
        if once:
            return 0
        console.print(f"\nThe grid keeps running. From another shell:\n"
                      f"  export ZEROSTACK_HOME={grid.home} ZEROSTACK_LEDGER={grid.url}\n"
                      f"  .venv/bin/zerostack solution status {sid} -i alice\n"
                      f"  .venv/bin/zerostack deploy archive --dry-run -i alice  "
                      "# after publishing examples/templates/archive.yaml -i expert\n"
                      "Ctrl-C stops the grid.", highlight=False)
        while True:
            time.sleep(3600)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _step("grid", "stopping: its processes, containers and mounts")
        grid.stop()


def _web_through_gateway(grid: LocalGrid, image: str) -> str | None:
    """`webapp` published by the expert and deployed by alice behind the grid's gateway
    gw1, then its page fetched over HTTPS from the grid's client host on the WAN, the
    name resolved to the gateway's address. Returns the gateway's domain, None when it
    failed (said on the terminal)."""
    from zerostack.bot import ThreeBot
    from zerostack.bot import solutions as sol
    from zerostack.cli.grid import CLIENT_HOST, gateway_domain
    from zerostack.contracts import load_text
    from zerostack.gateway import Caddy
    from zerostack.grid.hosts import https_get

    with ThreeBot(grid.url, grid.identity("expert")) as expert:
        sol.publish(expert, load_text(WEBAPP.read_text()))
    with ThreeBot(grid.url, grid.identity("alice")) as alice:
        found, thash = sol.load_template(alice, "webapp")
        d = sol.draft(alice, found, {"name": WEB_NAME, "image": image, "gateways": "1"},
                      None, thash)
        sid = sol.create(alice, d)
        deadline = time.monotonic() + 120
        while True:
            st = sol.status(alice, sid)
            if all(p["state"] in ("deployed", "error") for p in st["parts"]) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    if not all(p["state"] == "deployed" for p in st["parts"]):
        _step(5, ("webapp: a node did not run its part", "bold red"))
        return None
    gw = next(n for n in grid.nodes if n.name == "gw1")
    assert gw.host is not None and grid.topology is not None
    domain = gateway_domain(0)
    host = f"{WEB_NAME}.{domain}"
    client = grid.topology.host(CLIENT_HOST).namespace
    page, status = b"", 0
    deadline = time.monotonic() + 60
    while status != 200 and time.monotonic() < deadline:
        try:
            status, page = https_get(client, host, gw.host.address,
                                     Caddy(gw.data / "gateway").root_certificate)
        except OSError:
            time.sleep(0.5)
    if status != 200:
        _step(5, (f"webapp: https://{host}/ did not answer through {domain}", "bold red"))
        return None
    _step(5, f"alice also deployed webapp (solution {sid}); a browser on the WAN asked "
          f"https://{host}/ of gateway {domain} ({gw.host.address}) and got: ",
          (page.decode(errors="replace").strip()[:200], "bold"))
    return domain


def story(
    directory: Path = typer.Option(Path("./var/story"), "--dir",
                                   help="Where the grid keeps its state (wiped first)."),
    nodes: int = typer.Option(2, "--nodes", min=1, max=8, help="How many node agents."),
    netns: bool = typer.Option(os.geteuid() == 0, "--netns/--loopback",
                               help="Each node on a host of its own (root) or on loopback."),
    ledger_port: int = typer.Option(7700, "--ledger-port", help="The ledger's HTTP port."),
    zdb_port: int = typer.Option(9901, "--zdb-port", help="First node's Zero-DB port."),
    hub_port: int = typer.Option(9890, "--hub-port", help="The hub's Zero-DB port."),
    once: bool = typer.Option(False, "--once", help="Stop the grid after the summary."),
) -> None:
    """The seed's five steps: an expert publishes, a user deploys, stakeholders approve,
    nodes verify and run, a summary is printed."""
    from zerostack.bot import BotError
    from zerostack.flist import FlistError
    from zerostack.grid import GridError
    from zerostack.ledger import LedgerError

    if directory.is_symlink():
        fail(f"{directory} is a symbolic link; give the folder itself as --dir")
    if directory.exists() and any(directory.iterdir()) and \
            not (directory / "ledger.db").exists():
        fail(f"{directory} is not empty and holds no grid; pick another --dir")
    if netns and os.geteuid() != 0:
        fail("--netns makes network namespaces: run as root, or pass --loopback")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    code = 0
    try:
        code = _tell(directory.resolve(), nodes, netns, ledger_port, zdb_port, hub_port, once)
    except KeyboardInterrupt:
        pass
    except (GridError, BotError, FlistError, LedgerError, OSError) as exc:
        console.print(styled(("error:", "bold red"), " ", exc), highlight=False)
        code = 1
    raise typer.Exit(code)
