"""Network resources in the kernel: real namespaces, real wireguard-go, real nftables.

Each node is a namespace the test makes on a small WAN (a bridge in a namespace of its
own); resources peer over it and carry ping and TCP through their tunnels. Everything is
removed at the end, also when a test fails."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from zerostack.grid.hosts import inside, listen_socket, pids_in
from zerostack.node.network import resource
from zerostack.node.network.plan import (
    UPLINK_GATEWAY,
    NetworkResource,
    container_link_names,
    plan,
)
from zerostack.node.provisioners import ProvisionError, WorkloadID
from zerostack.workloads import NetworkWorkload

RANGE = "10.30.0.0/16"


def keypair() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                             check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    return private, public


def run(ns: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


@dataclass
class Node:
    """A node's namespace on the test WAN, and the network resource it would run."""

    ns: str
    wan_ip: str
    subnet: str
    port: int
    key: tuple[str, str] = field(default_factory=keypair)
    node_key: str = field(default_factory=lambda: secrets.token_hex(32))
    peers: list[Node] = field(default_factory=list)

    def resource(self) -> NetworkResource:
        spec = NetworkWorkload.model_validate({
            "name": "net", "ip_range": RANGE, "subnet": self.subnet,
            "wireguard_private_key": self.key[0], "wireguard_listen_port": self.port,
            "peers": [{"subnet": p.subnet, "wireguard_public_key": p.key[1],
                       "endpoint": f"{p.wan_ip}:{p.port}"} for p in self.peers]})
        return plan(self.node_key, WorkloadID(1, "net"), spec)

    def ensure(self) -> NetworkResource:
        res = self.resource()
        with inside(self.ns):
            resource.ensure(res)
        return res

    @property
    def rns(self) -> str:
        return self.resource().names.namespace

    @property
    def bridge_ip(self) -> str:
        return self.resource().bridge_address.split("/")[0]


@dataclass
class Wan:
    tag: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"zt{self.tag}-wan"

    def add(self, subnet: str) -> Node:
        i = len(self.nodes) + 1
        node = Node(f"zt{self.tag}-n{i}", f"192.0.2.{i}", subnet, 51000 + i)
        ip("netns", "add", node.ns)
        ip("-n", node.ns, "link", "set", "lo", "up")
        ip("link", "add", f"zt{self.tag}e{i}", "netns", node.ns, "type", "veth", "peer",
           "name", f"zt{self.tag}w{i}", "netns", self.ns)
        ip("-n", self.ns, "link", "set", f"zt{self.tag}w{i}", "master", "wanbr", "up")
        ip("-n", node.ns, "addr", "add", f"{node.wan_ip}/24", "dev", f"zt{self.tag}e{i}")
        ip("-n", node.ns, "link", "set", f"zt{self.tag}e{i}", "up")
        self.nodes.append(node)
        return node


def wireguard_processes(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if argv[:2] == [b"wireguard-go", name.encode()] and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture
def wan() -> Iterator[Wan]:
    require_root()
    for tool in ("wireguard-go", "wg", "nft", "busybox", "nsenter"):
        require_tool(tool)
    w = Wan(secrets.token_hex(3))
    try:
        ip("netns", "add", w.ns)
        ip("-n", w.ns, "link", "add", "name", "wanbr", "type", "bridge")
        ip("-n", w.ns, "link", "set", "wanbr", "up")
        yield w
    finally:
        for node in w.nodes:
            names = node.resource().names
            with inside(node.ns):
                resource.remove(names)
            for pid in pids_in(node.ns) + wireguard_processes(names.wireguard):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", node.ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", w.ns], capture_output=True, check=False)


def pings(src_ns: str, dst: str) -> bool:
    return run(src_ns, "busybox", "ping", "-c", "1", "-W", "2", dst).returncode == 0


def transferred(node: Node) -> int:
    return sum(a + b for a, b in resource.transfer(node.resource().names).values())


