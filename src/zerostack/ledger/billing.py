"""Billing on the ledger: the pricing policy and farm prices, balances and transfers,
consumption reports, charges at period boundaries and the grace period.

Pure like the rest of the state machine: `state.py` calls in here from its transaction
handlers and from `tick`, at block time, so every replay reaches the same charges.
"""

from __future__ import annotations

from typing import Any

from zerostack.crypto import MAX_INT, Domain, consumption_digest, verify
from zerostack.ledger import pricing as pr
from zerostack.ledger import tx as t
from zerostack.ledger.pricing import Policy, Prices
from zerostack.ledger.records import (
    APPROVED,
    BILLED_STATES,
    CANCELLED,
    GRACE,
    MAX_HISTORY,
    NEVER,
    ZERO,
    Billing,
    Charge,
    Contract,
    FarmPricing,
    Payout,
    Receipt,
    State,
    Twin,
    contract_ids,
)
from zerostack.ledger.records import Refuse as _Refuse
from zerostack.ledger.records import count as _count
from zerostack.ledger.records import get_contract as _contract
from zerostack.ledger.records import replace_record as _replace

# Billing runs inside `tick`, at the first block at or after each period boundary, on the
# block's time: replay applies the same ticks at the same times, so it reaches the same
# charges, and no transaction (nor anyone's clock) decides when or whether a contract pays.


def policy_at(state: State, time: int) -> Policy | None:
    """The pricing policy in force at `time` (a scheduled one once its time has come)."""
    if state.policy_next is not None and state.policy_next[0] <= time:
        return state.policy_next[1]
    return state.policy


def billing_view(state: State, time: int) -> dict[str, Any]:
    """The grid's pricing policy as `GET /policy` shows it (policy null: nothing is priced)."""
    policy = policy_at(state, time)
    upcoming = state.policy_next if state.policy_next and state.policy_next[0] > time else None
    return {
        "governor": state.operator,
        "governor_nonce": state.governor_nonce,
        "policy": None if policy is None else policy.to_dict(),
        "next": None if upcoming is None else {"effective": upcoming[0],
                                               **upcoming[1].to_dict()},
        "next_bill": None if state.next_bill == NEVER else state.next_bill,
        "supply": state.supply,
        "treasury": state.treasury,
    }


def _prices(model: t.PricesModel) -> Prices:
    return Prices.of(model.model_dump())


