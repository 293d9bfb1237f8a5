"""Solutions on the ledger: one approval per stakeholder over every part, all or nothing."""

from __future__ import annotations

from typing import Any

from tests.ledger.test_state import create, reason
from tests.ledger.world import World, cancel_vote, requirement
from zerostack.crypto import Domain, solution_digest
from zerostack.ledger.state import APPROVED, CREATED


def world(parts: int = 3) -> tuple[World, int, int, int, list[int], dict[str, Any]]:
    w = World()
    owner, legal, budget = w.twin(), w.twin(), w.twin()
    farm = w.farm(owner)
    nodes = [w.node(farm)[0] for _ in range(parts)]
    req = requirement(w, owner, legal, budget, required=(legal, budget))
    return w, owner, legal, budget, nodes, req


def sign(w: World, twin: int, sid: int) -> str:
    sol = w.state.solutions[sid]
    return w.keys[twin].sign(Domain.SOLUTION_APPROVAL, solution_digest(sid, list(sol.parts))).hex()


def solution(w: World, owner: int, nodes: list[int], req: dict[str, Any]) -> tuple[int, list[int]]:
    cids = [create(w, owner, n, req, n=i, approve=False) for i, n in enumerate(nodes)]
    sid = int(w.ok(owner, "solution.create", {"contracts": cids})["solution"])
    return sid, cids


def test_every_part_is_approved_by_one_signature_each_and_only_at_the_end() -> None:
    w, owner, legal, budget, nodes, req = world()
    sid, cids = solution(w, owner, nodes, req)
    assert sorted(p[0] for p in w.state.solutions[sid].parts) == cids
    for twin in (owner, legal):
        receipt = w.ok(twin, "solution.approve", {"solution": sid, "signature": sign(w, twin, sid)})
        # partial approval: nothing anywhere is approved
        assert {p["state"] for p in receipt["parts"]} == {CREATED}
        assert sorted(receipt["nodes"]) == sorted(nodes)
    receipt = w.ok(budget, "solution.approve", {"solution": sid,
                                                "signature": sign(w, budget, sid)})
    assert {p["state"] for p in receipt["parts"]} == {APPROVED}
    for cid in cids:
        c = w.state.contracts[cid]
        assert c.active is not None and c.active.solution == sid
        assert set(c.active.approvals.keys()) == {owner, legal, budget}


def test_bad_solution_approvals_are_refused_and_change_nothing() -> None:
    w, owner, legal, budget, nodes, req = world()
    sid, cids = solution(w, owner, nodes, req)
    stranger = w.twin()
    before = w.state
    assert "not a stakeholder" in reason(w.send(stranger, "solution.approve", {
        "solution": sid, "signature": sign(w, stranger, sid)}), "unauthorized")
    # legal's signature presented by budget, and a signature over other parts
    assert "does not verify" in reason(w.send(budget, "solution.approve", {
        "solution": sid, "signature": sign(w, legal, sid)}), "bad_signature")
    other = w.keys[legal].sign(Domain.SOLUTION_APPROVAL,
                               solution_digest(sid, list(w.state.solutions[sid].parts)[:2])).hex()
    assert "does not verify" in reason(w.send(legal, "solution.approve", {
        "solution": sid, "signature": other}), "bad_signature")
    # an approval of the contract alone is not an approval of the solution
    c = w.state.contracts[cids[0]]
    assert "approve the solution" in reason(w.send(legal, "contract.approve", {
        "contract": cids[0], "deployment_hash": c.proposal.deployment_hash,
        "signature": w.approves(legal, cids[0], c.proposal.deployment_hash)}), "state")
    assert w.state.solutions == before.solutions and w.state.contracts == before.contracts


def test_solution_create_rules() -> None:
    w, owner, legal, _budget, nodes, req = world()
    approved = create(w, owner, nodes[0], req, n=10)
    assert "already has approvals" in reason(w.send(owner, "solution.create",
                                                    {"contracts": [approved]}), "state")
    a = create(w, owner, nodes[0], req, n=11, approve=False)
    other_req = requirement(w, owner, legal)
    b = create(w, owner, nodes[1], other_req, n=12, approve=False)
    assert "another signature requirement" in reason(
        w.send(owner, "solution.create", {"contracts": [a, b]}), "invalid")
    assert "listed twice" in reason(w.send(owner, "solution.create", {"contracts": [a, a]}),
                                    "invalid")
    assert "belongs to" in reason(w.send(legal, "solution.create", {"contracts": [a]}),
                                  "unauthorized")
    sid = int(w.ok(owner, "solution.create", {"contracts": [a]})["solution"])
    assert "already in solution" in reason(w.send(owner, "solution.create",
                                                  {"contracts": [a]}), "conflict")
    assert sid == 1


def test_a_cancelled_part_blocks_the_rest() -> None:
    w, owner, _legal, _budget, nodes, req = world()
    sid, cids = solution(w, owner, nodes, req)
    w.ok(owner, "contract.cancel", cancel_vote(w, owner, cids[1]))
    assert "can no longer be approved" in reason(w.send(owner, "solution.approve", {
        "solution": sid, "signature": sign(w, owner, sid)}), "state")


def test_a_budget_cap_on_the_approval_bounds_the_solution_and_its_later_versions() -> None:
    from tests.ledger.test_billing import policy
    from tests.ledger.test_state import update
    from zerostack.ledger.pricing import monthly
    from zerostack.ledger.state import solution_price

    w, owner, legal, budget, _nodes, req = world(0)
    assert w.govern(policy()) is not None and w.state.policy is not None
    farm = w.farm(owner, "priced")
    nodes = [w.node(farm)[0] for _ in range(2)]
    cids = [create(w, owner, n, req, n=i, approve=False, capacity={"cru": 1, "mru": 1 << 30})
            for i, n in enumerate(nodes)]
    sid = int(w.ok(owner, "solution.create", {"contracts": cids})["solution"])
    price = solution_price(w.state, w.state.solutions[sid])
    c = w.state.contracts[cids[0]]
    assert c.billing is not None
    assert price == 2 * monthly(c.billing.prices, {"cru": 1, "mru": 1 << 30}) > 0
    # a cap under the price: refused, nothing recorded
    before = w.state.solutions
    assert f"costs {price} per month, over the {price - 1}" in reason(w.send(
        budget, "solution.approve", {"solution": sid, "signature": sign(w, budget, sid),
                                     "max_cost": price - 1}), "invalid")
    assert w.state.solutions == before
    # the exact price is within the cap: the approval names it
    for twin, cap in ((owner, None), (legal, None), (budget, price)):
        payload = {"solution": sid, "signature": sign(w, twin, sid)}
        if cap is not None:
            payload["max_cost"] = cap
        receipt = w.ok(twin, "solution.approve", payload)
    assert {p["state"] for p in receipt["parts"]} == {APPROVED}
    assert w.state.solutions[sid].to_dict()["max_cost"] == {str(budget): price}
    # a later version of a part that costs more is refused; one that costs the same is not
    assert f"over the {price} twin {budget} approved" in reason(w.send(
        owner, "contract.update", update(w, owner, cids[0], 5, capacity={
            "cru": 2, "mru": 1 << 30})), "invalid")
    w.ok(owner, "contract.update", update(w, owner, cids[0], 6, capacity={
        "cru": 1, "mru": 1 << 30}))
