"""The network resource plan: names, addresses, peers, routes and rules from a workload."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.node.network.plan import (
    IFNAMSIZ,
    UPLINK_GATEWAY,
    UPLINK_NET,
    allocate_ip,
    container_link_names,
    plan,
    resource_names,
    route_changes,
    uplink_address,
)
from zerostack.node.provisioners import ProvisionError, WorkloadID
from zerostack.workloads import NetworkWorkload, WireguardPeer

NODE = "ab" * 32


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def workload(**kw: object) -> NetworkWorkload:
    data: dict[str, object] = {"name": "net", "ip_range": "10.20.0.0/16",
                               "subnet": "10.20.3.0/24", "wireguard_private_key": key(1),
                               "wireguard_listen_port": 51820}
    data.update(kw)
    return NetworkWorkload.model_validate(data)


def test_plan_of_a_two_peer_network() -> None:
    spec = workload(peers=[
        WireguardPeer(subnet="10.20.1.0/24", wireguard_public_key=key(2),
                      endpoint="198.18.0.10:51820", allowed_ips=["10.20.2.0/24"]),
        WireguardPeer(subnet="10.20.5.0/24", wireguard_public_key=key(3)),
    ])
    res = plan(NODE, WorkloadID(7, "net"), spec)
    assert res.bridge_address == "10.20.3.1/24"
    assert res.routes == ("10.20.1.0/24", "10.20.2.0/24", "10.20.5.0/24")
    assert res.names.namespace == f"zn-{res.names.tag}"
    assert ipaddress.IPv4Address(res.uplink_address) in UPLINK_NET
    cfg = res.wireguard_config()
    assert cfg.splitlines()[:3] == ["[Interface]", f"PrivateKey = {key(1)}", "ListenPort = 51820"]
    assert "AllowedIPs = 10.20.1.0/24, 10.20.2.0/24\nEndpoint = 198.18.0.10:51820" in cfg
    # a peer without endpoint dials in: no keepalive from this side
    assert cfg.rstrip().endswith(f"PublicKey = {key(3)}\nAllowedIPs = 10.20.5.0/24")
    rules = res.resource_rules()
    assert f'oifname "{res.names.uplink_inner}" masquerade' in rules
    assert f'iifname "{res.names.wireguard}" oifname' in rules
    assert "policy drop" in rules
    assert f"ip saddr {res.uplink_address} oifname" in res.node_rules()


def test_a_network_without_peers_takes_the_nodes_key() -> None:
    spec = workload(wireguard_private_key="")
    assert plan(NODE, WorkloadID(1, "net"), spec, private_key=key(9)).private_key == key(9)
    with pytest.raises(ProvisionError, match="is not a WireGuard key"):
        plan(NODE, WorkloadID(1, "net"), spec)


@given(st.text("0123456789abcdef", min_size=64, max_size=64), st.integers(0, (1 << 63) - 1),
       st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True))
def test_names_fit_the_kernel_and_the_uplink_address_is_usable(node: str, contract: int,
                                                               name: str) -> None:
    wid = WorkloadID(contract, name)
    names = resource_names(node, wid)
    links = [*names.links(), *(lambda c: (c.outer, c.inner))(container_link_names(node, wid))]
    assert len(set(links)) == len(links)
    assert all(len(n) <= IFNAMSIZ and n.isalnum() for n in links)
    addr = ipaddress.IPv4Address(uplink_address(names.tag))
    assert addr in UPLINK_NET and str(addr) != UPLINK_GATEWAY
    assert 0 < int(addr) & 0xFF < 255 and (int(addr) >> 8) & 0xFF > 0


def test_names_differ_per_node_contract_and_workload() -> None:
    tags = {resource_names(n, WorkloadID(c, w)).tag
            for n in ("ab" * 32, "cd" * 32) for c in (1, 2) for w in ("net", "net2")}
    assert len(tags) == 8


@given(st.sets(st.integers(2, 254), max_size=253))
def test_allocation_takes_the_lowest_free_container_address(used: set[int]) -> None:
    taken = {f"10.20.3.{h}" for h in used}
    if len(used) == 253:
        with pytest.raises(ProvisionError, match="no free address"):
            allocate_ip("10.20.3.0/24", taken)
        return
    ip = allocate_ip("10.20.3.0/24", taken)
    assert ip not in taken and ip == f"10.20.3.{min(set(range(2, 255)) - used)}"


route = st.integers(0, 20).map(lambda i: f"10.20.{i}.0/24")


@given(st.lists(route, max_size=8), st.sets(route, max_size=8))
def test_route_changes_converge_and_are_idempotent(desired: list[str], actual: set[str]) -> None:
    ch = route_changes(tuple(desired), actual)
    after = (actual - set(ch.remove)) | set(ch.add)
    assert after == set(desired)
    assert not set(ch.add) & actual and set(ch.remove) <= actual
    again = route_changes(tuple(desired), after)
    assert again.add == () and again.remove == ()
