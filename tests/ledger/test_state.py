"""The state machine: who may do what, the approval quorum, the contract lifecycle, deadlines."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ledger.world import (
    GiB,
    World,
    cancel_vote,
    deployment,
    hashes,
    requirement,
    sealed,
)
from zerostack.crypto import Domain, Identity, hash_obj
from zerostack.ledger.errors import LedgerRejected, Rejected
from zerostack.ledger.state import apply, genesis
from zerostack.ledger.tx import parse_tx, sign_tx


def setup() -> tuple[World, int, int, int, int, int]:
    """A world with owner, two stakeholders, and one node on a farm."""
    w = World()
    owner, s1, s2 = w.twin(), w.twin(), w.twin()
    farm = w.farm(owner)
    node, node_twin = w.node(farm)
    return w, owner, s1, s2, node, node_twin


def create(w: World, owner: int, node: int, req: dict[str, Any], n: int = 0,
           approve: bool = True, **extra: Any) -> int:
    ids = hashes(n, req, extra.get("delete_requirement"))
    payload = {"node": node, **ids, "instructions": sealed(), "signature_requirement": req,
               **extra}
    if approve:
        payload["approval"] = w.approval(owner, ids["deployment_hash"], node=node)
    return int(w.ok(owner, "contract.create", payload)["contract"])


def approve(w: World, twin: int, cid: int, h: str | None = None, **kw: Any) -> Any:
    """`twin` approves contract `cid`'s pending version (or the hash `h` instead)."""
    c = w.state.contracts.get(cid)
    if h is None:
        h = c.proposal.deployment_hash if c is not None else deployment(0)
    return w.send(twin, "contract.approve",
                  {"contract": cid, "deployment_hash": h, "signature": w.approves(twin, cid, h)}, **kw)


def update(w: World, owner: int, cid: int, n: int, req: dict[str, Any] | None = None,
           **extra: Any) -> dict[str, Any]:
    """A contract.update payload for body `n`, approved by `owner`."""
    c = w.state.contracts[cid]
    current = c.proposal.requirement.to_dict()
    delete = c.delete_requirement.to_dict() if c.delete_requirement else None
    ids = hashes(n, req or current, delete)
    payload = {"contract": cid, **ids, "instructions": sealed(f"v{n}"),
               "approval": w.update_approval(owner, cid, ids["deployment_hash"]), **extra}
    if req is not None:
        payload["signature_requirement"] = req
    return payload


def reason(result: Any, code: str) -> str:
    assert isinstance(result, Rejected), result
    assert result.code == code, result
    return result.reason


def test_twin_register_and_nonces() -> None:
    w = World()
    ident = Identity.generate()
    tid = w.twin(ident)
    assert w.state.twins[tid].public_key == ident.public_hex
    assert w.state.twins[tid].nonce == 1
    again = parse_tx(sign_tx(ident, "twin.register", ident.public_hex, 0, {}))
    assert "already twin" in reason(w.apply_tx(again), "conflict")
    w.ok(tid, "name.register", {"name": "a"})
    # replay of the same signed transaction
    replay = w.tx(tid, "name.register", {"name": "a"}, nonce=1)
    assert "already used" in reason(w.apply_tx(replay), "bad_nonce")
    assert "out of order" in reason(w.send(tid, "name.register", {"name": "b"}, nonce=5),
                                    "bad_nonce")
    assert w.state.twins[tid].nonce == 2


def test_bad_signature_and_unknown_sender() -> None:
    w = World()
    tid = w.twin()
    forged = w.tx(tid, "name.register", {"name": "x"}, identity=Identity.generate())
    before = w.state
    assert "signature" in reason(w.apply_tx(forged), "bad_signature")
    assert w.state is before
    unknown = apply(genesis(), w.tx(tid, "name.register", {"name": "x"}), time=1)
    assert "not registered" in reason(unknown, "not_found")


def test_node_register_update_heartbeat() -> None:
    w = World()
    owner = w.twin()
    farm = w.farm(owner)
    assert "taken" in reason(w.send(owner, "farm.create", {"name": "farm"}), "conflict")
    node, twin = w.node(farm, country="BE")
    assert w.state.node_by_twin[twin] == node
    assert "node.update" in reason(w.send(twin, "node.register", {
        "farm": farm, "capacity": {}, "location": {"country": "BE"}}), "conflict")
    assert "farm 9" in reason(w.send(owner, "node.register", {
        "farm": 9, "capacity": {}, "location": {"country": "BE"}}), "not_found")
    w.ok(twin, "node.update", {"farm": farm, "capacity": {"mru": 4 * GiB},
                               "location": {"country": "NL"}})
    assert list(w.state.nodes_by_country["NL"].keys()) == [node]
    assert "BE" not in w.state.nodes_by_country
    w.time += 10
    w.ok(twin, "node.heartbeat", {"used": {"mru": GiB}, "uptime": 5})
    n = w.state.nodes[node]
    assert n.last_heartbeat == w.time and n.free.mru == 3 * GiB
    assert "has no node" in reason(w.send(owner, "node.heartbeat", {}), "not_found")


