"""Property tests of billing: over any sequence of transfers, deployments, consumption
reports, cancels and period ticks, money is conserved, no span of time is charged twice,
and replaying the chain reaches the same balances."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ledger.test_billing import PERIOD, policy
from tests.ledger.world import GiB, World, cancel_vote, hashes, requirement, sealed
from zerostack.crypto import Identity
from zerostack.ledger.errors import Rejected
from zerostack.ledger.state import GRACE, State, apply_with_receipt, genesis, tick

USERS = 3

faucet = st.tuples(st.just("faucet"), st.integers(0, USERS - 1),
                   st.sampled_from([10, 5_000, 100_000, 2_000_000]))
create = st.tuples(st.just("create"), st.integers(0, USERS - 1), st.integers(0, 1),
                   st.integers(0, 4), st.integers(0, 3), st.booleans(), st.booleans())
clock = st.tuples(st.just("time"), st.sampled_from([1, 60, 1800, PERIOD, 3 * PERIOD,
                                                    10 * PERIOD]))
action = st.one_of(
    faucet, create, clock, faucet, create, clock,
    st.tuples(st.just("transfer"), st.integers(0, USERS), st.integers(0, USERS),
              st.integers(1, 30_000)),
    st.tuples(st.just("create"), st.integers(0, USERS - 1), st.integers(0, 1),
              st.integers(0, 4), st.integers(0, 3), st.booleans(), st.booleans()),
    st.tuples(st.just("approve"), st.integers(0, 50)),
    st.tuples(st.just("consumption"), st.integers(0, 50),
              st.sampled_from([-1, -1, -1, -2, 0, 1]), st.integers(0, 3),
              st.sampled_from([0, GiB, 3 * GiB, 20 * GiB]), st.sampled_from([False] * 3 + [True])),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("update"), st.integers(0, 50), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("report"), st.integers(0, 50), st.sampled_from(["ok", "error"])),
    st.tuples(st.just("time"), st.sampled_from([1, 60, 1800, PERIOD, 3 * PERIOD,
                                                10 * PERIOD])),
)


def build() -> tuple[World, list[int], list[tuple[int, int]], int, str]:
    w = World()
    assert not isinstance(w.govern(policy()), Rejected)
    users = [w.twin(Identity.from_seed(bytes([i + 1]) * 32)) for i in range(USERS)]
    farmer = w.twin()
    farm = w.farm(farmer)
    nodes = [w.node(farm, country=c) for c in ("BE", "NL")]
    author = w.twin()
    tpl = w.ok(author, "template.publish", {"name": "t", "body": {}, "author_share": 1500})
    return w, users, nodes, farmer, str(tpl["template"])


def run(w: World, users: list[int], nodes: list[tuple[int, int]], farmer: int, tpl: str,
        step: tuple[Any, ...]) -> None:
    kind = step[0]
    ids = sorted(w.state.contracts.keys())

    def pick(i: int) -> int:
        return ids[i % len(ids)] if ids else 1

    if kind == "faucet":
        w.send(users[step[1]], "balance.faucet", {"amount": step[2]})
    elif kind == "transfer":
        everyone = [*users, farmer]
        w.send(everyone[step[1]], "balance.transfer",
               {"to": everyone[step[2]], "amount": step[3]})
    elif kind == "create":
        _, o, n, cru, ipv4, with_template, co_signed = step
        owner = users[o]
        other = users[(o + 1) % USERS]
        req = requirement(w, owner, *([other] if co_signed else []))
        h = hashes(len(w.accepted), req)
        payload: dict[str, Any] = {
            "node": nodes[n][0], **h, "instructions": sealed(), "signature_requirement": req,
            "capacity": {"cru": cru, "mru": cru * GiB}, "ipv4": ipv4,
            "approval": w.approval(owner, h["deployment_hash"], node=nodes[n][0])}
        if with_template:
            payload["template"] = tpl
        w.send(owner, "contract.create", payload)
    elif kind == "approve":
        cid = pick(step[1])
        c = w.state.contracts.get(cid)
        if c is None or not c.pending:
            return
        for twin in sorted(c.proposal.requirement.twins - set(c.proposal.approvals.keys())):
            h = c.proposal.deployment_hash
            w.send(twin, "contract.approve", {"contract": cid, "deployment_hash": h,
                                              "signature": w.approves(twin, cid, h)})
    elif kind == "consumption":
        _, ci, delta, cru, traffic, wrong_node = step
        cid = pick(ci)
        c = w.state.contracts.get(cid)
        if c is None:
            return
        twin = w.state.nodes[c.node].twin
        if wrong_node:
            twin = next(t for n, t in nodes if n != c.node)
        period = w.time // PERIOD + delta
        result = w.send(twin, "contract.consumption", {
            "contract": cid, "period": max(0, period),
            "reserved": {"cru": cru}, "traffic_in": traffic, "traffic_out": 0})
        if wrong_node:
            assert isinstance(result, Rejected) and result.code == "unauthorized"
    elif kind == "update":
        _, ci, cru, approve = step
        cid = pick(ci)
        c = w.state.contracts.get(cid)
        if c is None:
            return
        req = c.proposal.requirement.to_dict()
        h = hashes(5000 + len(w.accepted), req)
        payload = {"contract": cid, **h, "instructions": sealed("u"),
                   "capacity": {"cru": cru, "mru": cru * GiB}}
        if approve:
            payload["approval"] = w.update_approval(c.owner, cid, h["deployment_hash"])
        w.send(c.owner, "contract.update", payload)
    elif kind == "cancel":
        cid = pick(step[1])
        c = w.state.contracts.get(cid)
        if c is not None:
            w.send(c.owner, "contract.cancel", cancel_vote(w, c.owner, cid))
    elif kind == "report":
        cid = pick(step[1])
        c = w.state.contracts.get(cid)
        if c is not None and c.active is not None:
            w.send(w.state.nodes[c.node].twin, "contract.report", {
                "contract": cid, "version": c.active.version,
                "workloads": [{"name": "a", "state": step[2]}]})
    elif kind == "time":
        w.time += step[1]
        # an empty block: the boundary is charged even when nobody sends anything
        w.state = tick(w.state, w.time)
        w.timeline.append((w.time, None))


def check(w: World) -> None:
    s = w.state
    assert all(b >= 0 for b in s.balances.values())
    assert sum(s.balances.values()) + s.treasury == s.supply
    for cid, rows in s.charges.items():
        # no span of ledger time is charged twice: each charge starts where the last ended
        for before, after in pairwise(rows):
            assert after.start >= before.end, (cid, before, after)
        for row in rows:
            assert row.total == sum(row.amounts.values())
            if row.status != "unpaid":
                assert row.farmer_amount + row.author_amount + row.treasury_amount == row.total
        c = s.contracts[cid]
        assert c.billing is not None
        paid = sum(r.total for r in rows if r.status != "unpaid")
        assert paid == c.billing.charged
    for cid in s.billable:
        c = s.contracts[cid]
        assert c.state in ("approved", "deployed", "error")
        assert c.billing is not None and c.billing.since <= w.time
    for cid, until in s.graces.items():
        c = s.contracts[cid]
        assert c.state == GRACE and c.billing is not None and c.billing.grace_until == until
    for cid, c in s.contracts.items():
        if c.state == GRACE:
            assert cid in s.graces
        if c.state in ("cancelled", "deleted", "expired"):
            assert cid not in s.billable and cid not in s.graces


def replayed(w: World) -> State:
    state = genesis(w.operator.public_hex)
    for time, tx in w.timeline:
        state = tick(state, time)
        if tx is not None:
            result = apply_with_receipt(state, tx, time=time)
            assert not isinstance(result, Rejected), result
            state = result[0]
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=10, max_size=80))
def test_money_is_conserved_and_replay_agrees(steps: list[tuple[Any, ...]]) -> None:
    w, users, nodes, farmer, tpl = build()
    for step in steps:
        run(w, users, nodes, farmer, tpl, step)
        check(w)
    again, twice = replayed(w), replayed(w)
    for other in (again, twice):
        assert dict(other.balances) == dict(w.state.balances)
        assert other.treasury == w.state.treasury
        assert dict(other.charges) == dict(w.state.charges)
        assert dict(other.contracts) == dict(w.state.contracts)
