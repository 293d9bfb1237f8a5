"""A node's join of a user network, with the resource's and the node's real nftables
rules: a container's public address (one to one NAT on the node, policy routing in the
resource) answers from the WAN and goes out as that address, also where the kernel
passes bridged frames through the resource's filter (br_netfilter) and where it does
not; no container reaches the node's own namespace through the join."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.node.network.test_resource import Wan, connect, refused, run
from tests.node.network.test_resource import wan as wan  # the fixture
from zerostack.crypto import Identity
from zerostack.grid.hosts import inside, listen_socket
from zerostack.node.billing import TrafficMeter
from zerostack.node.network import join, resource
from zerostack.node.network.plan import container_link_names
from zerostack.node.provisioners import WorkloadID
from zerostack.node.provisioners.base import NodeContext
from zerostack.node.provisioners.public_ip import (
    PublicIpProvisioner,
    read_counters,
    route_out,
    ruleset,
    table_name,
)
from zerostack.workloads import PublicIPWorkload

PUBLIC = "192.0.2.200"


def _recv_all(sock: object, n: int) -> int:
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))  # type: ignore[attr-defined]
        if not chunk:
            break
        got += len(chunk)
    return got


def test_a_public_address_reaches_its_container_through_the_join(wan: Wan,
                                                                  tmp_path: Path) -> None:
    a, b = wan.add("10.30.1.0/24"), wan.add("10.30.2.0/24")  # b: a host on the WAN
    node = NodeContext(data_dir=tmp_path, identity=Identity.generate())
    prov, wid = PublicIpProvisioner(node), WorkloadID(1, "ip")
    spec = PublicIPWorkload(name="ip", v4=True)
    table = table_name(node.identity.public_hex, wid)
    res = a.ensure()
    pub = container_link_names(a.node_key, WorkloadID(1, "pub"))
    other = container_link_names(a.node_key, WorkloadID(1, "other"))
    wan_link = run(a.ns, "ip", "-o", "-4", "addr", "show", "to", f"{a.wan_ip}/32"
                   ).stdout.split()[1]
    try:
        resource.attach_container(res.names, res.bridge_address, pub.namespace, pub.outer,
                                  pub.inner, "10.30.1.20")
        resource.attach_container(res.names, res.bridge_address, other.namespace,
                                  other.outer, other.inner, "10.30.1.21")
        with inside(a.ns):
            joined = join.ensure_join(res)
            route_out(res.names, "10077", "10.30.1.20", joined)
            join.route_to(res, "10.30.1.20")
            subprocess.run(["nft", "-f", "-"], input=ruleset(
                table, PUBLIC, "10.30.1.20", join.join_names(res.names).inner), text=True,
                check=True)
            subprocess.run(["ip", "addr", "add", f"{PUBLIC}/32", "dev", wan_link], check=True)

        # the table's byte counters, read as the node reads them, feed the traffic meter
        meter = TrafficMeter(tmp_path / "traffic.json")
        prov._write(wid, {"address": PUBLIC, "link": wan_link, "private": "10.30.1.20"})
        with inside(a.ns):
            got = prov.traffic(wid, spec)
            assert got is not None and set(got) == {"nat"}
            start = got["nat"]
            meter.sample(1, {"ip/nat": start})
        sent_in, sent_out = 0, 0

        # from the WAN to the public address: the container answers, seeing the client
        server = listen_socket(pub.namespace, "0.0.0.0", 8080)
        with server:
            for _ in range(3):  # several connections: none depends on a cached route
                client = connect(b.ns, PUBLIC, 8080)
                conn, peer = server.accept()
                with conn, client:
                    assert peer[0] == b.wan_ip
                    client.sendall(b"ping" * 25_000)
                    assert _recv_all(conn, 100_000) == 100_000
                    conn.sendall(b"pong" * 10_000)
                    assert _recv_all(client, 40_000) == 40_000
                    sent_in, sent_out = sent_in + 100_000, sent_out + 40_000
        # from the container out: seen as its public address
        far = listen_socket(b.ns, b.wan_ip, 8097)
        with far:
            client = connect(pub.namespace, b.wan_ip, 8097)
            conn, peer = far.accept()
            with conn, client:
                assert peer[0] == PUBLIC
                conn.sendall(b"back" * 20_000)
                assert _recv_all(client, 80_000) == 80_000
                client.sendall(b"up" * 30_000)
                assert _recv_all(conn, 60_000) == 60_000
                sent_in, sent_out = sent_in + 80_000, sent_out + 60_000
        with inside(a.ns):
            got = prov.traffic(wid, spec)
            assert got is not None
            end = got["nat"]
            meter.sample(1, {"ip/nat": end})
        # both ways counted, headers included, by at least the payload sent each way
        assert end[0] - start[0] >= sent_in and end[1] - start[1] >= sent_out, (start, end)
        assert end[0] - start[0] < 2 * sent_in + 100_000  # the payload, not a multiple
        tin, tout = meter.pending(1)
        assert tin >= sent_in and tout >= sent_out
        # the table made again (a reload, a reboot): the counters restart, none is lost
        with inside(a.ns):
            subprocess.run(["nft", "-f", "-"], input=ruleset(
                table, PUBLIC, "10.30.1.20", join.join_names(res.names).inner), text=True,
                check=True)
            assert read_counters(table) == (0, 0)
        server = listen_socket(pub.namespace, "0.0.0.0", 8082)
        with server:
            client = connect(b.ns, PUBLIC, 8082)
            conn, _ = server.accept()
            with conn, client:
                client.sendall(b"x" * 5000)
                assert _recv_all(conn, 5000) == 5000
        with inside(a.ns):
            again = read_counters(table)
            assert again is not None and again[0] >= 5000
            meter.sample(1, {"ip/nat": again})
        assert meter.pending(1)[0] >= tin + 5000

        # the join is no way into the node: a listener on all of the node's addresses is
        # reached by neither container, whatever address of the node they try
        host = listen_socket(a.ns, "0.0.0.0", 8090)
        with host:
            for ctr in (pub, other):
                for address in (joined, a.wan_ip, PUBLIC):
                    assert refused(ctr.namespace, address, 8090), (ctr.namespace, address)
        # nor over IPv6: the join link has none
        inner = join.join_names(res.names).inner
        assert "inet6" not in run(a.ns, "ip", "-6", "-o", "addr", "show", "dev", inner).stdout
        assert f'iifname "{inner}" drop' in run(a.ns, "nft", "list", "table", "inet",
                                                res.names.join_table).stdout
        # while the node itself (a gateway's proxy) reaches a container through its join
        backend = listen_socket(other.namespace, "0.0.0.0", 8081)
        with backend:
            client = connect(a.ns, "10.30.1.21", 8081)
            conn, peer = backend.accept()
            with conn, client:
                assert peer[0] == joined
    finally:
        for ctr in (pub, other):
            resource.detach_container(ctr.namespace)
        with inside(a.ns):
            subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True,
                           check=False)
            join.leave(res.names)