def test_quorum_two_of_three() -> None:
    w, owner, s1, s2, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1, s2, weight_required=2))
    # owner (required, weight 1) signed with create: 1 of 2 so far
    assert w.state.contracts[cid].state == "created"
    stranger = w.twin()
    assert "not a stakeholder" in reason(approve(w, stranger, cid), "unauthorized")
    assert "deployment" in reason(approve(w, s1, cid, deployment(1)), "state")
    receipt = approve(w, s1, cid)
    assert receipt["state"] == "approved"
    c = w.state.contracts[cid]
    assert c.active is not None and c.active.version == 1 and not c.pending
    assert "already approved" in reason(approve(w, s2, cid), "conflict")


def test_owner_is_always_required() -> None:
    w, owner, s1, s2, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1, s2, weight_required=2), approve=False)
    approve(w, s1, cid)
    approve(w, s2, cid)
    assert w.state.contracts[cid].state == "created"
    assert approve(w, owner, cid)["state"] == "approved"


def test_forged_approval_is_refused() -> None:
    w, owner, s1, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1))
    h = w.state.contracts[cid].proposal.deployment_hash
    forged = w.approves(owner, cid, h)  # the owner's signature passed off as s1's
    result = w.send(s1, "contract.approve", {"contract": cid, "deployment_hash": h,
                                             "signature": forged})
    assert "does not verify" in reason(result, "bad_signature")
    assert s1 not in w.state.contracts[cid].proposal.approvals
    assert "already approved" in reason(approve(w, owner, cid), "conflict")


def test_report_only_by_the_contract_node_and_transitions() -> None:
    w, owner, _s1, _, node, node_twin = setup()
    other_node, other_twin = w.node(w.farm(owner, "f2"))
    assert other_node != node
    cid = create(w, owner, node, requirement(w, owner))
    assert w.state.contracts[cid].state == "approved"
    report = {"contract": cid, "version": 1, "workloads": [{"name": "db", "state": "init"}]}
    assert "only node" in reason(w.send(other_twin, "contract.report", report), "unauthorized")
    assert "only node" in reason(w.send(owner, "contract.report", report), "unauthorized")
    assert w.ok(node_twin, "contract.report", report)["state"] == "approved"
    report["workloads"] = [{"name": "db", "state": "ok", "data": {"port": 9900}}]
    assert w.ok(node_twin, "contract.report", report)["state"] == "deployed"
    assert w.state.contracts[cid].report is not None
    assert "version 2" in reason(w.send(node_twin, "contract.report",
                                        {**report, "version": 2}), "state")
    bad = {"contract": cid, "version": 1, "error": "hash mismatch", "workloads": []}
    assert w.ok(node_twin, "contract.report", bad)["state"] == "error"


def test_report_before_approval_is_refused() -> None:
    w, owner, s1, _, node, node_twin = setup()
    cid = create(w, owner, node, requirement(w, owner, s1))
    result = w.send(node_twin, "contract.report", {"contract": cid, "version": 1})
    assert "no approved version" in reason(result, "state")


def test_only_owner_cancels_then_node_deletes() -> None:
    w, owner, s1, _, node, node_twin = setup()
    cid = create(w, owner, node, requirement(w, owner, s1, weight_required=1),
                 capacity={"mru": 2 * GiB})
    assert w.state.nodes[node].reserved.mru == 2 * GiB
    assert "only the owner" in reason(w.send(s1, "contract.cancel", cancel_vote(w, s1, cid)),
                                      "unauthorized")
    assert w.ok(owner, "contract.cancel", cancel_vote(w, owner, cid))["state"] == "cancelled"
    assert "cancelled" in reason(w.send(owner, "contract.cancel", cancel_vote(w, owner, cid)),
                                 "state")
    assert "cancelled" in reason(approve(w, s1, cid), "state")
    assert w.state.nodes[node].reserved.mru == 2 * GiB  # still held until the node frees it
    gone = {"contract": cid, "version": 1, "workloads": [{"name": "db", "state": "deleted"}]}
    assert w.ok(node_twin, "contract.report", gone)["state"] == "deleted"
    assert w.state.nodes[node].reserved.mru == 0
    assert "deleted" in reason(w.send(node_twin, "contract.report", gone), "state")


