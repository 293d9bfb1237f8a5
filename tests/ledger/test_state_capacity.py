"""Reserved capacity: what contracts hold on their node, how long an unapproved one holds
it, and the bounds that keep one twin from filling (or overflowing) a node."""

from __future__ import annotations

import pytest

from tests.ledger.test_state import approve, create, reason, setup, update
from tests.ledger.world import World, hashes, requirement, sealed
from zerostack.crypto import MAX_INT
from zerostack.ledger import state as ledger_state
from zerostack.ledger.state import PENDING_HOLD, tick


def test_an_unapproved_contract_holds_capacity_only_for_a_while() -> None:
    w, owner, s1, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1), capacity={"cru": 8},
                 deadline=w.time + 7 * 24 * 3600)
    assert w.state.nodes[node].reserved.cru == 8 and w.state.nodes[node].free.cru == 0
    w.time += PENDING_HOLD
    assert tick(w.state, w.time).nodes[node].reserved.cru == 8
    w.time += 1
    lapsed = tick(w.state, w.time)
    assert lapsed.nodes[node].reserved.cru == 0 and lapsed.nodes[node].free.cru == 8
    assert lapsed.contracts[cid].state == "created"  # still open for its approvals
    # the quorum takes the capacity again
    assert approve(w, s1, cid)["state"] == "approved"
    assert w.state.nodes[node].reserved.cru == 8 and cid not in w.state.lapses


def test_a_pending_update_holds_either_version_then_only_the_active_one() -> None:
    w, owner, s1, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner), capacity={"cru": 2, "mru": 4})
    w.ok(owner, "contract.update", update(w, owner, cid, 5, requirement(w, owner, s1),
                                          capacity={"cru": 6, "mru": 1},
                                          deadline=w.time + 24 * 3600))
    reserved = w.state.nodes[node].reserved
    assert (reserved.cru, reserved.mru) == (6, 4)
    w.time += PENDING_HOLD + 1
    reserved = tick(w.state, w.time).nodes[node].reserved
    assert (reserved.cru, reserved.mru) == (2, 4)


def test_a_contract_asking_more_than_the_node_has_is_refused() -> None:
    w, owner, _, _, node, _ = setup()
    before = w.state
    req = requirement(w, owner)
    ids = hashes(1, req)
    result = w.send(owner, "contract.create", {
        "node": node, **ids, "instructions": sealed(),
        "signature_requirement": req, "capacity": {"cru": 9},
        "approval": w.approval(owner, ids["deployment_hash"], node=node)})
    assert f"asks for 9 cru but node {node} has 8 in all" in reason(result, "invalid")
    assert w.state.contracts == before.contracts and w.state.nodes == before.nodes


def test_one_twin_has_a_bounded_number_of_contracts_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_state, "MAX_PENDING_PER_TWIN", 2)
    w, owner, s1, _, node, _ = setup()
    first = create(w, owner, node, requirement(w, owner, s1), n=1)
    create(w, owner, node, requirement(w, owner, s1), n=2)
    req = requirement(w, owner, s1)
    ids = hashes(3, req)
    third = {"node": node, **ids, "instructions": sealed(), "signature_requirement": req,
             "approval": w.approval(owner, ids["deployment_hash"], node=node)}
    assert "already has 2 contracts waiting" in reason(
        w.send(owner, "contract.create", third), "state")
    assert w.state.pending_by_owner[owner] == 2
    # approved (or cancelled, or expired) contracts no longer count
    approve(w, s1, first)
    assert w.state.pending_by_owner[owner] == 1
    create(w, owner, node, requirement(w, owner, s1), n=3)
    # a contract the owner approves alone never waits, so it is never capped
    create(w, owner, node, requirement(w, owner), n=4)


def test_reservations_cannot_pass_2_53() -> None:
    """Four contracts holding 2^62 CPUs each used to push a node's sum past 64 bits, and
    GET /nodes answered 500. Each is now bounded, and so is their sum."""
    w = World()
    owner = w.twin()
    node, _ = w.node(w.farm(owner), cru=MAX_INT)
    for n in range(2):
        req = requirement(w, owner)
        ids = hashes(n, req)
        payload = {"node": node, **ids, "instructions": sealed(),
                   "signature_requirement": req, "capacity": {"cru": MAX_INT},
                   "approval": w.approval(owner, ids["deployment_hash"], node=node)}
        result = w.send(owner, "contract.create", payload)
    assert "would pass 2^53 - 1" in reason(result, "state")
    assert w.state.nodes[node].reserved.cru == MAX_INT
    assert len(w.state.contracts) == 1
