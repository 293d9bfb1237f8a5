"""Network workloads and containers joining them: what a deployment may ask, refused
clearly before anything is created on any node."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.workloads.test_deployment import dep
from zerostack.workloads import NetworkWorkload, WorkloadError
from zerostack.workloads.types import parse_endpoint


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def network(name: str = "net", subnet: str = "10.1.1.0/24", peers: list[dict[str, Any]] | None = None,
            **kw: Any) -> dict[str, Any]:
    return {"type": "network", "name": name, "ip_range": "10.1.0.0/16", "subnet": subnet,
            "wireguard_private_key": key(1), "wireguard_listen_port": 51820,
            "peers": peers or [], **kw}


def peer(subnet: str, n: int, **kw: Any) -> dict[str, Any]:
    return {"subnet": subnet, "wireguard_public_key": key(n), **kw}


def container(name: str, ip: str | None, net: str = "net") -> dict[str, Any]:
    attach: dict[str, Any] = {"network": net}
    if ip is not None:
        attach["ip"] = ip
    return {"type": "container", "name": name, "flist": "hub://x", "network": attach}


def test_a_network_with_peers_and_containers_parses() -> None:
    d = dep([network(peers=[peer("10.1.2.0/24", 2, endpoint="198.18.0.11:51820"),
                            peer("10.1.3.0/24", 3, endpoint="[fd00:5a::12]:51820",
                                 allowed_ips=["10.1.4.0/24"])]),
             container("web", "10.1.1.2"), container("db", None), container("b", "10.1.1.254")])
    net = d.workload("net")
    assert isinstance(net, NetworkWorkload)
    assert [str(n) for n in net.peers[1].routes()] == ["10.1.3.0/24", "10.1.4.0/24"]


@pytest.mark.parametrize(
    ("workloads", "needle"),
    [
        ([network(subnet="10.2.1.0/24")], "subnet 10.2.1.0/24 is outside the ip_range 10.1.0.0/16"),
        ([network(subnet="10.1.1.0/25")], "must be a /24"),
        ([network(subnet="10.1.1.1/24")], "is not an IP network in CIDR form"),
        ([network(subnet="fd00::/64")], "is not IPv4"),
        ([network(ip_range="10.0.0.0/7")], "must be a /8 to a /24"),
        ([network(wireguard_private_key="short")], "is not a WireGuard key"),
        ([network(wireguard_private_key="", peers=[peer("10.1.2.0/24", 2)])],
         "needs its wireguard_private_key"),
        ([network(peers=[peer("10.1.1.0/24", 2)])], "overlaps this node's subnet"),
        ([network(peers=[peer("10.1.2.0/24", 2), peer("10.1.2.0/24", 3)])],
         "peers.1: 10.1.2.0/24 overlaps what peers.0 carries"),
        ([network(peers=[peer("10.1.2.0/24", 2), peer("10.1.3.0/24", 3,
                                                       allowed_ips=["10.1.2.128/25"])])],
         "peers.1: 10.1.2.128/25 overlaps what peers.0 carries"),
        ([network(peers=[peer("10.1.2.0/24", 2), peer("10.1.3.0/24", 2)])], "listed twice"),
        ([network(peers=[peer("10.9.2.0/24", 2)])], "outside the ip_range"),
        ([network(peers=[peer("10.1.2.0/24", 2, allowed_ips=["0.0.0.0/0"])])],
         "0.0.0.0/0 is outside the ip_range"),
        ([network(peers=[peer("10.1.2.0/24", 2, wireguard_public_key="x" * 44)])],
         "is not a WireGuard key"),
        ([network(peers=[peer("10.1.2.0/24", 2, endpoint="example.com:51820")])],
         "is not ADDRESS:PORT"),
        ([network(peers=[peer("10.1.2.0/24", 2, endpoint="198.18.0.1:0")])], "is not ADDRESS:PORT"),
        ([network(peers=[peer("10.1.2.0/24", 2, endpoint="198.18.0.1:70000")])],
         "is not ADDRESS:PORT"),
        ([network(peers=[peer("10.1.2.0/24", 2, endpoint="fd00::1:51820")])], "is not ADDRESS:PORT"),
        ([network(peers=[peer("10.1.2.0/24", 2, endpoint="0.0.0.0:51820")])], "not a unicast"),
        # a peer endpoint aims the node's WireGuard socket: never at the node itself or
        # at what only the node reaches
        *[([network(peers=[peer("10.1.2.0/24", 2, endpoint=ep)])], "node-internal address")
          for ep in ("127.0.0.1:6379", "127.9.9.9:1", "[::1]:51820", "169.254.169.254:80",
                     "[fe80::1]:51820", "100.127.0.1:51820", "100.127.3.7:1",
                     "[::ffff:127.0.0.1]:1", "[::ffff:100.127.0.1]:1", "[2002:7f00:1::]:1",
                     "0.1.2.3:1", "240.0.0.1:1", "255.255.255.255:1", "[fec0::1]:1")],
        ([network(ip_range="100.127.0.0/16", subnet="100.127.1.0/24")], "must be private"),
        ([network(ip_range="198.18.0.0/16", subnet="198.18.1.0/24")], "must be private"),
        ([network(ip_range="8.8.0.0/16", subnet="8.8.1.0/24")], "must be private"),
        ([network(), container("a", "10.1.2.5")], "outside the subnet 10.1.1.0/24"),
        ([network(), container("a", "10.1.1.1")], "is reserved"),
        ([network(), container("a", "10.1.1.255")], "is reserved"),
        ([network(), container("a", "10.1.1.0")], "is reserved"),
        ([network(), container("a", "nope")], "is not an IPv4 address"),
        ([network(), container("a", "10.1.1.7"), container("b", "10.1.1.7")],
         "containers 'a' and 'b' both ask for ip 10.1.1.7"),
        ([network(), container("a", None, net="other")], "not a network here"),
    ],
)
def test_bad_networks_are_refused_clearly(workloads: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(WorkloadError, match="invalid deployment") as err:
        dep(workloads)
    assert needle in str(err.value)


def test_endpoints_parse() -> None:
    assert parse_endpoint("198.18.0.10:51820") == ("198.18.0.10", 51820)
    assert parse_endpoint("[fd00:5a::10]:1") == ("fd00:5a::10", 1)
    # other machines on a LAN or the internet are peers
    for ep in ("192.168.2.10:51820", "10.0.0.1:1", "100.64.0.1:51820", "[2001:db8::1]:5"):
        assert parse_endpoint(ep)[1] > 0


@pytest.mark.parametrize("ip_range", ["10.0.0.0/8", "172.16.0.0/12", "172.31.0.0/16",
                                      "192.168.0.0/16"])
def test_private_ranges_are_user_ranges(ip_range: str) -> None:
    first = ipaddress.IPv4Network(ip_range).network_address
    dep([network(ip_range=ip_range, subnet=f"{first + 256}/24")])


@given(st.binary(min_size=32, max_size=32))
def test_every_32_byte_key_is_accepted_and_no_other_length(raw: bytes) -> None:
    dep([network(wireguard_private_key=base64.b64encode(raw).decode())])
    for bad in (raw[:31], raw + b"\0"):
        with pytest.raises(WorkloadError, match="is not a WireGuard key"):
            dep([network(wireguard_private_key=base64.b64encode(bad).decode())])


@given(st.lists(st.integers(0, 255), min_size=1, max_size=8), st.integers(0, 255))
@settings(deadline=None)
def test_peers_are_accepted_exactly_when_their_subnets_are_distinct(thirds: list[int],
                                                                    own: int) -> None:
    peers = [peer(f"10.1.{t}.0/24", i + 2) for i, t in enumerate(thirds)]
    ok = len(set(thirds)) == len(thirds) and own not in thirds
    if ok:
        d = dep([network(subnet=f"10.1.{own}.0/24", peers=peers)])
        net = d.workload("net")
        assert isinstance(net, NetworkWorkload)
        nets = [n for p in net.peers for n in p.routes()]
        assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
        assert all(n.subnet_of(ipaddress.IPv4Network("10.1.0.0/16")) for n in nets)
    else:
        with pytest.raises(WorkloadError, match="overlaps"):
            dep([network(subnet=f"10.1.{own}.0/24", peers=peers)])