def test_cancel_before_approval_deletes_at_once() -> None:
    w, owner, s1, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1))
    assert w.ok(owner, "contract.cancel", cancel_vote(w, owner, cid))["state"] == "deleted"
    assert cid not in w.state.deadlines


def test_delete_requirement_needs_its_quorum() -> None:
    w, owner, s1, s2, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner),
                 delete_requirement=requirement(w, owner, s1, s2, weight_required=2))
    stranger = w.twin()
    assert "delete requirement" in reason(
        w.send(stranger, "contract.cancel", cancel_vote(w, stranger, cid)), "unauthorized")
    assert w.ok(s1, "contract.cancel", cancel_vote(w, s1, cid))["state"] == "approved"
    assert "already voted" in reason(w.send(s1, "contract.cancel", cancel_vote(w, s1, cid)),
                                     "conflict")
    # weight 2 is there, but the owner (always required) has not voted
    assert w.ok(s2, "contract.cancel", cancel_vote(w, s2, cid))["state"] == "approved"
    assert w.ok(owner, "contract.cancel", cancel_vote(w, owner, cid))["state"] == "cancelled"
    votes = w.state.contracts[cid].to_dict()["cancel_votes"]
    assert sorted(votes) == sorted(str(t) for t in (owner, s1, s2))


def test_a_cancel_vote_must_be_signed_for_this_contract() -> None:
    w, owner, _, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner))
    other = create(w, owner, node, requirement(w, owner), n=1)
    wrong = cancel_vote(w, owner, other)
    result = w.send(owner, "contract.cancel", {**wrong, "contract": cid})
    assert "does not verify" in reason(result, "bad_signature")
    with pytest.raises(LedgerRejected, match="signature: Field required"):
        w.send(owner, "contract.cancel", {"contract": cid})
    assert w.state.contracts[cid].state == "approved"


def test_deadline_expires_unapproved_contract() -> None:
    w, owner, s1, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1), deadline=w.time + 60,
                 capacity={"cru": 2})
    assert w.state.nodes[node].reserved.cru == 2
    w.time += 61
    assert "expired" in reason(approve(w, s1, cid), "state")
    assert w.state.contracts[cid].state == "expired"
    assert w.state.nodes[node].reserved.cru == 0
    req = requirement(w, owner)
    assert "not after" in reason(w.send(owner, "contract.create", {
        "node": node, **hashes(3, req), "instructions": sealed(),
        "signature_requirement": req, "deadline": w.time}), "invalid")


def test_update_needs_quorum_again_and_falls_back_on_deadline() -> None:
    w, owner, s1, _, node, node_twin = setup()
    cid = create(w, owner, node, requirement(w, owner, s1))
    approve(w, s1, cid)
    assert w.state.contracts[cid].state == "approved"
    upd = update(w, owner, cid, 2, deadline=w.time + 100)
    assert "only the owner" in reason(w.send(s1, "contract.update", upd), "unauthorized")
    w.ok(owner, "contract.update", upd)
    c = w.state.contracts[cid]
    assert c.pending and c.proposal.version == 2 and c.active is not None
    assert c.active.version == 1 and c.state == "approved"
    assert list(c.proposal.approvals.keys()) == [owner]
    # the node still reports on the active version
    w.ok(node_twin, "contract.report", {"contract": cid, "version": 1,
                                        "workloads": [{"name": "a", "state": "ok"}]})
    w.time += 101
    w.ok(owner, "name.register", {"name": "tick"})  # a block after the deadline
    c = w.state.contracts[cid]
    assert not c.pending and c.proposal.version == 1 and c.state == "deployed"
    # a second update, approved in time
    upd3 = update(w, owner, cid, 3, deadline=w.time + 100)
    h3 = upd3["deployment_hash"]
    w.ok(owner, "contract.update", upd3)
    assert approve(w, s1, cid)["state"] == "approved"
    c = w.state.contracts[cid]
    assert c.active is not None and c.active.deployment_hash == h3 and c.report is None


