"""Gateways on the pure state machine: a farmer makes a node a gateway, registers the
farm's public address pool, and contracts take addresses from it one contract per address,
released when they end; bad input is refused and changes nothing."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ledger.test_state import create, reason
from tests.ledger.world import World, cancel_vote, hashes, requirement, sealed
from zerostack.ledger.errors import LedgerRejected, Rejected
from zerostack.ledger.state import apply, tick


def grid() -> tuple[World, int, int, int, int]:
    """farmer, farm, a node on it, a user."""
    w = World()
    farmer, user = w.twin(), w.twin()
    farm = w.farm(farmer)
    node, _ = w.node(farm)
    return w, farmer, farm, node, user


def pool(w: World, farmer: int, farm: int, *ips: str) -> None:
    add = [{"ip": ip, "gateway": "198.18.0.1" if ":" not in ip else "fd00:5a::1"}
           for ip in ips]
    w.ok(farmer, "farm.public_ips", {"farm": farm, "add": add})


def test_a_farmer_makes_a_node_a_gateway() -> None:
    w, farmer, _, node, user = grid()
    gw = {"node": node, "domain": "gw1.grid.test", "ipv4": "198.18.0.10/24",
          "ipv6": "fd00:5a:0:0::10/64"}
    assert "farmer" in reason(w.send(user, "node.gateway", gw), "unauthorized")
    w.ok(farmer, "node.gateway", gw)
    g = w.state.nodes[node].gateway
    assert g is not None and (g.domain, g.ipv4, g.ipv6) == (
        "gw1.grid.test", "198.18.0.10/24", "fd00:5a::10/64")  # one spelling
    assert w.state.nodes[node].to_dict()["gateway"]["domain"] == "gw1.grid.test"
    # a domain is one gateway's
    other, _ = w.node(w.state.nodes[node].farm)
    taken = {**gw, "node": other, "ipv4": "198.18.0.11/24", "ipv6": ""}
    assert "domain of gateway node" in reason(w.send(farmer, "node.gateway", taken),
                                              "conflict")
    # changing its own domain frees the old one; "" makes it an ordinary node again
    w.ok(farmer, "node.gateway", {**gw, "domain": "gw9.grid.test"})
    w.ok(farmer, "node.gateway", taken)
    w.ok(farmer, "node.gateway", {"node": node, "domain": ""})
    assert w.state.nodes[node].gateway is None
    assert set(w.state.gateway_domains) == {"gw1.grid.test"}


def test_bad_gateway_input_is_refused_and_changes_nothing() -> None:
    w, farmer, _, node, _ = grid()
    before = w.state
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"domain": "Not_A.Domain"}, "invalid", "domain"),
        ({"domain": "-gw.grid.test"}, "invalid", "domain"),
        ({"domain": "gw..test"}, "invalid", "domain"),
        ({"ipv4": "198.18.0.10"}, "invalid", "ipv4"),
        ({"ipv4": "fd00::1/64"}, "invalid", "IPv4"),
        ({"ipv4": "127.0.0.1/8"}, "invalid", "unicast"),
        ({"ipv4": "", "ipv6": ""}, "invalid", "needs a public"),
        ({"ipv6": "224.0.0.1/4"}, "invalid", "IPv6"),
        ({"node": 77}, "not_found", "node 77"),
    ]
    for change, code, words in bad:
        payload = {"node": node, "domain": "gw1.grid.test", "ipv4": "198.18.0.10/24",
                   **change}
        try:
            result = w.send(farmer, "node.gateway", payload)
        except LedgerRejected as exc:  # refused by the payload's model, before the state
            result = Rejected(exc.code, str(exc))
        assert isinstance(result, Rejected), change
        assert result.code == code and words in result.reason, (change, result)
    assert w.state.nodes == before.nodes and w.state.gateway_domains == before.gateway_domains


def test_pool_registration() -> None:
    w, farmer, farm, node, user = grid()
    pool(w, farmer, farm, "198.18.0.200/24", "fd00:5a::200/64")
    assert set(w.state.public_ips) == {"198.18.0.200", "fd00:5a::200"}
    add = {"farm": farm, "add": [{"ip": "198.18.0.200/24", "gateway": "198.18.0.1"}]}
    assert "already in the pool" in reason(w.send(farmer, "farm.public_ips", add), "conflict")
    assert "farmer" in reason(w.send(user, "farm.public_ips", {"farm": farm, "add": [
        {"ip": "198.18.0.201/24", "gateway": "198.18.0.1"}]}), "unauthorized")
    outside = {"farm": farm, "add": [{"ip": "198.18.0.202/24", "gateway": "198.18.5.1"}]}
    assert "not in" in reason(w.send(farmer, "farm.public_ips", outside), "invalid")
    # a gateway's own address is not a pool address, and the other way round
    w.ok(farmer, "node.gateway", {"node": node, "domain": "gw1.grid.test",
                                  "ipv4": "198.18.0.10/24"})
    own = {"farm": farm, "add": [{"ip": "198.18.0.10/24", "gateway": "198.18.0.1"}]}
    assert "own address" in reason(w.send(farmer, "farm.public_ips", own), "conflict")
    assert "pool" in reason(w.send(farmer, "node.gateway", {
        "node": node, "domain": "gw1.grid.test", "ipv4": "198.18.0.200/24"}), "conflict")
    w.ok(farmer, "farm.public_ips", {"farm": farm, "remove": ["198.18.0.200/24"]})
    assert set(w.state.public_ips) == {"fd00:5a::200"}
    assert "not in the pool" in reason(w.send(farmer, "farm.public_ips", {
        "farm": farm, "remove": ["198.18.0.200/24"]}), "not_found")


def test_public_ips_one_contract_per_address_released_at_the_end() -> None:
    w, farmer, farm, node, user = grid()
    node_twin = w.state.nodes[node].twin
    pool(w, farmer, farm, "198.18.0.201/24", "198.18.0.200/24", "fd00:5a::200/64")
    req = requirement(w, user)
    a = create(w, user, node, req, n=1, ipv4=1, ipv6=1)
    assert w.state.contracts[a].public_ips == ("198.18.0.200/24", "fd00:5a::200/64")
    assert w.state.contracts[a].to_dict()["public_ips"] == ["198.18.0.200/24",
                                                            "fd00:5a::200/64"]
    assert w.state.public_ips["198.18.0.200"].contract == a
    b = create(w, user, node, req, n=2, ipv4=1)
    assert w.state.contracts[b].public_ips == ("198.18.0.201/24",)
    # exhausted: refused, nothing taken
    before = w.state.public_ips
    ids = hashes(3, req)
    payload = {"node": node, **ids, "instructions": sealed(), "signature_requirement": req,
               "approval": w.approval(user, ids["deployment_hash"], node=node), "ipv4": 1}
    assert "exhausted" in reason(w.send(user, "contract.create", payload), "state")
    assert "IPv6 pool is exhausted" in reason(
        w.send(user, "contract.create", {**payload, "ipv4": 0, "ipv6": 1}), "state")
    assert w.state.public_ips == before
    assert "held by contract" in reason(w.send(farmer, "farm.public_ips", {
        "farm": farm, "remove": ["198.18.0.200/24"]}), "state")
    # a cancelled contract keeps its address until its node reports it removed
    w.ok(user, "contract.cancel", cancel_vote(w, user, a))
    assert w.state.public_ips["198.18.0.200"].contract == a
    w.ok(node_twin, "contract.report", {"contract": a, "version": 1,
                                        "workloads": [{"name": "ip", "state": "deleted"}]})
    assert w.state.contracts[a].public_ips == ()
    assert w.state.public_ips["198.18.0.200"].contract == 0
    c = create(w, user, node, req, n=4, ipv4=1)
    assert w.state.contracts[c].public_ips == ("198.18.0.200/24",)


def test_an_expired_contract_releases_its_address() -> None:
    w, farmer, farm, node, user = grid()
    other = w.twin()
    pool(w, farmer, farm, "198.18.0.200/24")
    cid = create(w, user, node, requirement(w, user, other), ipv4=1, deadline=w.time + 10)
    assert w.state.public_ips["198.18.0.200"].contract == cid
    w.state = tick(w.state, w.time + 11)
    assert w.state.contracts[cid].state == "expired"
    assert w.state.public_ips["198.18.0.200"].contract == 0


def test_racing_contracts_in_one_block_never_share_an_address() -> None:
    """Both creates are valid on the state before either: applied in any order in one
    block, exactly one gets the last address and the other is refused."""
    w, farmer, farm, node, _ = grid()
    users = [w.twin() for _ in range(2)]
    pool(w, farmer, farm, "198.18.0.200/24")
    txs = []
    for i, u in enumerate(users):
        req = requirement(w, u)
        ids = hashes(10 + i, req)
        txs.append(w.tx(u, "contract.create", {
            "node": node, **ids, "instructions": sealed(), "signature_requirement": req,
            "approval": w.approval(u, ids["deployment_hash"], node=node), "ipv4": 1}))
    for order in (txs, txs[::-1]):
        state = w.state
        results = []
        for tx in order:
            r = apply(state, tx, time=w.time)
            results.append(r)
            if not isinstance(r, Rejected):
                state = r
        assert [isinstance(r, Rejected) for r in results] == [False, True]
        assert "exhausted" in results[1].reason  # type: ignore[union-attr]
        holders = [e.contract for e in state.public_ips.values()]
        assert holders == [state.last_contract]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["create", "cancel"]), st.integers(0, 2)),
                max_size=25), st.integers(0, 2**32))
def test_no_address_is_ever_held_twice(ops: list[tuple[str, int]], seed: int) -> None:
    """Property: whatever creates and cancels happen, each pool address is held by at
    most one live contract, and a contract's addresses are exactly those naming it."""
    w, farmer, farm, node, _ = grid()
    node_twin = w.state.nodes[node].twin
    users = [w.twin() for _ in range(3)]
    pool(w, farmer, farm, "198.18.0.200/24", "198.18.0.201/24", "fd00:5a::200/64")
    rnd = random.Random(seed)
    n = 100
    for op, who in ops:
        u = users[who]
        if op == "create":
            n += 1
            req = requirement(w, u)
            ids = hashes(n, req)
            w.send(u, "contract.create", {
                "node": node, **ids, "instructions": sealed(), "signature_requirement": req,
                "approval": w.approval(u, ids["deployment_hash"], node=node),
                "ipv4": rnd.randint(0, 2), "ipv6": rnd.randint(0, 1)})
        else:
            mine = [c.id for c in w.state.contracts.values()
                    if c.owner == u and c.state in ("approved", "deployed")]
            if mine:
                cid = rnd.choice(mine)
                w.ok(u, "contract.cancel", cancel_vote(w, u, cid))
                w.ok(node_twin, "contract.report", {"contract": cid, "version": 1,
                                                    "workloads": []})
        held: dict[str, int] = {}
        for c in w.state.contracts.values():
            for ip in c.public_ips:
                assert ip not in held, (ip, held[ip], c.id)
                held[ip] = c.id
                assert c.state not in ("deleted", "expired")
        for key, entry in w.state.public_ips.items():
            assert held.get(entry.ip, 0) == entry.contract, key
