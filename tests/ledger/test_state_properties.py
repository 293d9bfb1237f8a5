"""Property tests: invariants of the state machine hold after any sequence of transactions."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ledger.world import World, cancel_vote, deployment, hashes, requirement, sealed
from zerostack.crypto import (
    MAX_INT,
    CanonicalError,
    Domain,
    Identity,
    SignatureRequest,
    SignatureRequirement,
    approval_digest,
    delete_vote_digest,
    verify,
)
from zerostack.ledger.errors import HTTP_STATUS, LedgerRejected, Rejected
from zerostack.ledger.query import NodeFilter, find_node_records, nodes_json
from zerostack.ledger.state import (
    CONTRACT_STATES,
    FINAL_STATES,
    NEVER,
    ZERO,
    Capacity,
    State,
    apply_with_receipt,
    genesis,
    holds,
    tick,
)
from zerostack.ledger.tx import PAYLOADS

USERS = 3

# capacities: small, past a small node's total, and the most a node (the third) can have
cpus = st.one_of(st.integers(0, 4), st.sampled_from([9, MAX_INT // 3, MAX_INT]))
# deadlines: before and after the pending hold lapses
deadlines = st.one_of(st.integers(-5, 300), st.integers(600, 5000))
create = st.tuples(st.just("create"), st.integers(0, USERS - 1), st.integers(0, 2),
              st.sets(st.integers(0, USERS - 1), max_size=USERS), st.integers(0, 3),
              st.booleans(), cpus, deadlines, st.booleans())
contract_id = st.integers(0, 1000)  # an index into the existing contracts
action = st.one_of(
    create,
    create,
    st.tuples(st.just("approve"), st.integers(0, 10), contract_id,
              st.sampled_from(["stakeholder", "anyone", "wrong_hash", "forged"])),
    st.tuples(st.just("approve"), st.integers(0, 10), contract_id, st.just("stakeholder")),
    st.tuples(st.just("update"), st.integers(0, 4), contract_id,
              cpus, st.booleans(), deadlines),
    st.tuples(st.just("cancel"), st.integers(0, 6), contract_id),
    st.tuples(st.just("report"), st.integers(0, 3), contract_id,
              st.sampled_from([0, 0, 0, 1]),
              st.lists(st.sampled_from(["init", "ok", "error", "deleted"]),
                                          max_size=3), st.booleans()),
    st.tuples(st.just("time"), st.sampled_from([0, 1, 30, 120, 400, 1000])),
    st.tuples(st.just("heartbeat"), st.integers(0, 1), st.integers(0, 4)),
    st.tuples(st.just("name"), st.integers(0, USERS - 1), st.sampled_from(["a", "b"]),
              st.booleans()),
    st.tuples(st.just("replay"), st.integers(0, 50)),
    st.tuples(st.just("bad_nonce"), st.integers(0, USERS - 1), st.integers(-3, 3)),
)


def build() -> tuple[World, list[int], list[tuple[int, int]]]:
    w = World()
    users = [w.twin(Identity.from_seed(bytes([i + 1]) * 32)) for i in range(USERS)]
    farm = w.farm(users[0])
    nodes = [w.node(farm, country=c) for c in ("BE", "NL")]
    nodes.append(w.node(farm, country="FR", cru=MAX_INT))
    return w, users, nodes


def run(w: World, users: list[int], nodes: list[tuple[int, int]], step: tuple[Any, ...]) -> None:
    kind = step[0]
    everyone = users + [t for _, t in nodes]
    ids = sorted(w.state.contracts.keys())

    def pick(i: int) -> int:
        return ids[i % len(ids)] if ids else 1

    if kind == "create":
        _, o, n, signers, wr, approve, cap, deadline, with_delete = step
        owner = users[o]
        others = sorted({users[i] for i in signers} - {owner})
        req = requirement(w, owner, *others, weight_required=min(wr, 1 + len(others)))
        delete = requirement(w, owner, *others, weight_required=1) if with_delete else None
        ids = hashes(len(w.accepted), req, delete)
        payload: dict[str, Any] = {
            "node": nodes[n][0], **ids, "instructions": sealed(),
            "signature_requirement": req,
            "capacity": {"cru": cap}, "deadline": w.time + deadline,
        }
        if approve:
            payload["approval"] = w.approval(owner, ids["deployment_hash"], node=nodes[n][0])
        if delete is not None:
            payload["delete_requirement"] = delete
        w.send(owner, "contract.create", payload)
    elif kind == "approve":
        _, who, ci, how = step
        cid = pick(ci)
        c = w.state.contracts.get(cid)
        twin = everyone[who % len(everyone)]
        if how == "stakeholder" and c is not None:
            signers = sorted(c.proposal.requirement.twins)
            twin = signers[who % len(signers)]
        h = c.proposal.deployment_hash if c else deployment(0)
        if how == "wrong_hash":
            h = deployment(999)
        signer = users[0] if how == "forged" and twin != users[0] else twin
        w.send(twin, "contract.approve", {"contract": cid, "deployment_hash": h,
                                          "signature": w.approves(twin, cid, h, signer)})
    elif kind == "update":
        _, o, ci, n, approve, deadline = step
        cid = pick(ci)
        c = w.state.contracts.get(cid)
        owner = c.owner if c is not None and o == 0 else users[o % USERS]
        req = c.proposal.requirement.to_dict() if c else requirement(w, owner)
        delete = c.delete_requirement.to_dict() if c and c.delete_requirement else None
        ids = hashes(1000 + len(w.accepted) + n % 1000, req, delete)
        payload = {"contract": cid, **ids, "instructions": sealed("u"),
                   "deadline": w.time + deadline, "capacity": {"cru": n}}
        if approve:
            payload["approval"] = w.update_approval(owner, cid, ids["deployment_hash"])
        w.send(owner, "contract.update", payload)
    elif kind == "cancel":
        _, who, ci = step
        cid = pick(ci)
        c = w.state.contracts.get(cid)
        twin = c.owner if c is not None and who < 3 else everyone[who % len(everyone)]
        w.send(twin, "contract.cancel", cancel_vote(w, twin, cid))
    elif kind == "report":
        _, who, ci, bump, states, err = step
        cid = pick(ci)
        c = w.state.contracts.get(cid)
        if c is not None and who < 3:
            twin = w.state.nodes[c.node].twin
        else:
            twin = everyone[who % len(everyone)]
        version = (c.active.version if c and c.active else 1) + bump
        w.send(twin, "contract.report", {
            "contract": cid, "version": version, "error": "boom" if err else "",
            "workloads": [{"name": f"w{i}", "state": s} for i, s in enumerate(states)]})
    elif kind == "time":
        w.time += step[1]
    elif kind == "heartbeat":
        _, n, used = step
        w.send(nodes[n][1], "node.heartbeat", {"used": {"cru": used}})
    elif kind == "name":
        _, o, name, release = step
        w.send(users[o], "name.release" if release else "name.register", {"name": name})
    elif kind == "replay":
        if w.accepted:
            _, tx = w.accepted[step[1] % len(w.accepted)]
            assert isinstance(w.apply_tx(tx), Rejected), "a replayed transaction was accepted"
    elif kind == "bad_nonce":
        _, o, delta = step
        twin = users[o]
        if delta:
            result = w.send(twin, "name.register", {"name": "z"},
                            nonce=max(0, w.nonces[twin] + delta))
            assert isinstance(result, Rejected) and result.code == "bad_nonce"


def check(w: World, finals: dict[int, str]) -> None:
    s = w.state
    sent: dict[int, int] = {}
    for _, tx in w.accepted:
        if isinstance(tx.sender, int):
            sent[tx.sender] = sent.get(tx.sender, 0) + 1
    for tid, twin in s.twins.items():
        assert twin.nonce == 1 + sent.get(tid, 0)
    reserved: dict[int, Capacity] = {nid: ZERO for nid in s.nodes}
    for cid, c in s.contracts.items():
        assert c.state in CONTRACT_STATES
        if cid in finals:
            assert c.state == finals[cid], "a final contract changed"
        if c.state in FINAL_STATES:
            finals[cid] = c.state
            assert cid not in s.deadlines
        # what a contract holds: its active version, and while a version waits for its
        # approvals within its hold, enough for either version
        reserved[c.node] = reserved[c.node] + holds(c, cid in s.lapses)
        assert cid not in s.lapses or cid in s.deadlines
        if c.state == "created":
            assert c.active is None
        if c.state in ("approved", "deployed", "error", "cancelled"):
            assert c.active is not None
        for version in (c.proposal, c.active):
            if version is None:
                continue
            for twin_id, sig in version.approvals.items():
                key = s.twins[twin_id].public_key
                # an approval binds the contract (0 for the owner's, made at create),
                # the version and the node
                bound = [approval_digest(cid, version.version, c.node, version.deployment_hash)]
                if twin_id == c.owner and version.version == 1:
                    bound.append(approval_digest(0, 1, c.node, version.deployment_hash))
                assert any(verify(Domain.APPROVAL, key, d, bytes.fromhex(sig)) for d in bound)
        if c.active is not None:
            assert c.active.requirement.holds(c.active.approvals.keys())
            assert c.owner in c.active.approvals, "the owner approves every version"
        if c.state == "cancelled" or (c.state == "deleted" and c.cancel_votes):
            # removal is authorised by signed votes that meet the delete quorum
            quorum = c.delete_requirement or SignatureRequirement(
                (SignatureRequest(c.owner, s.twins[c.owner].public_key, 1, True),), 1)
            assert quorum.holds(c.cancel_votes.keys())
            for twin_id, sig in c.cancel_votes.items():
                assert verify(Domain.DELETE_VOTE, s.twins[twin_id].public_key,
                              delete_vote_digest(cid, c.node), bytes.fromhex(sig))
        waiting = c.pending and c.state not in FINAL_STATES and c.state != "cancelled"
        assert (cid in s.deadlines) == waiting
        assert cid in s.contracts_by_node[c.node] and cid in s.contracts_by_owner[c.owner]
    for nid, node in s.nodes.items():
        assert node.reserved == reserved[nid]
        assert max(node.reserved.to_dict().values()) <= MAX_INT
        assert nid in s.nodes_by_country[node.country]
    assert s.next_deadline == min(s.deadlines.values(), default=NEVER)
    assert s.next_lapse == min(s.lapses.values(), default=NEVER)
    waiting: dict[int, int] = {}
    for cid in s.deadlines:
        waiting[s.contracts[cid].owner] = waiting.get(s.contracts[cid].owner, 0) + 1
    assert dict(s.pending_by_owner.items()) == waiting
    # GET /nodes answers whatever the contracts did
    listed = orjson.loads(nodes_json(find_node_records(s, NodeFilter(), now=w.time), w.time))
    assert len(listed) == len(s.nodes)
    for name in s.names.values():
        assert name.owner in s.twins


def views(s: State) -> Any:
    return (
        [t.to_dict() for t in s.twins.values()],
        [n.to_dict() for n in s.nodes.values()],
        [c.to_dict() for c in s.contracts.values()],
        [n.to_dict() for n in s.names.values()],
        dict(s.deadlines.items()),
        dict(s.lapses.items()),
        dict(s.pending_by_owner.items()),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=10, max_size=50))
def test_invariants_hold_for_random_sequences(steps: list[tuple[Any, ...]]) -> None:
    w, users, nodes = build()
    finals: dict[int, str] = {}
    for step in steps:
        before = w.state
        count = len(w.accepted)
        run(w, users, nodes, step)
        if len(w.accepted) == count and step[0] != "time":
            # a refused transaction changed nothing (beyond the deadline tick of its block)
            assert views(tick(w.state, w.time)) == views(tick(before, w.time))
        check(w, finals)
    # determinism: replaying the accepted transactions at their times rebuilds the state
    state = genesis()
    for t, tx in w.timeline:
        state = tick(state, t)
        if tx is not None:
            result = apply_with_receipt(state, tx, time=t)
            assert not isinstance(result, Rejected), result
            state = result[0]
    assert views(tick(state, w.time)) == views(tick(w.state, w.time))


FIELDS = sorted({name for model in PAYLOADS.values() for name in model.model_fields}
                | {"junk"})
leaf = st.one_of(
    st.integers(-1, 6), st.booleans(), st.none(), st.text(max_size=8),
    st.sampled_from([deployment(0), "ab" * 64, sealed(), "BE", "ok", "init", "deleted"]),
)
value = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["twin", "weight", "required", "requests",
                                         "weight_required", "country", "cru", "mru",
                                         "name", "state"]), inner, max_size=4),
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PAYLOADS)), st.dictionaries(st.sampled_from(FIELDS), value,
                                                          max_size=6),
       st.integers(0, USERS + 1))
def test_any_payload_is_applied_or_rejected_never_crashes(ttype: str, payload: dict[str, Any],
                                                          who: int) -> None:
    w, users, nodes = build()
    everyone = users + [t for _, t in nodes]
    twin = everyone[who]
    before = w.state
    try:
        tx = w.tx(twin, ttype, payload)
    except (LedgerRejected, CanonicalError):
        return  # refused at the door: fine
    result = w.apply_tx(tx)
    if isinstance(result, Rejected):
        assert result.code in HTTP_STATUS
        assert views(w.state) == views(tick(before, w.time))