def test_update_cannot_drop_stakeholders() -> None:
    w, owner, s1, _, node, _ = setup()
    cid = create(w, owner, node, requirement(w, owner, s1, required=(s1,)))
    approve(w, s1, cid)
    w.ok(owner, "contract.update", update(w, owner, cid, 2, requirement(w, owner)))
    c = w.state.contracts[cid]
    assert c.pending, "the active requirement (s1 required) must also hold"
    assert approve(w, s1, cid)["state"] == "approved"


def test_templates_are_content_addressed() -> None:
    w = World()
    a, b = w.twin(), w.twin()
    body = {"workloads": [{"type": "zdb", "size": 1}]}
    digest = w.ok(a, "template.publish", {"name": "zdb", "body": body})["template"]
    assert w.state.templates[digest].author == a
    assert "already published" in reason(
        w.send(b, "template.publish", {"name": "zdb", "body": body}), "conflict")
    other = w.ok(b, "template.publish", {"name": "zdb", "version": "2", "body": body})
    assert other["template"] != digest


def test_names() -> None:
    w = World()
    a, b = w.twin(), w.twin()
    w.ok(a, "name.register", {"name": "shop"})
    assert "taken by twin" in reason(w.send(b, "name.register", {"name": "shop"}), "conflict")
    assert "belongs to twin" in reason(w.send(b, "name.release", {"name": "shop"}),
                                       "unauthorized")
    w.ok(a, "name.release", {"name": "shop"})
    w.ok(b, "name.register", {"name": "shop"})
    assert w.state.names["shop"].owner == b
    assert "not registered" in reason(w.send(a, "name.release", {"name": "nope"}), "not_found")


def test_unknown_references() -> None:
    w, owner, _, _, node, _ = setup()

    def contract(node: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"node": node, **hashes(0, req), "instructions": sealed(),
                "signature_requirement": req}

    assert "node 99" in reason(w.send(owner, "contract.create", contract(
        99, requirement(w, owner))), "not_found")
    assert "stakeholder twin 99" in reason(w.send(owner, "contract.create", contract(
        node, requirement(w, owner, 99))), "not_found")
    assert "exceeds" in reason(w.send(owner, "contract.create", contract(
        node, requirement(w, owner, weight_required=5))), "invalid")
    assert "contract 42" in reason(w.send(owner, "contract.cancel", cancel_vote(w, owner, 42)),
                                   "not_found")


def test_the_ledger_enforces_exactly_the_signed_requirements() -> None:
    """The deployment hash is derived from the requirements: a contract whose requirement
    differs from the one inside the signed deployment is refused, so it cannot be marked
    approved while the node refuses it."""
    w, owner, s1, s2, node, _ = setup()
    signed = requirement(w, owner, s1, required=(s1,))
    ledger = requirement(w, owner, s2)  # what a careless or hostile owner sends instead
    ids = hashes(0, signed)
    result = w.send(owner, "contract.create", {"node": node, **ids, "instructions": sealed(),
                                               "signature_requirement": ledger})
    assert "is not the hash of its body" in reason(result, "invalid")
    # a stakeholder listed with another key than its own is refused too
    forged = requirement(w, owner, s1)
    forged["requests"][1]["key"] = w.keys[s2].public_hex
    result = w.send(owner, "contract.create", {"node": node, **hashes(0, forged),
                                               "instructions": sealed(),
                                               "signature_requirement": forged})
    assert f"stakeholder twin {s1} is listed with key" in reason(result, "invalid")
    # and a requirement without the owner as a required signer
    no_owner = requirement(w, owner, s1)
    no_owner["requests"][0]["required"] = False
    result = w.send(owner, "contract.create", {"node": node, **hashes(0, no_owner),
                                               "instructions": sealed(),
                                               "signature_requirement": no_owner})
    assert "must be listed as a required signer" in reason(result, "invalid")
    assert not w.state.contracts


def test_a_signature_of_another_kind_is_no_transaction() -> None:
    """A stakeholder's key signing the transaction hash in any domain but `transaction`
    (an approval, a manifest...) does not make a transaction of theirs."""
    w, _, s1, _, _, _ = setup()
    body = {"type": "name.register", "sender": s1, "nonce": w.nonces[s1],
            "payload": {"name": "stolen"}}
    digest = hash_obj(body)
    for domain in (Domain.APPROVAL, Domain.DELETE_VOTE, Domain.FLIST_MANIFEST):
        forged = {**body, "signature": w.keys[s1].sign(domain, digest).hex()}
        assert "does not verify" in reason(w.apply_tx(parse_tx(forged)), "bad_signature")
    assert "stolen" not in w.state.names
