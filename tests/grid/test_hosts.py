"""Grid nodes on hosts: real network namespaces on a simulated WAN, real node agents and
Zero-DBs inside them, a hidden host behind NAT, zdb deployments on every host through the
3Bot, and teardown that leaves nothing behind (also after a SIGKILL) and nothing else."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import free_port, require_root, require_tool, zerostack_cmd
from tests.flist.image import busybox_rootfs
from zerostack.bot import ThreeBot
from zerostack.crypto import Identity
from zerostack.flist import Hub, ImageConfig, LocalStore, SignedFlist, build_dir, push_flist
from zerostack.grid import GridNode, LocalGrid, Topology, inside
from zerostack.grid import hosts as gridhosts
from zerostack.grid.topology import new_grid_id
from zerostack.ledger import LedgerClient

PASSWORD = "hosts-test"


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def root_routes() -> str:
    return "".join(subprocess.run(["ip", *fam, "route", "show", "table", "all"],
                                  capture_output=True, text=True, check=True).stdout
                   for fam in (["-4"], ["-6"]))


def processes_naming(folder: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", str(folder)], capture_output=True, text=True)
    return out.stdout.splitlines()


def assert_gone(topo: Topology, folder: Path) -> None:
    """No namespace, root link, route or process of the grid is left."""
    assert netns_list().isdisjoint(topo.namespaces())
    assert all(not Path(f"/run/netns/{n}").exists() for n in topo.namespaces())
    assert root_links().isdisjoint(topo.interfaces())
    routes = root_routes()
    assert all(name not in routes for name in topo.interfaces())
    assert "198.18." not in routes and "fd00:5a:" not in routes
    assert processes_naming(folder) == []


def connects(ns: str, host: str, port: int, timeout: float = 1.0) -> bool:
    with inside(ns):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def redis_cli(ns: str, node: GridNode, *args: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "redis-cli", "-h", node.address,
                          "-p", str(node.zdb_port), *args],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() + out.stderr.strip()


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[LocalGrid]:
    """Three hosts: node1 on site 0, node2 hidden behind NAT, node3 on site 1."""
    require_root()
    require_tool("nft")
    require_tool("redis-cli")
    g = LocalGrid(tmp_path / "grid", ledger_port=free_port(), netns=True,
                  status_port=free_port())
    try:
        client = g.start_ledger()
        g.start_node(client, "node1")
        g.start_node(client, "node2", hidden=True)
        g.start_node(client, "node3", site=1)
        yield g
    finally:
        g.stop()


def deploy_zdb(g: LocalGrid, node: GridNode) -> dict[str, Any]:
    alice = g.identity("alice")
    with ThreeBot(g.url, alice) as bot:
        dep = bot.build({"workloads": [{"type": "zdb", "name": "db", "size": "16M",
                                        "mode": "user", "password": PASSWORD,
                                        "public": False}]}, [], None)
        cid = bot.deploy(dep, node.node_id)
        c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                     and bool(c.get("report")), timeout=90)
    assert c["state"] == "deployed", c
    data: dict[str, Any] = c["report"]["workloads"][0]["data"]
    return data


def test_three_hosts_on_two_sites_and_behind_nat(grid: LocalGrid, tmp_path: Path) -> None:
    topo = grid.topology
    assert topo is not None
    n1, n2, n3 = grid.nodes
    assert n1.host and n2.host and n3.host
    ns1, ns2, ns3 = (n.host.namespace for n in grid.nodes)
    assert set(topo.namespaces()) <= netns_list()
    assert set(topo.links()) <= root_links()
    # every agent and its Zero-DB run inside their host's namespace
    for node in grid.nodes:
        assert node.host is not None
        assert node.proc.pid in gridhosts.pids_in(node.host.namespace)
        assert len(gridhosts.pids_in(node.host.namespace)) >= 2
    # the ledger knows each node by its public endpoint; the hidden one has none
    ledger = LedgerClient(grid.url)
    endpoints = {int(n["id"]): n["endpoint"] for n in ledger.nodes()}
    assert endpoints == {n1.node_id: "198.18.0.10", n2.node_id: "", n3.node_id: "198.18.1.12"}

    # host 1 reaches host 3's Zero-DB across the router, with redis-cli and redis-py
    assert redis_cli(ns1, n3, "PING") == "PONG"
    # (clients connect lazily: all their I/O stays inside the block)
    with inside(ns1), redis.Redis(host=n3.address, port=n3.zdb_port, socket_timeout=5) as r:
        assert r.ping()
    # the ledger answers on the WAN, over IPv4 and IPv6, from both sites
    with inside(ns3):
        for address in (topo.ledger_address, f"[{topo.ledger_address6}]"):
            assert httpx.get(f"http://{address}:{grid.ledger_port}/head",
                             timeout=5).status_code == 200
        # and the status endpoint of host 1 is served on its address
        status = httpx.get(f"http://{n1.address}:{grid.status_port}/", timeout=5).json()
    assert status["node"] == n1.node_id
    out = subprocess.run(["ip", "netns", "exec", ns3, *zerostack_cmd(), "node", "status",
                          "--host", n1.address, "--status-port", str(grid.status_port),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["node"] == n1.node_id, out.stderr

    # the hidden host reaches the WAN (host 1 and host 3), seen from its gateway's address
    assert redis_cli(ns2, n1, "PING") == "PONG"
    assert redis_cli(ns2, n3, "PING") == "PONG"
    port = free_port()
    with inside(ns1):
        server = socket.create_server((n1.address, port))
    with server:
        with inside(ns2):
            client = socket.create_connection((n1.address, port), timeout=5)
        with client:
            conn, peer = server.accept()
            conn.close()
    assert peer[0] == n2.host.gateway_address
    # ... but nobody dials it: no route, and with one, the gateway drops it
    assert not connects(ns1, n2.address, n2.zdb_port)
    assert not connects(ns1, n2.host.gateway_address, n2.zdb_port)
    subprocess.run(["ip", "-n", ns1, "route", "add", "192.168.2.0/24", "via",
                    n2.host.gateway_address], check=True)
    assert not connects(ns1, n2.address, n2.zdb_port)
    assert not connects(ns1, n2.address, grid.status_port)
    assert connects(ns2, n2.address, n2.zdb_port)  # its Zero-DB does listen

    # a zdb namespace deployed on each host works end to end, reached over the WAN
    # (the hidden one from its own namespace: its workloads are on its LAN only)
    for node, client_ns in ((n1, ns3), (n3, ns1), (n2, ns2)):
        data = deploy_zdb(grid, node)
        assert data["host"] == node.address and data["port"] == node.zdb_port
        with inside(client_ns), redis.Redis(host=data["host"], port=int(data["port"]),
                                            socket_timeout=5) as r:
            r.execute_command("SELECT", data["namespace"], PASSWORD)
            r.execute_command("SET", "k", node.name)
            assert r.execute_command("GET", "k") == node.name.encode()

    folder = grid.root
    grid.stop()
    assert_gone(topo, folder)
    assert not (folder / "grid.json").exists()
    assert (folder / "node1.log").exists()


def test_a_half_made_network_is_removed_and_inside_always_returns(tmp_path: Path) -> None:
    require_root()
    require_tool("nft")
    topo = Topology(new_grid_id(), sites=2)
    for name, site, hidden in (("node1", 0, False), ("node2", 0, True), ("node3", 1, False)):
        topo.add_host(name, site, hidden)
    gridhosts.save(tmp_path, topo)  # recorded whole, as before any of it is made
    try:
        gridhosts.apply(topo.wan_steps())
        hidden = topo.host("node2")
        steps = topo.host_steps(hidden)
        gridhosts.apply(steps[: len(steps) // 2])  # a crash halfway through a hidden host
        assert hidden.nat_namespace in netns_list()
        before = os.stat("/proc/thread-self/ns/net").st_ino
        with pytest.raises(RuntimeError), inside(topo.router):
            assert os.stat("/proc/thread-self/ns/net").st_ino != before
            raise RuntimeError("boom")
        assert os.stat("/proc/thread-self/ns/net").st_ino == before
        # a process left inside a namespace does not keep it (or its links) alive
        sleeper = subprocess.Popen(["sleep", "600"], preexec_fn=gridhosts.preexec(topo.router))
        assert sleeper.pid in gridhosts.pids_in(topo.router)
    finally:
        assert gridhosts.release_record(tmp_path) == []
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert_gone(topo, tmp_path)
    assert not (tmp_path / "grid.json").exists()


class Demo:
    """`zerostack demo --netns` on `folder`, run in its own session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ledger_port = free_port()
        self.log = folder.parent / "demo.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self, *extra: str) -> list[str]:
        return [*zerostack_cmd(), "demo", "--netns", "--dir", str(self.folder), "--nodes", "3",
                "--ledger-port", str(self.ledger_port), *extra]

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            self.proc = proc = subprocess.Popen(
                self.args(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 120
        while "The grid keeps running" not in self.log.read_text(errors="replace"):
            assert proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)
        return proc


def test_a_killed_grid_is_cleaned_by_the_next_start_and_lookalikes_stay(tmp_path: Path) -> None:
    require_root()
    require_tool("nft")
    folder = tmp_path / "grid"
    demo = Demo(folder)
    other_ns = other_link = ""
    try:
        proc = demo.start()
        old = gridhosts.load(folder)
        assert old is not None and len(old.hosts) == 3
        gid = json.loads((folder / "grid.json").read_text())["id"]
        # look-alikes of someone else: same grid id prefix, names the grid never records
        other_ns, other_link = f"zs{gid}-node9", f"zs{gid}h9"
        subprocess.run(["ip", "netns", "add", other_ns], check=True)
        subprocess.run(["ip", "link", "add", other_link, "type", "bridge"], check=True)
        pids = {p for ns in old.namespaces() for p in gridhosts.pids_in(ns)}
        assert pids
        os.kill(proc.pid, signal.SIGKILL)  # a crash: nothing of the demo's cleanup runs
        proc.wait()
        assert set(old.namespaces()) <= netns_list()
        assert set(old.links()) <= root_links()
        assert any(Path(f"/proc/{p}").exists() for p in pids)
        again = subprocess.run(demo.args("--once"), capture_output=True, text=True,
                               timeout=240, env={**os.environ, "COLUMNS": "200"})
        assert again.returncode == 0, again.stdout + again.stderr
        assert "b'hello from the grid'" in again.stdout
        assert_gone(old, folder)
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
        assert other_ns in netns_list() and other_link in root_links()
        assert not (folder / "grid.json").exists()
    finally:
        if demo.proc is not None and demo.proc.poll() is None:
            demo.proc.kill()
            demo.proc.wait()
        LocalGrid(folder).reclaim()
        if other_ns:
            subprocess.run(["ip", "netns", "delete", other_ns], check=False)
            subprocess.run(["ip", "link", "delete", other_link], check=False)


def test_a_container_runs_on_a_host_with_its_image_from_the_grid_hub(tmp_path: Path) -> None:
    require_root()
    require_tool("runc")
    publisher = Identity.generate()
    store = LocalStore(tmp_path / "store")
    manifest, _ = build_dir(busybox_rootfs(tmp_path / "img"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, publisher)
    g = LocalGrid(tmp_path / "grid", ledger_port=free_port(), netns=True,
                  status_port=free_port())
    try:
        client = g.start_ledger()
        hub = g.start_hub(free_port())
        assert hub.startswith("198.18.0.1:")
        with g.on_wan(), Hub(hub) as h:
            push_flist(flist, store, h)
        node = g.start_node(client, "node1", "--hub", hub,
                            "--flist-publisher", publisher.public_hex)
        assert node.host is not None
        with ThreeBot(g.url, g.identity("alice")) as bot:
            dep = bot.build({"workloads": [
                {"type": "container", "name": "app", "flist": f"{hub}/{flist.hash_hex}",
                 "publishers": [publisher.public_hex], "memory": "32M",
                 "args": ["trap 'exit 0' TERM; sleep 1000 & wait"]}]}, [], None)
            cid = bot.deploy(dep, node.node_id)
            c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                         and bool(c.get("report")), timeout=120)
        assert c["state"] == "deployed", c["report"]
        runc_root = node.data / "containers" / "runc"
        assert subprocess.run(["runc", "--root", str(runc_root), "list", "-q"],
                              capture_output=True, text=True).stdout.split()
        topo = g.topology
        assert topo is not None
    finally:
        g.stop()
    # the grid's stop took the container, its mounts and the host's network with it
    assert subprocess.run(["runc", "--root", str(runc_root), "list", "-q"],
                          capture_output=True, text=True).stdout.split() == []
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path / "grid") not in f.read()
    assert_gone(topo, tmp_path / "grid")
