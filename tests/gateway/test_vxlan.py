"""The farm's VXLAN segment end to end: two gateways of one farm on the grid's two sites
(two WAN subnets behind the router). Their agents join their public bridges with VXLAN
from the ledger's farm data; a container's public IPv4 and IPv6 addresses of the site-0
subnet are reached from a WAN client on the site-0 gateway, then, the contract cancelled
and made again on the site-1 gateway, at the same addresses through the segment; the
new holder's gratuitous ARP and unsolicited neighbour advertisement point the router at
it at once. A gateway that stops being one takes its part of the segment away, and the
site-0 gateway gets its WAN link back as it was."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.test_gateway_e2e import Setup, grid_setup, httpd, until
from tests.gateway.test_public_v6 import _body
from zerostack.bot import ThreeBot
from zerostack.grid import GridNode, inside
from zerostack.node.network.vxlan import SegmentNames

PUB4, PUB6 = "198.18.0.202", "fd00:5a::202"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with grid_setup(tmp_path, (("gwa", 0), ("gwb", 1)), ("bridge",)) as s:
        yield s


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    """`ip -j` in namespace `ns`; [] when what it names does not exist (yet)."""
    out = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                         check=False).stdout
    data: list[dict[str, Any]] = json.loads(out or "[]")
    return data


def ports(node: GridNode, bridge: str) -> set[str]:
    assert node.host is not None
    return {str(link["ifname"]) for link in ip_json(node.host.namespace, "link", "show",
                                                    "master", bridge)}


def links(node: GridNode) -> set[str]:
    assert node.host is not None
    return {str(link["ifname"]) for link in ip_json(node.host.namespace, "link", "show")}


def mac(node: GridNode, link: str) -> str:
    assert node.host is not None
    return str(ip_json(node.host.namespace, "link", "show", "dev", link)[0]["address"])


def router_mac(router: str, address: str) -> str | None:
    for entry in ip_json(router, "neigh", "show", "to", address):
        if entry.get("lladdr"):
            return str(entry["lladdr"])
    return None


def fdb_peers(node: GridNode, vxlan: str) -> set[str]:
    assert node.host is not None
    out = subprocess.run(["ip", "netns", "exec", node.host.namespace, "bridge", "-j", "fdb",
                          "show", "dev", vxlan], capture_output=True, text=True,
                         check=True).stdout
    return {str(r["dst"]) for r in json.loads(out or "[]")
            if r.get("mac") == "00:00:00:00:00:00" and r.get("dst")}


def deploy_public(setup: Setup, bot: ThreeBot, node: GridNode, text: str) -> int:
    net = {"type": "network", "name": "net", "ip_range": "10.44.0.0/16",
           "subnet": "10.44.1.0/24"}
    pub = setup.container("pub", httpd(text), "10.44.1.10")
    pub["network"]["public_ip"] = "ip"
    d = bot.build({"workloads": [net, pub, {"type": "public_ip", "name": "ip", "v4": True,
                                            "v6": True}]}, [], None)
    cid = bot.deploy(d, node.node_id)
    setup.made.append((node, cid, ["pub"]))
    c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                 and bool(c.get("report")), timeout=180)
    assert c["state"] == "deployed", c["report"]
    assert sorted(c["public_ips"]) == sorted([f"{PUB4}/24", f"{PUB6}/64"])
    return cid


def test_a_public_address_moves_between_sites_over_the_segment(setup: Setup) -> None:
    g = setup.grid
    gwa, gwb = g.nodes
    assert gwa.host is not None and gwb.host is not None and g.topology is not None
    router = g.topology.router
    seg = SegmentNames(g.farm)
    farmer = g.identity("farmer")
    ledger = ThreeBot(g.url, farmer).ledger
    for node, domain in ((gwa, "gwa.grid.test"), (gwb, "gwb.grid.test")):
        assert node.host is not None
        ledger.send(farmer, "node.gateway", {
            "node": node.node_id, "domain": domain, "ipv4": f"{node.host.address}/24",
            "ipv6": f"{node.host.address6}/64"})
    ledger.send(farmer, "farm.public_ips", {"farm": g.farm, "add": [
        {"ip": f"{PUB4}/24", "gateway": "198.18.0.1"},
        {"ip": f"{PUB6}/64", "gateway": "fd00:5a::1"}]})

    # both agents join the segment: site 0 (the pool's subnet) with its WAN link as a
    # port of the bridge, site 1 with the VXLAN only
    until("the segment on both gateways", lambda: (
        ports(gwa, seg.bridge) == {gwa.host.uplink if gwa.host else "", seg.vxlan}
        and ports(gwb, seg.bridge) == {seg.vxlan}), timeout=30)
    assert fdb_peers(gwa, seg.vxlan) == {gwb.host.address}
    assert fdb_peers(gwb, seg.vxlan) == {gwa.host.address}
    addrs = {a["local"] for link in ip_json(gwa.host.namespace, "addr", "show", "dev",
                                            seg.bridge) for a in link["addr_info"]}
    assert {gwa.host.address, gwa.host.address6} <= addrs  # moved onto the bridge
    assert mac(gwa, seg.bridge) == mac(gwa, gwa.host.uplink)

    alice = g.identity("alice")
    client = setup.client.namespace
    with ThreeBot(g.url, alice) as a:
        a.ledger.register_twin(alice)
        # on the site-0 gateway: the address is on its own subnet
        c1 = deploy_public(setup, a, gwa, "hello-from-site0")
        for address in (PUB4, PUB6):
            until(f"site 0's container at {address}", lambda address=address: (
                _body(client, "http://pub.test:8080/", address) == b"hello-from-site0"),
                timeout=30)
        assert router_mac(router, PUB4) == mac(gwa, seg.bridge)

        a.cancel(c1)
        a.wait(c1, lambda c: c["state"] == "deleted" and not c["public_ips"], timeout=120)
        # the same addresses, now held on the other site: reached through the segment
        c2 = deploy_public(setup, a, gwb, "hello-from-site1")
        # the new holder announced them: the router points at it without asking
        until("the router to learn the move", lambda: (
            router_mac(router, PUB4) == mac(gwb, seg.bridge)
            and router_mac(router, PUB6) == mac(gwb, seg.bridge)), timeout=5)
        for address in (PUB4, PUB6):
            until(f"site 1's container at {address}", lambda address=address: (
                _body(client, "http://pub.test:8080/", address) == b"hello-from-site1"),
                timeout=30)
        a.cancel(c2)
        a.wait(c2, lambda c: c["state"] == "deleted" and not c["public_ips"], timeout=120)

    # the site-1 node stops being a gateway: both leave the segment, and the site-0
    # gateway's WAN link has its addresses and routes back
    ledger.send(farmer, "node.gateway", {"node": gwb.node_id, "domain": ""})
    until("the segment to go", lambda: not ({seg.bridge, seg.vxlan} & links(gwa))
          and not ({seg.bridge, seg.vxlan} & links(gwb)), timeout=30)
    addrs = {a["local"] for link in ip_json(gwa.host.namespace, "addr", "show", "dev",
                                            gwa.host.uplink) for a in link["addr_info"]}
    assert {gwa.host.address, gwa.host.address6} <= addrs
    routes = ip_json(gwa.host.namespace, "route", "show", "default")
    assert routes and routes[0]["dev"] == gwa.host.uplink
    until("the site-0 gateway reached on the WAN again",
          lambda: reachable(client, gwa.host.address if gwa.host else "", g.status_port),
          timeout=30)


def reachable(ns: str, address: str, port: int) -> bool:
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect((address, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()
