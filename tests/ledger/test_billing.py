"""Balances, prices, consumption reports, billing at period boundaries and the grace period,
on the pure state machine."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ledger.world import GiB, World, cancel_vote, hashes, requirement, sealed
from zerostack.crypto import MAX_INT, Domain, Identity
from zerostack.ledger.errors import LedgerRejected, Rejected
from zerostack.ledger.pricing import HOUR, split
from zerostack.ledger.state import APPROVED, CANCELLED, DEPLOYED, GRACE, State
from zerostack.ledger.tx import parse_tx, sign_tx

PERIOD = 3600
PRICES = {"cru": 1000, "mru": 500, "sru": 20, "hru": 5, "ipv4": 800, "names": 100,
          "traffic": 50}
MAXIMA = {k: v * 10 for k, v in PRICES.items()}


def policy(**over: Any) -> dict[str, Any]:
    return {"prices": PRICES, "max": MAXIMA, "period": PERIOD, "grace": 2 * PERIOD,
            "treasury_share": 1000, "max_author_share": 2000, "max_traffic": 10 * GiB,
            "dev_faucet": True, **over}


def refused(result: Receipt | Rejected, code: str, words: str = "") -> Rejected:
    assert isinstance(result, Rejected), result
    assert result.code == code, result
    assert words in result.reason, result.reason
    return result


Receipt = dict[str, Any]


def money(s: State) -> int:
    return sum(s.balances.values()) + s.treasury


class Grid:
    """A priced development grid: a farmer with one node, users with money."""

    def __init__(self, **over: Any) -> None:
        self.w = w = World()
        assert not isinstance(w.govern(policy(**over)), Rejected)
        self.farmer = w.twin()
        self.farm = w.farm(self.farmer)
        self.node, self.node_twin = w.node(self.farm)
        self.user = w.twin()

    def fund(self, twin: int, amount: int) -> Receipt:
        return self.w.ok(twin, "balance.faucet", {"amount": amount})

    def contract(self, owner: int | None = None, cru: int = 2, mru: int = 4 * GiB,
                 **extra: Any) -> int:
        w = self.w
        owner = owner or self.user
        req = requirement(w, owner)
        ids = hashes(len(w.accepted), req)
        payload = {"node": self.node, **ids, "instructions": sealed(),
                   "signature_requirement": req, "capacity": {"cru": cru, "mru": mru},
                   "approval": w.approval(owner, ids["deployment_hash"], node=self.node),
                   **extra}
        return int(w.ok(owner, "contract.create", payload)["contract"])

    def hourly(self, cru: int = 2, mru: int = 4 * GiB) -> int:
        return cru * PRICES["cru"] + mru // GiB * PRICES["mru"]

    def to_boundary(self, periods: int = 1) -> None:
        w = self.w
        w.time = (w.time // PERIOD + periods) * PERIOD
        w.apply_tx(w.tx(self.user, "balance.transfer", {"to": self.farmer, "amount": 1}))


def test_faucet_only_on_a_development_grid() -> None:
    w = World()
    t = w.twin()
    refused(w.send(t, "balance.faucet", {"amount": 5}), "unauthorized", "no faucet")
    assert not isinstance(w.govern(policy(dev_faucet=False)), Rejected)
    refused(w.send(t, "balance.faucet", {"amount": 5}), "unauthorized", "no faucet")
    # the faucet is fixed by the first policy: a later one cannot switch it on
    refused(w.govern(policy(dev_faucet=True)), "invalid", "dev_faucet is fixed")
    assert w.state.balances[t] == 0


def test_only_the_governing_key_sets_the_policy() -> None:
    w = World()
    intruder = Identity.generate()
    refused(w.govern(policy(), identity=intruder), "bad_signature")
    t = w.twin()
    refused(w.send(t, "grid.policy", policy()), "unauthorized", "governing key")
    assert w.state.policy is None
    assert not isinstance(w.govern(policy()), Rejected)
    refused(w.govern(policy(), nonce=0), "bad_nonce")
    refused(w.govern(policy(period=60)), "invalid", "period is fixed")
    refused(w.govern(policy(effective=w.time - 1)), "invalid", "never retroactive")
    refused(w.govern(policy(prices={**PRICES, "cru": MAXIMA["cru"] + 1})), "invalid",
            "above the grid's maximum")
    refused(w.govern(policy(treasury_share=9000)), "invalid", "basis points")


def test_transfer_moves_money_and_refuses_bad_amounts() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 1000)
    w.ok(g.user, "balance.transfer", {"to": g.farmer, "amount": 400})
    assert (w.state.balances[g.user], w.state.balances[g.farmer]) == (600, 400)
    before = w.state
    refused(w.send(g.user, "balance.transfer", {"to": g.farmer, "amount": 601}), "state",
            "less than the 601")
    refused(w.send(g.user, "balance.transfer", {"to": 999, "amount": 1}), "not_found")
    for amount in (0, -5):
        with pytest.raises(LedgerRejected, match="amount"):
            parse_tx(sign_tx(w.keys[g.user], "balance.transfer", g.user, w.nonces[g.user],
                             {"to": g.farmer, "amount": amount}))
    for amount in (MAX_INT + 1, 2**64):  # cannot even be signed: a forged envelope
        with pytest.raises(LedgerRejected, match="amount"):
            parse_tx({"type": "balance.transfer", "sender": g.user, "nonce": 9,
                      "payload": {"to": g.farmer, "amount": amount}, "signature": "0" * 128})
    # minting past 2^53 - 1 in all is refused: no balance can overflow
    refused(w.send(g.farmer, "balance.faucet", {"amount": MAX_INT}), "invalid", "2^53")
    assert w.state.balances == before.balances
    assert money(w.state) == w.state.supply == 1000


def test_a_period_is_charged_once_and_split() -> None:
    g = Grid()
    w = g.w
    author = w.twin()
    tpl = w.ok(author, "template.publish", {"name": "web", "body": {}, "author_share": 5000})
    g.fund(g.user, 10**9)
    cid = g.contract(template=tpl["template"])
    c = w.state.contracts[cid]
    assert c.state == APPROVED and c.billing is not None
    assert c.billing.author_share == 2000  # capped by the policy
    start = w.time
    g.to_boundary()
    rows = w.state.charges[cid]
    assert len(rows) == 1
    row = rows[0]
    assert (row.start, row.end) == (start, w.time // PERIOD * PERIOD)
    expected = g.hourly() * (row.end - row.start) // HOUR
    assert row.total == expected == sum(row.amounts.values())
    assert (row.farmer_amount, row.author_amount, row.treasury_amount) == split(
        expected, 1000, 2000)
    assert w.state.paid_out[g.farmer] == row.farmer_amount
    assert w.state.paid_out[author] == row.author_amount
    assert w.state.treasury == row.treasury_amount
    # more blocks within the same period charge nothing more
    w.time += 10
    w.ok(g.user, "balance.transfer", {"to": g.farmer, "amount": 1})
    assert len(w.state.charges[cid]) == 1
    g.to_boundary()
    assert len(w.state.charges[cid]) == 2
    assert w.state.charges[cid][1].total == g.hourly()
    assert money(w.state) == w.state.supply


def test_prices_are_recorded_with_the_contract() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 10**9)
    refused(w.send(g.user, "farm.prices", {"farm": g.farm, "prices": PRICES}), "unauthorized")
    refused(w.send(g.farmer, "farm.prices",
                   {"farm": g.farm, "prices": {**PRICES, "cru": MAXIMA["cru"] * 2}}),
            "invalid", "above the grid's maximum")
    refused(w.send(g.farmer, "farm.prices",
                   {"farm": g.farm, "prices": PRICES, "effective": w.time - 1}),
            "invalid", "never retroactive")
    w.ok(g.farmer, "farm.prices", {"farm": g.farm, "prices": {**PRICES, "cru": 2000}})
    cid = g.contract()
    assert w.state.contracts[cid].billing.prices.cru == 2000
    # a later change, by the farm or the grid, does not reach the existing contract
    w.ok(g.farmer, "farm.prices", {"farm": g.farm, "prices": {**PRICES, "cru": 9000}})
    assert not isinstance(w.govern(policy(prices={**PRICES, "mru": 5000})), Rejected)
    g.to_boundary()
    row = w.state.charges[cid][0]
    assert row.amounts["cru"] == 2 * 2000 * (row.end - row.start) // HOUR
    assert row.amounts["mru"] == 4 * 500 * (row.end - row.start) // HOUR
    later = g.contract()
    assert w.state.contracts[later].billing.prices.cru == 9000


def test_scheduled_farm_prices_apply_from_their_time() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 10**9)
    w.ok(g.farmer, "farm.prices", {"farm": g.farm, "prices": {**PRICES, "cru": 3000},
                                   "effective": w.time + 100})
    before = g.contract()
    assert w.state.contracts[before].billing.prices.cru == PRICES["cru"]
    w.time += 100
    after = g.contract()
    assert w.state.contracts[after].billing.prices.cru == 3000


def consumption(g: Grid, cid: int, period: int, **over: Any) -> dict[str, Any]:
    return {"contract": cid, "period": period,
            "reserved": {"cru": 2, "mru": 4 * GiB}, "traffic_in": 0, "traffic_out": 0, **over}


def test_consumption_reports() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 10**9)
    cid = g.contract()
    period = w.time // PERIOD
    refused(w.send(g.node_twin, "contract.consumption", consumption(g, cid, period)),
            "invalid", "has not ended")
    g.to_boundary()
    _, other_twin = w.node(g.farm, country="NL")
    before = w.state.contracts[cid]
    refused(w.send(other_twin, "contract.consumption", consumption(g, cid, period)),
            "unauthorized", f"runs on node {g.node}")
    refused(w.send(g.user, "contract.consumption", consumption(g, cid, period)),
            "unauthorized")
    refused(w.send(g.node_twin, "contract.consumption",
                   consumption(g, cid, period, reserved={"cru": 3})),
            "invalid", "3 cru reserved")
    refused(w.send(g.node_twin, "contract.consumption",
                   consumption(g, cid, period, traffic_in=10 * GiB, traffic_out=1)),
            "invalid", "at most")
    refused(w.send(g.node_twin, "contract.consumption", consumption(g, cid, period - 5)),
            "invalid", "before contract")
    # the report's own signature (`consumption` domain) must be the node's, over these
    # figures: figures changed after signing, or signed by another key, are refused
    signed = w.sign_consumption(w.keys[g.node_twin], consumption(g, cid, period))
    refused(w.send(g.node_twin, "contract.consumption", {**signed, "traffic_in": GiB}),
            "bad_signature", "consumption signature")
    forged = w.sign_consumption(w.keys[other_twin], consumption(g, cid, period))
    refused(w.send(g.node_twin, "contract.consumption", forged), "bad_signature")
    as_tx = w.keys[g.node_twin].sign(Domain.TRANSACTION, bytes(32)).hex()
    refused(w.send(g.node_twin, "contract.consumption",
                   {**consumption(g, cid, period), "signature": as_tx}), "bad_signature")
    assert w.state.contracts[cid] == before
    w.ok(g.node_twin, "contract.consumption",
         consumption(g, cid, period, traffic_in=2 * GiB, traffic_out=GiB))
    refused(w.send(g.node_twin, "contract.consumption", consumption(g, cid, period)),
            "conflict", "already reported")
    g.to_boundary()
    row = w.state.charges[cid][-1]
    assert row.amounts["traffic"] == 3 * PRICES["traffic"]
    assert w.state.contracts[cid].billing.totals[-1] == 3 * PRICES["traffic"]


def test_grace_then_top_up_resumes() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 10)  # not enough for one period
    cid = g.contract()
    w.ok(g.node_twin, "contract.report", {"contract": cid, "version": 1,
                                          "workloads": [{"name": "a", "state": "ok"}]})
    assert w.state.contracts[cid].state == DEPLOYED
    balance = w.state.balances[g.user]
    g.to_boundary()
    c = w.state.contracts[cid]
    assert c.state == GRACE
    assert cid not in w.state.billable and cid in w.state.graces
    assert w.state.balances[g.user] == balance - 1  # the block's own transfer only
    due = sum(c.billing.due)
    assert due > 0
    # updates wait for the money, cancel votes do not
    refused(w.send(g.user, "contract.update", {"contract": cid, **hashes(5, requirement(
        w, g.user)), "instructions": sealed()}), "state", "in grace")
    # a later boundary in grace charges nothing more
    g.to_boundary()
    assert w.state.contracts[cid].state == GRACE
    assert all(r.status != "paid" for r in w.state.charges.get(cid, ()))
    receipt = g.fund(g.user, due)
    assert receipt["resumed"] == [cid]
    c = w.state.contracts[cid]
    assert c.state == DEPLOYED and cid in w.state.billable and cid not in w.state.graces
    assert w.state.charges[cid][-1].status == "late"
    assert w.state.charges[cid][-1].total == due
    assert money(w.state) == w.state.supply


def test_grace_ends_in_cancel_and_a_cancelled_contract_is_never_billed() -> None:
    g = Grid()
    w = g.w
    cid = g.contract()
    g.to_boundary()
    assert w.state.contracts[cid].state == GRACE
    w.time = w.state.contracts[cid].billing.grace_until + 1
    g.fund(g.farmer, 1)
    c = w.state.contracts[cid]
    assert c.state == CANCELLED and c.billing.unpaid > 0
    assert cid not in w.state.graces
    rows = len(w.state.charges.get(cid, ()))
    g.fund(g.user, 10**9)
    g.to_boundary(3)
    assert len(w.state.charges.get(cid, ())) == rows


def test_cancel_settles_the_partial_period() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 10**9)
    cid = g.contract()
    start = w.time
    w.time += 600
    w.ok(g.user, "contract.cancel", cancel_vote(w, g.user, cid))
    row = w.state.charges[cid][-1]
    assert (row.start, row.end, row.status) == (start, start + 600, "paid")
    assert row.total == g.hourly() * 600 // HOUR
    g.to_boundary(2)
    assert len(w.state.charges[cid]) == 1


def test_an_approved_update_charges_the_old_reservation_up_to_its_approval() -> None:
    g = Grid()
    w = g.w
    g.fund(g.user, 10**9)
    cid = g.contract(cru=1, mru=0)
    start = w.time
    w.time += 100
    req = requirement(w, g.user)
    ids = hashes(77, req)
    w.ok(g.user, "contract.update", {"contract": cid, **ids, "instructions": sealed(),
                                     "capacity": {"cru": 4},
                                     "approval": w.update_approval(g.user, cid,
                                                                   ids["deployment_hash"])})
    g.to_boundary()
    row = w.state.charges[cid][-1]
    assert row.amounts["cru"] == (1 * 100 + 4 * (row.end - start - 100)) * PRICES["cru"] // HOUR


def test_the_bad_input_list_is_refused_and_changes_nothing() -> None:
    """Every bad input the billing design names, in one place: each is refused with a
    clear error, and neither balances nor contracts change."""
    g = Grid()
    w = g.w
    g.fund(g.user, 10**9)
    cid = g.contract()
    _, other_node_twin = w.node(g.farm, country="NL")
    g.to_boundary()
    period = w.time // PERIOD - 1
    accepted = w.tx(g.node_twin, "contract.consumption", consumption(g, cid, period))
    assert not isinstance(w.apply_tx(accepted), Rejected)
    cancelled = g.contract()
    w.ok(g.user, "contract.cancel", cancel_vote(w, g.user, cancelled))
    g.to_boundary()
    period = w.time // PERIOD - 1
    before = w.state

    def unchanged() -> None:
        assert w.state.balances == before.balances
        assert w.state.contracts == before.contracts
        assert w.state.treasury == before.treasury and w.state.policy == before.policy

    def envelope(amount: int) -> dict[str, Any]:
        return {"type": "balance.transfer", "sender": g.user, "nonce": w.nonces[g.user],
                "payload": {"to": g.farmer, "amount": amount}, "signature": "0" * 128}

    # negative and overflowing amounts: not even a transaction
    for amount in (-1, 0, MAX_INT + 1, 2**70):
        with pytest.raises(LedgerRejected, match="amount"):
            parse_tx(envelope(amount))
    # a transfer above the balance
    have = w.state.balances[g.user]
    refused(w.send(g.user, "balance.transfer", {"to": g.farmer, "amount": have + 1}),
            "state", f"less than the {have + 1}")
    # a replayed consumption report: the same transaction again, or the period again
    refused(w.apply_tx(accepted), "bad_nonce")
    refused(w.send(g.node_twin, "contract.consumption", consumption(g, cid, period - 1)),
            "conflict", "already reported")
    # a node reporting for another node's contract
    refused(w.send(other_node_twin, "contract.consumption", consumption(g, cid, period)),
            "unauthorized", f"runs on node {g.node}")
    # a node inflating usage beyond the reservation (or past the traffic bound)
    refused(w.send(g.node_twin, "contract.consumption",
                   consumption(g, cid, period, reserved={"cru": 2, "mru": 5 * GiB})),
            "invalid", "reserves")
    refused(w.send(g.node_twin, "contract.consumption",
                   consumption(g, cid, period, traffic_out=MAX_INT)), "invalid", "at most")
    # billing a cancelled contract: reports are refused, boundaries charge it nothing
    refused(w.send(g.node_twin, "contract.consumption", consumption(g, cancelled, period)),
            "state", "cancelled")
    # a price change applied retroactively, by the grid or by a farm
    refused(w.govern(policy(prices={**PRICES, "cru": 1}, effective=w.time - 1)),
            "invalid", "never retroactive")
    refused(w.send(g.farmer, "farm.prices",
                   {"farm": g.farm, "prices": {**PRICES, "cru": 1}, "effective": w.time - 60}),
            "invalid", "never retroactive")
    unchanged()
    rows = len(w.state.charges.get(cancelled, ()))
    g.to_boundary(2)
    assert len(w.state.charges.get(cancelled, ())) == rows
