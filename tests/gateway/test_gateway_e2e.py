"""Gateways end to end, with real node agents on grid hosts, real Caddy and real HTTP
from a client host on the WAN: two busybox httpd containers on a user network on one
site, reached through `https://shop.gw1.grid.test` on a gateway on the other site over
IPv4 and IPv6; the name refused to another twin; one backend cut off while requests keep
succeeding; Caddy killed and rebuilt from the contracts; cancel removes the route and
the gateway's join of the network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_root, require_tool
from tests.flist.image import busybox_rootfs
from tests.gateway.client import Answer, fetch
from zerostack.bot import ThreeBot
from zerostack.bot.mesh import MeshNode, keypair
from zerostack.bot.mesh import workloads as mesh_workloads
from zerostack.crypto import Identity, load_identity
from zerostack.flist import Hub, ImageConfig, LocalStore, SignedFlist, build_dir, push_flist
from zerostack.gateway import Caddy
from zerostack.grid import GridNode, LocalGrid
from zerostack.grid.topology import Host
from zerostack.ledger.errors import LedgerRejected
from zerostack.node.network import join, resource
from zerostack.node.network.plan import container_link_names, resource_names
from zerostack.node.provisioners import WorkloadID

DOMAIN = "gw1.grid.test"
HOST = f"shop.{DOMAIN}"


def httpd(text: str) -> str:
    return (f"mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && "
            "exec httpd -f -p 8080 -h /tmp/www")


def node_key(node: GridNode) -> str:
    return load_identity(node.data / "identity.key").public_hex


class Setup:
    def __init__(self, grid: LocalGrid, hub: str, flist: str, publisher: Identity,
                 client: Host) -> None:
        self.grid, self.hub, self.flist, self.publisher = grid, hub, flist, publisher
        self.client = client
        self.made: list[tuple[GridNode, int, list[str]]] = []

    def container(self, name: str, script: str, ip: str) -> dict[str, Any]:
        return {"type": "container", "name": name, "flist": f"{self.hub}/{self.flist}",
                "publishers": [self.publisher.public_hex], "memory": "32M",
                "args": [script], "network": {"network": "net", "ip": ip}}

    def caddy(self, node: GridNode) -> Caddy:
        return Caddy(node.data / "gateway")

    def get(self, url: str, address: str, node: GridNode, timeout: float = 5.0) -> Answer:
        return fetch(self.client.namespace, url, address,
                     self.caddy(node).root_certificate, timeout)


@contextmanager
def grid_setup(tmp_path: Path, nodes: tuple[tuple[str, int], ...],
               tools: tuple[str, ...] = ()) -> Iterator[Setup]:
    """A grid of hosts with a busybox image on its hub, node agents named `nodes` (name,
    site) and a client host on site 1; every network resource and container link the
    test made (`Setup.made`) is removed afterwards, even when the test failed."""
    require_root()
    for tool in ("runc", "nft", "wg", "wireguard-go", "caddy", *tools):
        require_tool(tool)
    publisher = Identity.generate()
    store = LocalStore(tmp_path / "store")
    manifest, _ = build_dir(busybox_rootfs(tmp_path / "img"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, publisher)
    g = LocalGrid(tmp_path / "grid", ledger_port=free_port(), netns=True,
                  status_port=free_port())
    s: Setup | None = None
    try:
        client = g.start_ledger()
        hub = g.start_hub(free_port())
        with g.on_wan(), Hub(hub) as h:
            push_flist(flist, store, h)
        for name, site in nodes:
            g.start_node(client, name, "--hub", hub, "--flist-publisher",
                         publisher.public_hex, site=site)
        s = Setup(g, hub, flist.hash_hex, publisher, g._add_host("client", 1, False))
        yield s
    finally:
        g.stop()  # the hosts' namespaces go, and every link in them
        for node, contract, containers in s.made if s else []:
            key = node_key(node)
            for c in containers:
                resource.detach_container(container_link_names(key, WorkloadID(contract, c))
                                          .namespace)
            resource.remove(resource_names(key, WorkloadID(contract, "net")))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with grid_setup(tmp_path, (("gw1", 0), ("web", 1))) as s:
        yield s


def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def answers(setup: Setup, gw: GridNode, url: str, address: str) -> Answer | None:
    try:
        return setup.get(url, address, gw, timeout=3)
    except OSError:
        return None


def test_name_proxy_through_a_user_network(setup: Setup) -> None:
    g = setup.grid
    gw, web = g.nodes
    assert gw.host is not None and web.host is not None
    v4, v6 = gw.host.address, gw.host.address6
    assert v6 is not None
    farmer = g.identity("farmer")
    ledger = ThreeBot(g.url, farmer).ledger
    ledger.send(farmer, "node.gateway", {"node": gw.node_id, "domain": DOMAIN,
                                         "ipv4": f"{v4}/24", "ipv6": f"{v6}/64"})
    alice, bob = g.identity("alice"), g.identity("bob")
    with ThreeBot(g.url, alice) as a, ThreeBot(g.url, bob) as b:
        a.ledger.register_twin(alice)
        b.ledger.register_twin(bob)
        a.ledger.register_name(alice, "shop")
        with pytest.raises(LedgerRejected, match="taken by twin"):
            b.ledger.register_name(bob, "shop")

        keys = {gw.node_id: keypair()[0], web.node_id: keypair()[0]}
        nets = mesh_workloads("net", "10.41.0.0/16", [
            MeshNode(gw.node_id, "10.41.1.0/24", v4),
            MeshNode(web.node_id, "10.41.2.0/24", web.host.address)], keys)
        backends = ["http://10.41.2.10:8080", "http://10.41.2.11:8080"]
        d_web = a.build({"workloads": [
            nets[web.node_id],
            setup.container("web1", httpd("hello-from-web1"), "10.41.2.10"),
            setup.container("web2", httpd("hello-from-web2"), "10.41.2.11")]}, [], None)
        proxy = {"type": "gateway_name_proxy", "name": "site", "domain_name": "shop",
                 "backends": backends, "network": "net", "health_interval": 1}
        forward = {"type": "port_forward", "name": "fwd", "port": 8081, "network": "net",
                   "target": "10.41.2.11:8080"}
        # the farm's pool: one address on the gateway's site
        ledger.send(farmer, "farm.public_ips", {"farm": g.farm, "add": [
            {"ip": "198.18.0.200/24", "gateway": "198.18.0.1"}]})
        pub = setup.container("pub", httpd("hello-from-pub"), "10.41.1.20")
        pub["network"]["public_ip"] = "ip"
        d_gw = a.build({"workloads": [nets[gw.node_id], proxy, forward, pub,
                                      {"type": "public_ip", "name": "ip"}]}, [], None)
        c_web = a.deploy(d_web, web.node_id)
        setup.made.append((web, c_web, ["web1", "web2"]))
        c_gw = a.deploy(d_gw, gw.node_id)
        setup.made.append((gw, c_gw, ["pub"]))
        for cid in (c_web, c_gw):
            c = a.wait(cid, lambda c: c["state"] in ("deployed", "error")
                       and bool(c.get("report")), timeout=180)
            assert c["state"] == "deployed", c["report"]
        report = {w["name"]: w for w in a.contract(c_gw)["report"]["workloads"]}
        assert report["site"]["data"]["url"] == f"https://{HOST}"
        assert report["site"]["data"]["ipv4"] == v4

        # over IPv4 and IPv6, TLS from the gateway's internal CA
        seen: set[bytes] = set()
        for address in (v4, v6):
            until(f"{HOST} at {address}", lambda address=address: (
                (r := answers(setup, gw, f"https://{HOST}/", address)) is not None
                and r.status == 200), timeout=60)
        deadline = time.monotonic() + 30
        while seen != {b"hello-from-web1", b"hello-from-web2"}:  # both in rotation
            assert time.monotonic() < deadline, seen
            r = setup.get(f"https://{HOST}/", v4, gw)
            assert r.status == 200, r
            seen.add(r.body.strip())
        redirect = setup.get(f"http://{HOST}/x?y=1", v6, gw)
        assert redirect.status == 308 and redirect.headers["location"] == f"https://{HOST}/x?y=1"
        # the admin API is on a unix socket only: nothing listens on 2019
        sockets = subprocess.run(["ip", "netns", "exec", gw.host.namespace, "ss", "-Hltn"],
                                 capture_output=True, text=True, check=True).stdout
        assert ":2019" not in sockets and ":443" in sockets
        admin = setup.caddy(gw).admin_socket
        assert admin.exists() and (os.stat(admin).st_mode & 0o077) == 0

        # another twin's proxy for the same name is refused on the gateway
        bob_proxy = {**proxy, "backends": ["http://198.18.1.99:8080"]}
        bob_proxy.pop("network")
        c_bob = b.deploy(b.build({"workloads": [bob_proxy]}, [], None), gw.node_id)
        c = b.wait(c_bob, lambda c: c["state"] in ("deployed", "error")
                   and bool(c.get("report")), timeout=60)
        assert c["state"] == "error"
        why = {w["name"]: w for w in c["report"]["workloads"]}["site"]["message"]
        assert "belongs to twin" in why, why
        assert setup.get(f"https://{HOST}/", v4, gw).status == 200  # alice untouched

        # a port of the gateway's public address forwarded to web2; not twice
        fwd = setup.get(f"http://{v4}:8081/", v4, gw)
        assert fwd.status == 200 and fwd.body.strip() == b"hello-from-web2", fwd
        bob_net = {"type": "network", "name": "net", "ip_range": "10.42.0.0/16",
                   "subnet": "10.42.1.0/24"}
        c_bob2 = b.deploy(b.build({"workloads": [bob_net, {
            **forward, "target": "10.42.1.5:80"}]}, [], None), gw.node_id)
        setup.made.append((gw, c_bob2, []))
        c = b.wait(c_bob2, lambda c: c["state"] in ("deployed", "error")
                   and bool(c.get("report")), timeout=60)
        why = {w["name"]: w for w in c["report"]["workloads"]}["fwd"]["message"]
        assert c["state"] == "error" and "already forwarded" in why, c["report"]
        assert setup.get(f"http://{v4}:8081/", v4, gw).status == 200

        # the container with a public address: reached directly from the WAN
        assert a.contract(c_gw)["public_ips"] == ["198.18.0.200/24"]
        direct = setup.get("http://198.18.0.200:8080/", "198.18.0.200", gw)
        assert direct.body.strip() == b"hello-from-pub", direct

        # one backend cut off: every request still answered, by the other
        web1_ns = container_link_names(node_key(web), WorkloadID(c_web, "web1")).namespace
        subprocess.run(["ip", "-n", web1_ns, "link", "set", "eth0", "down"], check=True)
        time.sleep(2.5)  # a health check interval or two: web1 is marked down
        failures = 0
        bodies: set[bytes] = set()
        for _ in range(20):
            try:
                r = setup.get(f"https://{HOST}/", v4, gw, timeout=6)
                bodies.add(r.body.strip())
                failures += r.status != 200
            except OSError:
                failures += 1
        assert failures == 0 and bodies == {b"hello-from-web2"}, (failures, bodies)
        subprocess.run(["ip", "-n", web1_ns, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "-n", web1_ns, "route", "replace", "default", "via",
                        "10.41.2.1"], check=True)
        back: set[bytes] = set()
        until("web1 back in rotation", lambda: bool(back.add(
            setup.get(f"https://{HOST}/", v4, gw).body.strip()) or b"hello-from-web1" in back),
            timeout=30)

        # Caddy killed: the agent starts a new one with the routes from the contracts
        pid = int((gw.data / "gateway" / "caddy.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        until("a new caddy serving the name", lambda: (
            (r := answers(setup, gw, f"https://{HOST}/", v4)) is not None and r.status == 200),
            timeout=60)
        assert int((gw.data / "gateway" / "caddy.pid").read_text()) != pid

        # the name changes hands: the old owner's route goes at the gateway's next pass
        a.ledger.send(alice, "name.release", {"name": "shop"})
        b.ledger.register_name(bob, "shop")
        until("the route of a name alice no longer owns to go", lambda: (
            (r := answers(setup, gw, f"https://{HOST}/", v4)) is None or r.status != 200),
            timeout=60)
        c = a.wait(c_gw, lambda c: c["state"] == "error", timeout=60)
        why = {w["name"]: w for w in c["report"]["workloads"]}["site"]["message"]
        assert f"belongs to twin {b.twin_id()}" in why, why
        assert setup.get(f"http://{v4}:8081/", v4, gw).status == 200  # the rest runs on

        # cancel: the route, the join of the network and its address go
        names = resource_names(node_key(gw), WorkloadID(c_gw, "net"))
        assert join.joined(names) or _joined_in(gw, names)
        a.cancel(c_gw)
        a.wait(c_gw, lambda c: c["state"] == "deleted", timeout=120)
        cfg = setup.caddy(gw).config()
        assert "site" not in json.dumps(cfg) and HOST not in json.dumps(cfg), cfg
        assert not _joined_in(gw, names)
        links = subprocess.run(["ip", "-n", gw.host.namespace, "-j", "addr"],
                               capture_output=True, text=True, check=True).stdout
        assert "10.41." not in links
        routes = subprocess.run(["ip", "-n", gw.host.namespace, "route"],
                                capture_output=True, text=True, check=True).stdout
        assert "10.41." not in routes
        r = answers(setup, gw, f"https://{HOST}/", v4)
        assert r is None or r.status != 200
        tables = subprocess.run(["ip", "netns", "exec", gw.host.namespace, "nft", "list",
                                 "tables"], capture_output=True, text=True, check=True).stdout
        assert "zgf" not in tables, tables
        assert answers(setup, gw, f"http://{v4}:8081/", v4) is None
        assert "zgp" not in tables
        assert "198.18.0.200" not in links
        assert answers(setup, gw, "http://198.18.0.200:8080/", "198.18.0.200") is None
        assert a.contract(c_gw)["public_ips"] == []


def _joined_in(node: GridNode, names: Any) -> bool:
    assert node.host is not None
    out = subprocess.run(["ip", "-n", node.host.namespace, "-o", "link"],
                         capture_output=True, text=True, check=True).stdout
    return join.join_names(names).inner in out