def connect(ns: str, host: str, port: int, timeout: float = 3.0) -> socket.socket:
    """A TCP connection made from namespace `ns` (created and connected inside it)."""
    with inside(ns):
        sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def echo_once(server: socket.socket, client: socket.socket, data: bytes) -> bytes:
    conn, _ = server.accept()
    with conn:
        client.sendall(data)
        return conn.recv(len(data))


def pair(wan: Wan) -> tuple[Node, Node]:
    a, b = wan.add("10.30.1.0/24"), wan.add("10.30.2.0/24")
    a.peers, b.peers = [b], [a]
    a.ensure()
    b.ensure()
    return a, b


def test_two_resources_carry_ping_and_tcp_through_the_tunnel(
        wan: Wan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMEMLIMIT", "1GiB")  # the node's own: not the daemon's
    monkeypatch.setenv("GOGC", "off")
    a, b = pair(wan)
    assert pings(a.rns, b.bridge_ip) and pings(b.rns, a.bridge_ip)
    before = transferred(a)
    server = listen_socket(b.rns, b.bridge_ip, 8080)
    try:
        client = connect(a.rns, b.bridge_ip, 8080)
        conn, peer = server.accept()
        with client, conn:
            client.sendall(b"x" * 100_000)
            got = b""
            while len(got) < 100_000:
                got += conn.recv(65536)
        # the resource's own traffic leaves from its bridge address, through the tunnel
        assert peer[0] == a.bridge_ip
    finally:
        server.close()
    assert transferred(a) >= before + 100_000
    assert transferred(b) >= 100_000
    # the kernel's WireGuard when it has one (this machine's kernel has none)
    probe = f"zt{wan.tag}k"
    kernel = subprocess.run(["ip", "-n", a.ns, "link", "add", probe, "type", "wireguard"],
                            capture_output=True, check=False).returncode == 0
    subprocess.run(["ip", "-n", a.ns, "link", "delete", probe], capture_output=True,
                   check=False)
    for node in (a, b):
        assert resource.implementation(node.resource().names) == (
            "kernel" if kernel else "wireguard-go")
    if kernel:
        return
    for node in (a, b):
        assert resource.exists(node.resource().names)
        [pid] = wireguard_processes(node.resource().names.wireguard)
        # the daemon runs with its heap's soft limit, whatever the node's environment says
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"GOMEMLIMIT={resource.WIREGUARD_GO_MEMORY_LIMIT}".encode() in environ
        assert not any(v.startswith(b"GOGC=") for v in environ)
        # the WireGuard socket is on the node's uplink, not inside the resource
        assert f":{node.port}" in run(node.ns, "ss", "-uln").stdout
        assert f":{node.port}" not in run(node.rns, "ss", "-uln").stdout


def test_ensure_again_changes_nothing(wan: Wan) -> None:
    a, b = pair(wan)
    before = {n: run(a.rns, "ip", "-o", *what).stdout
              for n, what in (("l", ("link",)), ("r", ("route",)), ("a", ("addr",)))}
    rules = run(a.rns, "nft", "list", "ruleset").stdout
    a.ensure()
    a.ensure()
    assert {n: run(a.rns, "ip", "-o", *what).stdout
            for n, what in (("l", ("link",)), ("r", ("route",)), ("a", ("addr",)))} == before
    assert run(a.rns, "nft", "list", "ruleset").stdout == rules
    # IPv4 only inside: no address (nor link-local churn) on any of its links
    assert "inet6" not in before["a"]
    assert len(wireguard_processes(a.resource().names.wireguard)) == 1
    assert pings(a.rns, b.bridge_ip)


def test_peers_are_added_and_removed_in_place(wan: Wan) -> None:
    a, b = pair(wan)
    c = wan.add("10.30.3.0/24")
    server = listen_socket(b.rns, b.bridge_ip, 8081)
    try:
        client = connect(a.rns, b.bridge_ip, 8081)
        conn, _ = server.accept()
        with client, conn:
            wg_pid = wireguard_processes(a.resource().names.wireguard)
            client.sendall(b"before")
            assert conn.recv(6) == b"before"
            a.peers, c.peers = [b, c], [a]
            a.ensure()
            c.ensure()
            assert pings(a.rns, c.bridge_ip) and pings(c.rns, a.bridge_ip)
            assert "10.30.3.0/24" in run(a.rns, "ip", "route").stdout
            # the open connection to b went on through the update
            client.sendall(b"during")
            assert conn.recv(6) == b"during"
            a.peers = [b]
            a.ensure()
            assert "10.30.3.0/24" not in run(a.rns, "ip", "route").stdout
            assert not pings(a.rns, c.bridge_ip)
            client.sendall(b"after!")
            assert conn.recv(6) == b"after!"
            assert wireguard_processes(a.resource().names.wireguard) == wg_pid
    finally:
        server.close()


def test_egress_is_masqueraded_and_nothing_enters_from_the_uplink(wan: Wan) -> None:
    a, b = pair(wan)
    # out: the resource reaches the WAN, seen as its node
    outside = listen_socket(b.ns, b.wan_ip, 8082)
    try:
        client = connect(a.rns, b.wan_ip, 8082)
        conn, peer = outside.accept()
        client.close()
        conn.close()
        assert peer[0] == a.wan_ip
    finally:
        outside.close()
    # in: the node itself (and so the WAN) cannot open a connection into the resource
    res = a.resource()
    inner = listen_socket(a.rns, "0.0.0.0", 8083)
    try:
        with inside(a.ns):
            probe = socket.socket()
        probe.settimeout(1.0)
        with probe, pytest.raises(OSError):
            probe.connect((res.uplink_address, 8083))
        ip("-n", b.ns, "route", "add", "10.30.1.0/24", "via", a.wan_ip)
        ip("-n", a.ns, "route", "add", "10.30.1.0/24", "via", res.uplink_address)
        with inside(b.ns):
            probe = socket.socket()
        probe.settimeout(1.0)
        with probe, pytest.raises(OSError):
            probe.connect((a.bridge_ip, 8083))
    finally:
        inner.close()
    assert pings(b.rns, a.bridge_ip)  # through the tunnel it does


def udp_arrives(src_ns: str, src_ip: str, dst_ns: str, dst_ip: str, port: int) -> bool:
    """Whether a datagram sent from `src_ip` in `src_ns` reaches `dst_ip`:`port` in
    `dst_ns` (three tries: the first may wait for a handshake)."""
    with inside(dst_ns):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with inside(src_ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, client:
        server.bind((dst_ip, port))
        server.settimeout(1.5)
        client.bind((src_ip, 0))
        for _ in range(3):
            client.sendto(b"probe", (dst_ip, port))
            try:
                return server.recvfrom(16)[0] == b"probe"
            except TimeoutError:
                continue
    return False


def refused(ns: str, host: str, port: int) -> bool:
    try:
        connect(ns, host, port, timeout=1.0).close()
    except OSError:
        return True
    return False


def test_a_container_reaches_neither_its_node_nor_other_networks_nor_poses_as_others(
        wan: Wan) -> None:
    a, b = wan.add("10.30.1.0/24"), wan.add("10.30.2.0/24")
    a.peers, b.peers = [b], [a]
    a.ensure()
    # b takes from a what a relays too (10.30.9.0/24, a hidden node's): a container on a
    # must still not send as one of those addresses
    spec = NetworkWorkload.model_validate({
        "name": "net", "ip_range": RANGE, "subnet": b.subnet,
        "wireguard_private_key": b.key[0], "wireguard_listen_port": b.port,
        "peers": [{"subnet": a.subnet, "wireguard_public_key": a.key[1],
                   "allowed_ips": ["10.30.9.0/24"], "endpoint": f"{a.wan_ip}:{a.port}"}]})
    with inside(b.ns):
        resource.ensure(plan(b.node_key, WorkloadID(1, "net"), spec))
    # another tenant's network on node a
    other = Node(a.ns, a.wan_ip, "10.30.5.0/24", 51010)
    res_a, res_o = a.resource(), other.resource()
    ctr = container_link_names(a.node_key, WorkloadID(1, "web"))
    try:
        other.ensure()
        resource.attach_container(res_a.names, res_a.bridge_address, ctr.namespace, ctr.outer,
                                  ctr.inner, "10.30.1.2")
        # the node's own namespace: nothing listening there is reachable from the container
        host = listen_socket(a.ns, "0.0.0.0", 8090)
        tenant = listen_socket(other.rns, "0.0.0.0", 8091)
        wide = listen_socket(b.ns, b.wan_ip, 8092)
        try:
            for address in (UPLINK_GATEWAY, a.wan_ip):
                assert refused(ctr.namespace, address, 8090), address
            # nor the other tenant's resource, by its uplink or its bridge address
            for address in (res_o.uplink_address, other.bridge_ip):
                assert refused(ctr.namespace, address, 8091), address
            # the WAN it does reach, seen as its node
            client = connect(ctr.namespace, b.wan_ip, 8092)
            conn, peer = wide.accept()
            client.close()
            conn.close()
            assert peer[0] == a.wan_ip
        finally:
            for sock in (host, tenant, wide):
                sock.close()
        # a host next to the node cannot reach the container by routing straight at the
        # resource's uplink, not even with a datagram that matches a flow of the container
        # (the node's connection tracking holds that flow: the forged one clashes with it)
        with inside(ctr.namespace):
            flow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with inside(b.ns):
            far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with flow, far:
            far.bind((b.wan_ip, 8096))
            far.settimeout(3)
            flow.bind(("10.30.1.2", 40404))
            flow.settimeout(1.5)
            flow.sendto(b"out", (b.wan_ip, 8096))
            data, seen = far.recvfrom(16)
            assert data == b"out" and seen[0] == a.wan_ip
            far.sendto(b"reply", seen)  # the way back through the node's NAT works
            assert flow.recvfrom(16) == (b"reply", (b.wan_ip, 8096))
            ip("-n", b.ns, "route", "add", res_a.uplink_address, "via", a.wan_ip)
            for _ in range(3):
                far.sendto(b"forged", (res_a.uplink_address, 40404))
            with pytest.raises(TimeoutError):
                flow.recvfrom(16)
        # through the tunnel: its own address passes, another's does not
        assert udp_arrives(ctr.namespace, "10.30.1.2", b.rns, b.bridge_ip, 8093)
        ip("-n", ctr.namespace, "addr", "add", "10.30.9.9/32", "dev", "eth0")
        assert not udp_arrives(ctr.namespace, "10.30.9.9", b.rns, b.bridge_ip, 8094)
        # nor may it send as the peer's own addresses back into the node's namespace
        ip("-n", ctr.namespace, "addr", "add", f"{res_a.uplink_address}/32", "dev", "eth0")
        assert not udp_arrives(ctr.namespace, res_a.uplink_address, a.ns, a.wan_ip, 8095)
    finally:
        resource.detach_container(ctr.namespace)
        with inside(a.ns):
            resource.remove(res_o.names)


def test_a_port_taken_on_the_node_is_refused_clearly_and_the_other_network_stays(
        wan: Wan) -> None:
    a, b = pair(wan)
    second = Node(a.ns, a.wan_ip, "10.30.6.0/24", a.port)
    try:
        with pytest.raises(ProvisionError, match=f"WireGuard port {a.port} is taken on this "
                           "node"):
            second.ensure()
    finally:
        with inside(a.ns):
            resource.remove(second.resource().names)
    assert resource.exists(a.resource().names)
    assert pings(a.rns, b.bridge_ip) and pings(b.rns, a.bridge_ip)


def test_kill9_mid_setup_converges_to_one_working_resource(wan: Wan) -> None:
    a, b = pair(wan)
    names = a.resource().names
    with inside(a.ns):
        resource.remove(names)
    code = ("import sys, json; from zerostack.grid.hosts import enter; "
            "from zerostack.node.network import resource; "
            "from tests.node.network.test_resource import from_json; "
            "enter(sys.argv[1]); resource.ensure(from_json(sys.stdin.read()))")
    for delay in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", code, a.ns], stdin=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    [str(Path(__file__).parents[3]), *sys.path])})
        assert proc.stdin is not None
        proc.stdin.write(to_json(a.resource()))
        proc.stdin.close()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        a.ensure()
        assert resource.exists(names)
        assert len(wireguard_processes(names.wireguard)) == 1
        assert pings(a.rns, b.bridge_ip)
        with inside(a.ns):
            resource.remove(names)


def test_a_killed_wireguard_daemon_is_replaced(wan: Wan) -> None:
    a, b = pair(wan)
    names = a.resource().names
    [pid] = wireguard_processes(names.wireguard)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while resource.exists(names) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not resource.exists(names)
    a.ensure()
    assert resource.exists(names) and wireguard_processes(names.wireguard) != [pid]
    assert pings(a.rns, b.bridge_ip)


def test_remove_leaves_nothing(wan: Wan) -> None:
    a, b = pair(wan)
    names = a.resource().names
    with inside(a.ns):
        resource.remove(names)
        resource.remove(names)
    assert not Path(f"/run/netns/{names.namespace}").exists()
    assert wireguard_processes(names.wireguard) == []
    assert not Path(f"/var/run/wireguard/{names.wireguard}.sock").exists()
    links = run(a.ns, "ip", "-o", "link").stdout
    assert all(link not in links for link in names.links())
    assert names.node_table not in run(a.ns, "nft", "list", "tables").stdout
    assert "100.127." not in run(a.ns, "ip", "route").stdout
    assert not pings(b.rns, a.bridge_ip)


def to_json(res: NetworkResource) -> str:
    import dataclasses
    import json
    return json.dumps(dataclasses.asdict(res))


def from_json(text: str) -> NetworkResource:
    import json

    from zerostack.node.network.plan import PeerPlan, ResourceNames
    d = json.loads(text)
    d["names"] = ResourceNames(**d["names"])
    d["peers"] = tuple(PeerPlan(p["public_key"], p["endpoint"], tuple(p["allowed_ips"]))
                       for p in d["peers"])
    return NetworkResource(**d)


@pytest.mark.parametrize("kernel", [True, False])
def test_the_kernels_wireguard_is_taken_when_it_has_one(monkeypatch: pytest.MonkeyPatch,
                                                        kernel: bool) -> None:
    """Which WireGuard `_start_wireguard` makes, with the kernel's answers simulated (the
    kernel here has no WireGuard module, so the kernel path runs nowhere else)."""
    made: set[str] = set()
    calls: list[list[str]] = []

    def fake_ip(ns: str | None, *args: str, check: bool = True) -> str:
        calls.append(["ip", *args])
        if args[:2] == ("link", "add") and args[-2:] == ("type", "wireguard") and kernel:
            made.add(args[2])
        return ""

    def fake_run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        made.add(args[1])  # the daemon made its tun
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(resource, "_ip", fake_ip)
    monkeypatch.setattr(resource, "_links", lambda ns: {n: {} for n in made})
    monkeypatch.setattr(resource.subprocess, "run", fake_run)
    resource._start_wireguard("zn0123456789w")
    assert calls[0] == ["ip", "link", "add", "zn0123456789w", "type", "wireguard"]
    daemons = [c for c in calls if c[0] == resource.WIREGUARD_GO]
    assert daemons == ([] if kernel else [[resource.WIREGUARD_GO, "zn0123456789w"]])
