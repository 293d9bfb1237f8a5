"""The user's side of a network: subnets, keys, peers and endpoints for every node, and
the user's access, checked by routing a packet hop by hop through the computed peers."""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from zerostack.bot.mesh import (
    MeshError,
    MeshNode,
    UserPeer,
    access_config,
    assign_subnets,
    keypair,
    public_key,
    workloads,
)
from zerostack.workloads import NetworkWorkload

RANGE = "10.20.0.0/16"


def layout(hidden: list[bool], users: int = 0) -> tuple[list[MeshNode], list[UserPeer],
                                                         dict[int, str]]:
    subnets = assign_subnets(RANGE, [], len(hidden) + users)
    nodes = [MeshNode(i + 1, subnets[i], "" if h else f"198.18.0.{10 + i}")
             for i, h in enumerate(hidden)]
    via = next(n.node_id for n in nodes if n.endpoint)
    us = [UserPeer(subnets[len(hidden) + i], keypair()[1], via) for i in range(users)]
    return nodes, us, {n.node_id: keypair()[0] for n in nodes}


def route(wl: dict[int, dict[str, Any]], nodes: list[MeshNode], src: int, dst: str) -> list[int]:
    """The nodes a packet from node `src` to network `dst` crosses, following the peers'
    allowed networks; each hop must be a tunnel one side can dial."""
    by_key = {public_key(wl[n.node_id]["wireguard_private_key"]): n for n in nodes}
    at, path = src, [src]
    for _ in range(len(nodes) + 1):
        me = next(n for n in nodes if n.node_id == at)
        if me.subnet == dst:
            return path
        carrying = [p for p in wl[at]["peers"]
                    if dst in [p["subnet"], *p["allowed_ips"]]]
        assert len(carrying) == 1, (at, dst, wl[at]["peers"])
        nxt = by_key.get(carrying[0]["wireguard_public_key"])
        if nxt is None:  # the user's machine
            return [*path, -1]
        assert me.endpoint or nxt.endpoint, "neither side of a tunnel can dial the other"
        at = nxt.node_id
        path.append(at)
    raise AssertionError(f"loop: {path}")


@given(st.lists(st.booleans(), min_size=1, max_size=7).filter(lambda h: not all(h)),
       st.integers(0, 2))
@settings(deadline=None, max_examples=40)
def test_every_node_reaches_every_node_and_the_users(hidden: list[bool], users: int) -> None:
    nodes, us, keys = layout(hidden, users)
    wl = workloads("net", RANGE, nodes, keys, users=us)
    for n in nodes:
        NetworkWorkload.model_validate(wl[n.node_id])  # every rule of a deployment holds
    for a in nodes:
        for b in nodes:
            path = route(wl, nodes, a.node_id, b.subnet)
            assert len(path) <= 3  # at most one relay
            if a.endpoint or b.endpoint:
                assert len(path) <= 2  # direct whenever one side can dial
        for u in us:
            assert route(wl, nodes, a.node_id, u.subnet)[-1] == -1


def test_subnets_skip_what_is_taken_and_run_out_clearly() -> None:
    assert assign_subnets(RANGE, ["10.20.1.0/24"], 2) == ["10.20.2.0/24", "10.20.3.0/24"]
    assert assign_subnets("10.9.9.0/24", [], 1) == ["10.9.9.0/24"]
    with pytest.raises(MeshError, match="no room for 2 more"):
        assign_subnets("10.9.0.0/23", [], 2)
    with pytest.raises(MeshError, match="at least one node with a public endpoint"):
        workloads("net", RANGE, [MeshNode(1, "10.20.1.0/24")], {1: keypair()[0]})


def test_keys_match_wireguard_tools() -> None:
    require_tool("wg")
    private, public = keypair()
    out = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == public == public_key(private)


def test_access_config_is_wg_quick() -> None:
    nodes, us, _ = layout([False, True], users=1)
    cfg = access_config("K" * 43 + "=", us[0], RANGE, nodes[0], "P" * 43 + "=")
    assert f"Address = {ipaddress.IPv4Network(us[0].subnet).network_address + 1}/24" in cfg
    assert "AllowedIPs = 10.20.0.0/16\nEndpoint = 198.18.0.10:51820" in cfg
    v6 = MeshNode(1, "10.20.1.0/24", "fd00:5a::10")
    assert "Endpoint = [fd00:5a::10]:51820" in access_config("k", us[0], RANGE, v6, "p")
