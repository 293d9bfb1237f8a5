"""Public IPv6 and port forwards end to end, with a real node agent on a gateway host and a
client host on the other site of the WAN: a container with a public IPv4 and IPv6 address
reached directly on both and leaving from its IPv6 one; a TCP port of the gateway
forwarded over IPv4 and IPv6; a UDP port carrying datagrams both ways over both (a UDP
echo in the container's namespace); cancel removes the container's IPv6 link, its proxy
entry, its filter and the relays, and gives the addresses back."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.client import fetch
from tests.gateway.test_gateway_e2e import Setup, grid_setup, httpd, node_key, until
from zerostack.bot import ThreeBot
from zerostack.bot.spec import BotError
from zerostack.grid import inside
from zerostack.node.network import resource
from zerostack.node.network.plan import container_link_names
from zerostack.node.provisioners import WorkloadID
from zerostack.node.provisioners.public_ip import V6_LINK, v6_names, v6_table

DOMAIN = "gw6.grid.test"
PUB4, PUB6 = "198.18.0.201", "fd00:5a::201"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with grid_setup(tmp_path, (("gw6", 0),)) as s:
        yield s


class UdpEcho:
    """A UDP echo server in a namespace (a thread of the test): answers every datagram
    with `echo:` and the datagram, and records who sent it."""

    def __init__(self, namespace: str, address: str, port: int) -> None:
        with inside(namespace):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.sock.settimeout(0.2)
        self.senders: list[str] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.senders.append(addr[0])
            self.sock.sendto(b"echo:" + data, addr)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


def udp_ask(namespace: str, address: str, port: int, data: bytes) -> bytes | None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with inside(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    try:
        for _ in range(3):  # UDP: the first datagram may meet a neighbour not yet resolved
            sock.sendto(data, (address, port))
            try:
                answer, _ = sock.recvfrom(2048)
                return answer
            except TimeoutError:
                continue
        return None
    finally:
        sock.close()


def ns_out(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          check=True).stdout


def test_public_ipv6_and_forwards_over_both_families(setup: Setup) -> None:
    g = setup.grid
    (gw,) = g.nodes
    assert gw.host is not None and gw.host.address6 is not None
    v4, v6 = gw.host.address, gw.host.address6
    farmer = g.identity("farmer")
    ledger = ThreeBot(g.url, farmer).ledger
    ledger.send(farmer, "node.gateway", {"node": gw.node_id, "domain": DOMAIN,
                                         "ipv4": f"{v4}/24", "ipv6": f"{v6}/64"})
    ledger.send(farmer, "farm.public_ips", {"farm": g.farm, "add": [
        {"ip": f"{PUB4}/24", "gateway": "198.18.0.1"},
        {"ip": f"{PUB6}/64", "gateway": "fd00:5a::1"}]})
    alice, bob = g.identity("alice"), g.identity("bob")
    with ThreeBot(g.url, alice) as a, ThreeBot(g.url, bob) as b:
        a.ledger.register_twin(alice)
        b.ledger.register_twin(bob)
        net = {"type": "network", "name": "net", "ip_range": "10.43.0.0/16",
               "subnet": "10.43.1.0/24"}
        pub = setup.container("pub", httpd("hello-from-pub"), "10.43.1.10")
        pub["network"]["public_ip"] = "ip"
        d = a.build({"workloads": [
            net, pub, {"type": "public_ip", "name": "ip", "v4": True, "v6": True},
            {"type": "port_forward", "name": "web", "port": 8082, "network": "net",
             "target": "10.43.1.10:8080"},
            {"type": "port_forward", "name": "echo", "protocol": "udp", "port": 9000,
             "network": "net", "target": "10.43.1.10:9000"}]}, [], None)
        cid = a.deploy(d, gw.node_id)
        setup.made.append((gw, cid, ["pub"]))
        c = a.wait(cid, lambda c: c["state"] in ("deployed", "error")
                   and bool(c.get("report")), timeout=180)
        assert c["state"] == "deployed", c["report"]
        assert sorted(c["public_ips"]) == sorted([f"{PUB4}/24", f"{PUB6}/64"])
        report = {w["name"]: w for w in c["report"]["workloads"]}
        assert report["ip"]["data"]["ipv6"] == f"{PUB6}/64"
        assert report["echo"]["data"]["public6"] == f"[{v6}]:9000"

        # the farm's IPv6 pool is exhausted: another deployment asking for one is refused
        with pytest.raises(BotError, match="IPv6 pool is exhausted"):
            b.deploy(b.build({"workloads": [
                {"type": "public_ip", "name": "ip", "v4": False, "v6": True}]}, [], None),
                gw.node_id)

        client = setup.client.namespace
        # the container, directly on its public IPv4 and IPv6 addresses
        for address in (PUB4, PUB6):
            until(f"the container at {address}", lambda address=address: (
                _body(client, "http://pub.test:8080/", address) == b"hello-from-pub"),
                timeout=30)
        # ... and what it starts leaves from its public IPv6 address
        pub_ns = container_link_names(node_key(gw), WorkloadID(cid, "pub")).namespace
        assert _source_seen(pub_ns, client, setup.client.address6 or "") == PUB6

        # a TCP port of the gateway, forwarded over IPv4 and relayed over IPv6
        for address in (v4, v6):
            until(f"the forwarded port at {address}", lambda address=address: (
                _body(client, "http://gw.test:8082/", address) == b"hello-from-pub"),
                timeout=30)

        # a UDP port, both ways, over IPv4 and IPv6
        echo = UdpEcho(pub_ns, "10.43.1.10", 9000)
        try:
            for address in (v4, v6):
                assert udp_ask(client, address, 9000, b"ping-" + address.encode()) == (
                    b"echo:ping-" + address.encode()), address
        finally:
            echo.close()
        assert set(echo.senders) == {"10.43.1.254"}  # the gateway's join address

        # cancel: the container's IPv6 link, proxy entry and filter go; so do the relays
        outer, _ = v6_names(node_key(gw), WorkloadID(cid, "ip"))
        table6 = v6_table(node_key(gw), WorkloadID(cid, "ip"))
        gw_ns = gw.host.namespace
        assert outer in ns_out(gw_ns, "ip", "-o", "link")
        assert table6 in ns_out(gw_ns, "nft", "list", "tables")
        a.cancel(cid)
        a.wait(cid, lambda c: c["state"] == "deleted", timeout=120)
        assert outer not in ns_out(gw_ns, "ip", "-o", "link")
        assert table6 not in ns_out(gw_ns, "nft", "list", "tables")
        assert PUB6 not in ns_out(gw_ns, "ip", "-6", "neigh", "show", "proxy")
        assert PUB6 not in ns_out(gw_ns, "ip", "-6", "route")
        listening = ns_out(gw_ns, "ss", "-Hlntu")
        assert ":8082 " not in listening and ":9000 " not in listening, listening
        assert udp_ask(client, v6, 9000, b"gone") is None
        assert a.contract(cid)["public_ips"] == []
        if resource.namespace_exists(pub_ns):
            assert V6_LINK not in ns_out(pub_ns, "ip", "-o", "link")


def _body(ns: str, url: str, address: str) -> bytes | None:
    try:
        answer = fetch(ns, url, address, timeout=3)
    except OSError:
        return None
    return answer.body.strip() if answer.status == 200 else None


def _source_seen(from_ns: str, to_ns: str, to_address: str) -> str:
    """Connect from namespace `from_ns` to a listener in `to_ns`: the source it saw."""
    with inside(to_ns):
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        server.bind((to_address, 0))
        server.listen(1)
        server.settimeout(10)
        port = server.getsockname()[1]
        with inside(from_ns):
            conn = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            conn.settimeout(10)
            deadline = time.monotonic() + 10
            while True:
                try:
                    conn.connect((to_address, port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    conn.close()
                    with inside(from_ns):
                        conn = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                    conn.settimeout(10)
                    time.sleep(0.2)
            peer, _ = server.accept()
            seen = str(peer.getpeername()[0])
            peer.close()
            return seen
        finally:
            conn.close()
    finally:
        server.close()