def grid_policy(state: State, tx: t.Tx, time: int, verified: bool) -> tuple[State, Receipt]:
    """The governing key (the ledger's operator key) sets the pricing policy."""
    if state.operator is None or tx.sender != state.operator:
        raise _Refuse("unauthorized", "grid.policy is sent by the grid's governing key (the "
                      "ledger's operator key), as the sender")
    if not verified and not verify(Domain.TRANSACTION, state.operator, tx.hash, tx.signature):
        raise _Refuse("bad_signature", "signature does not verify with the governing key")
    if tx.nonce != state.governor_nonce:
        raise _Refuse("bad_nonce", f"nonce {tx.nonce} of the governing key is wrong; the next "
                      f"nonce is {state.governor_nonce}")
    p: t.GridPolicy = tx.payload
    low, high, prices = _prices(p.min), _prices(p.max), _prices(p.prices)
    why = prices.outside(low, high)
    if why is not None:
        raise _Refuse("invalid", f"grid prices: {why}")
    if p.treasury_share + p.max_author_share > pr.BASIS:
        raise _Refuse("invalid", "treasury_share + max_author_share is more than 10000 "
                      "basis points (the whole charge)")
    effective = time if p.effective is None else p.effective
    if effective < time:
        raise _Refuse("invalid", f"effective time {effective} is before the block time {time}: "
                      "a price change is never retroactive")
    current = policy_at(state, time)
    if current is not None:
        if p.period != current.period:
            raise _Refuse("invalid", f"the billing period is fixed at {current.period} s for the "
                          "grid's life")
        if p.dev_faucet != current.dev_faucet:
            raise _Refuse("invalid", "dev_faucet is fixed by the grid's first policy")
    policy = Policy(prices, low, high, p.period, p.grace, p.treasury_share,
                    p.max_author_share, p.max_traffic, p.dev_faucet)
    changes: dict[str, Any] = {"governor_nonce": state.governor_nonce + 1}
    if current is None:
        if effective != time:
            raise _Refuse("invalid", "the grid's first policy takes effect at once")
        changes.update(policy=policy, next_bill=(time // p.period + 1) * p.period)
    elif effective == time:
        changes.update(policy=policy, policy_next=None)
    else:
        changes.update(policy=current, policy_next=(effective, policy))
    return _replace(state, **changes), {"policy": effective}


def farm_prices(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.FarmPrices = tx.payload
    farm = state.farms.get(p.farm)
    if farm is None:
        raise _Refuse("not_found", f"farm {p.farm} does not exist")
    if farm.owner != twin.id:
        raise _Refuse("unauthorized", f"only farm {farm.id}'s owner (twin {farm.owner}) sets "
                      "its prices")
    policy = policy_at(state, time)
    if policy is None:
        raise _Refuse("state", "the grid has no pricing policy yet")
    prices = _prices(p.prices)
    why = prices.outside(policy.minimum, policy.maximum)
    if why is not None:
        raise _Refuse("invalid", f"farm prices: {why}")
    effective = time if p.effective is None else p.effective
    if effective < time:
        raise _Refuse("invalid", f"effective time {effective} is before the block time {time}: "
                      "a price change is never retroactive")
    old = state.farm_prices.get(farm.id, FarmPricing(None))
    fp = (FarmPricing(prices) if effective == time
          else FarmPricing(old.now(time), prices, effective))
    return _replace(state, farm_prices=state.farm_prices.set(farm.id, fp)), {
        "farm": farm.id, "effective": effective}


def contract_prices(state: State, node: int, time: int) -> Prices | None:
    """The prices a contract on `node` created at `time` is recorded with: its farm's own,
    kept within the policy's bounds, or else the grid's."""
    policy = policy_at(state, time)
    if policy is None:
        return None
    fp = state.farm_prices.get(state.nodes[node].farm)
    own = fp.now(time) if fp is not None else None
    return policy.prices if own is None else own.clamp(policy.minimum, policy.maximum)


def new_billing(state: State, p: t.ContractCreate, time: int) -> Billing | None:
    prices = contract_prices(state, p.node, time)
    policy = policy_at(state, time)
    if prices is None or policy is None:
        return None  # nothing is priced on this grid (yet): the contract runs unbilled
    author, share, template = 0, 0, ""
    if p.template is not None:
        tpl = state.templates.get(p.template)
        if tpl is None:
            raise _Refuse("not_found", f"template {p.template} is not published")
        template, author = tpl.hash, tpl.author
        share = min(tpl.author_share, policy.max_author_share)
    return Billing(prices, p.ipv4, p.names, template, author, share, time)


def _units(c: Contract) -> tuple[int, ...]:
    """What the contract reserves, in RESERVED order (nothing before it is approved)."""
    assert c.billing is not None
    cap = c.active.capacity if c.active is not None else ZERO
    return (cap.cru, cap.mru, cap.sru, cap.hru, c.billing.ipv4, c.billing.names)


class _Books:
    """Money moved by one transaction or one tick, collected in plain dicts and written
    into the state's maps at once (a billing pass touches thousands of entries)."""

    def __init__(self, state: State, time: int) -> None:
        self.state = state
        self.time = time
        self.balances: dict[int, int] = {}
        self.contracts: dict[int, Contract] = {}
        self.charges: dict[int, list[Charge]] = {}
        self.earned: dict[tuple[int, str], list[int]] = {}  # (twin, role) -> [amount, contracts]
        self.treasury = state.treasury
        self.billable: dict[int, bool] = {}  # contract -> add (True) or drop (False)
        self.graces: dict[int, int | None] = {}  # contract -> grace end, None: leaves grace
        self.graced: dict[int, int] = {}  # owner -> change in contracts in grace

    def balance(self, twin: int) -> int:
        got = self.balances.get(twin)
        return self.state.balances.get(twin, 0) if got is None else got

    def move(self, twin: int, delta: int) -> None:
        self.balances[twin] = self.balance(twin) + delta

    def earn(self, twin: int, role: str, amount: int) -> None:
        self.move(twin, amount)
        row = self.earned.setdefault((twin, role), [0, 0])
        row[0] += amount
        row[1] += 1

    def pay(self, c: Contract, amounts: dict[str, int], start: int, end: int,
            status: str) -> Charge:
        """Take the charge from the owner (who can pay it) and share it out."""
        assert c.billing is not None
        b = c.billing
        total = min(MAX_INT, sum(amounts.values()))
        policy = policy_at(self.state, self.time)
        treasury_share = policy.treasury_share if policy is not None else 0
        farmer_part, author_part, treasury_part = pr.split(
            total, treasury_share, b.author_share if b.author else 0)
        farmer = self.state.farms[self.state.nodes[c.node].farm].owner
        self.move(c.owner, -total)
        if farmer_part:
            self.earn(farmer, "farmer", farmer_part)
        if author_part:
            self.earn(b.author, "author", author_part)
        self.treasury += treasury_part
        row = Charge(start, end, self.time, amounts, total, status, farmer, farmer_part,
                     b.author, author_part, treasury_part)
        self.record(c.id, row)
        return row

    def record(self, cid: int, row: Charge) -> None:
        self.charges.setdefault(cid, []).append(row)

    def commit(self) -> State:
        s = self.state
        charges = s.charges
        if self.charges:
            with charges.mutate() as m:
                for cid, rows in self.charges.items():
                    m[cid] = (m.get(cid, ()) + tuple(rows))[-MAX_HISTORY:]
                charges = m.finish()
        payouts, paid_out = s.payouts, s.paid_out
        if self.earned:
            with payouts.mutate() as m, paid_out.mutate() as total:
                for (twin, role), (amount, n) in sorted(self.earned.items()):
                    m[twin] = (*m.get(twin, ()), Payout(self.time, role, amount, n)
                               )[-MAX_HISTORY:]
                    total[twin] = total.get(twin, 0) + amount
                payouts, paid_out = m.finish(), total.finish()
        billable, graces, graced = s.billable, s.graces, s.graced_owners
        if self.billable:
            with billable.mutate() as m:
                for cid, add in self.billable.items():
                    if add:
                        m[cid] = True
                    elif cid in m:
                        del m[cid]
                billable = m.finish()
        if self.graces:
            with graces.mutate() as m:
                for cid, until in self.graces.items():
                    if until is not None:
                        m[cid] = until
                    elif cid in m:
                        del m[cid]
                graces = m.finish()
            for twin, delta in self.graced.items():
                graced = _count(graced, twin, delta)
        return _replace(
            s,
            balances=s.balances.update(self.balances) if self.balances else s.balances,
            contracts=s.contracts.update(self.contracts) if self.contracts else s.contracts,
            charges=charges,
            payouts=payouts,
            paid_out=paid_out,
            treasury=self.treasury,
            billable=billable,
            graces=graces,
            graced_owners=graced,
            next_grace=(min(graces.values(), default=NEVER) if self.graces
                        else s.next_grace),
        )

    def contract(self, cid: int) -> Contract:
        return self.contracts.get(cid) or self.state.contracts[cid]

    def charge_to(self, c: Contract, upto: int, *, settle: bool) -> Contract:
        """Charge `c` for what accrued up to `upto`. An owner who cannot pay puts the
        contract in grace, or, when `settle` (the contract is ending), leaves the charge
        unpaid. Returns the contract as it now is (also kept in the books)."""
        b = c.billing
        assert b is not None
        if upto <= b.since and not any(b.accrued) and not b.traffic:
            return c
        accrued = pr.add(b.accrued, pr.usage(_units(c), max(0, upto - b.since)))
        amounts = pr.amounts(b.prices, accrued, b.traffic)
        total = min(MAX_INT, sum(amounts.values()))
        fresh = (0,) * len(pr.RESERVED)
        if total <= self.balance(c.owner):
            self.pay(c, amounts, b.since, upto, "paid")
            totals = pr.add(b.totals, tuple(amounts[r] for r in pr.RESOURCES))
            b = _replace(b, since=upto, accrued=fresh, traffic=0, charged=b.charged + total,
                         totals=totals)
            c = _replace(c, billing=b)
        elif settle:
            self.record(c.id, Charge(b.since, upto, self.time, amounts, total, "unpaid",
                                     0, 0, 0, 0, 0))
            c = _replace(c, billing=_replace(b, since=upto, accrued=fresh, traffic=0,
                                             unpaid=b.unpaid + total))
        else:
            policy = policy_at(self.state, self.time)
            until = self.time + (policy.grace if policy is not None else 0)
            b = _replace(b, since=upto, accrued=fresh, traffic=0,
                         due=tuple(amounts[r] for r in pr.RESOURCES), due_span=(b.since, upto),
                         resume=c.state, grace_until=until)
            c = _replace(c, state=GRACE, billing=b, updated=self.time)
            self.billable[c.id] = False
            self.graces[c.id] = until
            self.graced[c.owner] = self.graced.get(c.owner, 0) + 1
        self.contracts[c.id] = c
        return c

    def top_up(self, twin: int) -> list[int]:
        """`twin` received money: pay what its contracts in grace owe, oldest first, and
        bring each one paid back to the state it left."""
        if not self.state.graced_owners.get(twin):
            return []
        resumed = []
        for cid in sorted(contract_ids(self.state.contracts_by_owner, twin)):
            c = self.contract(cid)
            if c.state != GRACE or c.billing is None:
                continue
            b = c.billing
            due = sum(b.due)
            if due > self.balance(twin):
                continue
            amounts = dict(zip(pr.RESOURCES, b.due, strict=True))
            self.pay(c, amounts, b.due_span[0], b.due_span[1], "late")
            b = _replace(b, since=self.time, due=(), due_span=(0, 0), resume="",
                         grace_until=0, charged=b.charged + due,
                         totals=pr.add(b.totals, b.due))
            self.contracts[cid] = _replace(c, state=c.billing.resume or APPROVED, billing=b,
                                           updated=self.time)
            self.billable[cid] = True
            self.graces[cid] = None
            self.graced[twin] = self.graced.get(twin, 0) - 1
            resumed.append(cid)
        return resumed


def bill(state: State, time: int) -> State:
    """Charge every billed contract up to the last boundary at or before `time`."""
    policy = policy_at(state, time)
    assert policy is not None
    boundary = time // policy.period * policy.period
    books = _Books(state, time)
    for cid in state.billable:
        books.charge_to(state.contracts[cid], boundary, settle=False)
    return _replace(books.commit(), next_bill=boundary + policy.period)


def stop_billing(state: State, c: Contract, time: int) -> tuple[State, Contract]:
    """`c` is ending: charge what accrued since the last boundary (left unpaid if the owner
    cannot pay) and bill it no more; a contract in grace owes its due for good."""
    if c.billing is None:
        return state, c
    if c.id in state.graces:
        b = c.billing
        c = _replace(c, billing=_replace(b, unpaid=b.unpaid + sum(b.due), due=(), resume=""))
        return _replace(state, graces=state.graces.delete(c.id),
                        graced_owners=_count(state.graced_owners, c.owner, -1),
                        next_grace=min((v for k, v in state.graces.items() if k != c.id),
                                       default=NEVER)), c
    if c.id not in state.billable:
        return state, c
    books = _Books(state, time)
    c = books.charge_to(c, time, settle=True)
    books.billable[c.id] = False
    return books.commit(), c


def activate(state: State, old: Contract | None, c: Contract, time: int) -> Contract:
    """`c` just had a version approved: start billing it, or, when the reservation changes,
    keep what the old one accrued so far to charge at the next boundary."""
    b = c.billing
    if b is None:
        return c
    if old is None or old.active is None:
        return _replace(c, billing=_replace(b, since=time))
    if c.id in state.billable:
        accrued = pr.add(b.accrued, pr.usage(_units(old), max(0, time - b.since)))
        return _replace(c, billing=_replace(b, since=time, accrued=accrued))
    return c


def contract_consumption(state: State, tx: t.Tx, twin: Twin,
                          time: int) -> tuple[State, Receipt]:
    p: t.ContractConsumption = tx.payload
    c = _contract(state, p.contract)
    node = state.nodes[c.node]
    if node.twin != twin.id:
        raise _Refuse("unauthorized", f"contract {c.id} runs on node {c.node}: only its twin "
                      f"({node.twin}) reports its consumption")
    if c.billing is None:
        raise _Refuse("state", f"contract {c.id} is not billed (made before the grid's policy)")
    if c.state not in BILLED_STATES and c.state != GRACE:
        raise _Refuse("state", f"contract {c.id} is {c.state}: no consumption to report")
    policy = policy_at(state, time)
    assert policy is not None
    b = c.billing
    if (p.period + 1) * policy.period > time:
        raise _Refuse("invalid", f"period {p.period} has not ended yet (it ends at "
                      f"{(p.period + 1) * policy.period}, the block time is {time})")
    if p.period <= b.last_period:
        raise _Refuse("conflict", f"period {p.period} of contract {c.id} is already reported "
                      f"(the last reported period is {b.last_period})")
    if (p.period + 1) * policy.period <= c.created:
        raise _Refuse("invalid", f"period {p.period} ended before contract {c.id} existed")
    reserved = p.reserved
    allowed = dict(zip(pr.RESERVED, _units(c), strict=True))
    for r in pr.RESERVED:
        if getattr(reserved, r) > allowed[r]:
            raise _Refuse("invalid", f"report says {getattr(reserved, r)} {r} reserved, but "
                          f"contract {c.id} reserves {allowed[r]}")
    traffic = p.traffic_in + p.traffic_out
    digest = consumption_digest(c.id, c.node, p.period, reserved.model_dump(), p.traffic_in,
                                p.traffic_out)
    if not verify(Domain.CONSUMPTION, twin.public_key, digest, bytes.fromhex(p.signature)):
        raise _Refuse("bad_signature", f"the report's consumption signature does not verify "
                      f"with node {c.node}'s key for these figures")
    if traffic > policy.max_traffic:
        raise _Refuse("invalid", f"report counts {traffic} bytes of traffic: the policy allows "
                      f"at most {policy.max_traffic} per period")
    report = {"period": p.period, "time": time, "reserved": reserved.model_dump(),
              "traffic_in": p.traffic_in, "traffic_out": p.traffic_out}
    b = _replace(b, traffic=b.traffic + traffic, last_period=p.period, consumption=report)
    c = _replace(c, billing=b)
    return _replace(state, contracts=state.contracts.set(c.id, c)), {
        "contract": c.id, "node": c.node, "owner": c.owner, "period": p.period}


def balance_transfer(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.BalanceTransfer = tx.payload
    if p.to not in state.twins:
        raise _Refuse("not_found", f"twin {p.to} is not registered")
    have = state.balances.get(twin.id, 0)
    if p.amount > have:
        raise _Refuse("state", f"twin {twin.id} has {have}, less than the {p.amount} to transfer")
    books = _Books(state, time)
    books.move(twin.id, -p.amount)
    books.move(p.to, p.amount)
    resumed = books.top_up(p.to)
    return books.commit(), {"twin": p.to, "from": twin.id, "to": p.to, "amount": p.amount,
                            "resumed": resumed}


def balance_faucet(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.BalanceFaucet = tx.payload
    policy = policy_at(state, time)
    if policy is None or not policy.dev_faucet:
        raise _Refuse("unauthorized", "this grid has no faucet (only a grid started for "
                      "development mints money)")
    if state.supply + p.amount > MAX_INT:
        raise _Refuse("invalid", f"minting {p.amount} would take the grid's money past 2^53 - 1")
    books = _Books(state, time)
    books.move(twin.id, p.amount)
    resumed = books.top_up(twin.id)
    state = books.commit()
    return _replace(state, supply=state.supply + p.amount), {
        "twin": twin.id, "amount": p.amount, "resumed": resumed}


# ---- billing notices: what a node acts on -------------------------------------------

NOTICE_STANDINGS = ("unbilled", "paying", "grace", "ended", "closed")
"""Where a contract stands with its payments, in a billing notice: `unbilled` (made before
the grid priced anything), `paying` (billed and paid up), `grace` (its owner could not
pay: the node pauses it), `ended` (its grace ran out: the node removes it), `closed`
(cancelled, deleted or expired otherwise, or not approved yet)."""


def billing_notice(state: State, cid: int, height: int, block_hash: str,
                   time: int) -> dict[str, Any] | None:
    """The unsigned billing notice of contract `cid` in `state`, the state after block
    `height` (`block_hash`, block time `time`); None when there is no such contract. The
    server signs it with the governing key (`Domain.BILLING_NOTICE`); a node pauses and
    removes workloads for non-payment on nothing else."""
    c = state.contracts.get(cid)
    if c is None:
        return None
    b = c.billing
    if b is None:
        standing = "unbilled"
    elif c.state == GRACE:
        standing = "grace"
    elif c.state == CANCELLED and b.grace_ended:
        standing = "ended"
    elif c.state in BILLED_STATES:
        standing = "paying"
    else:
        standing = "closed"
    return {"contract": c.id, "node": c.node, "owner": c.owner, "state": c.state,
            "standing": standing, "due": sum(b.due) if b else 0,
            "grace_until": b.grace_until if b and standing == "grace" else 0,
            "grace_ended": b.grace_ended if b else 0,
            "height": height, "block": block_hash, "time": time}
