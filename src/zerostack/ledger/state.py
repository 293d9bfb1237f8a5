"""The ledger's state machine: `apply(state, tx, time=...)` returns a new State or a Rejected.

Pure and deterministic, like etcd's raft: no I/O, no clock (the block's time is passed in),
no mutation (maps are persistent `immutables.Map`s and records are frozen dataclasses, so
an old State stays valid and a rejected transaction leaves nothing behind). Storage,
ordering and HTTP live in other modules.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from immutables import Map

from zerostack.crypto import (
    MAX_INT,
    Domain,
    QuorumError,
    SignatureRequest,
    SignatureRequirement,
    approval_digest,
    delete_vote_digest,
    deployment_hash,
    hash_hex,
    solution_digest,
    verify,
)
from zerostack.ledger import tx as t
from zerostack.ledger.billing import (
    activate,
    balance_faucet,
    balance_transfer,
    bill,
    billing_view,
    contract_consumption,
    contract_prices,
    farm_prices,
    grid_policy,
    new_billing,
    policy_at,
    stop_billing,
)
from zerostack.ledger.errors import Rejected
from zerostack.ledger.pricing import monthly
from zerostack.ledger.records import (
    APPROVED,
    BILLED_STATES,
    CANCELLED,
    CONTRACT_STATES,
    CREATED,
    DEFAULT_DEADLINE,
    DELETED,
    DEPLOYED,
    ERROR,
    EXPIRED,
    FINAL_STATES,
    GRACE,
    MAX_DEADLINE,
    MAX_HISTORY,
    MAX_PENDING_PER_TWIN,
    NEVER,
    PENDING_HOLD,
    ZERO,
    Billing,
    Capacity,
    Charge,
    Contract,
    Farm,
    FarmPricing,
    Gateway,
    Name,
    Node,
    Payout,
    PoolIp,
    Receipt,
    Report,
    Solution,
    State,
    Template,
    Twin,
    Version,
    contract_ids,
    genesis,
)
from zerostack.ledger.records import Refuse as _Refuse
from zerostack.ledger.records import count as _count
from zerostack.ledger.records import get_contract as _contract
from zerostack.ledger.records import index_add as _index_add
from zerostack.ledger.records import index_remove as _index_remove
from zerostack.ledger.records import replace_record as _replace
from zerostack.ledger.validators import validator_set

__all__ = [
    "APPROVED",
    "BILLED_STATES",
    "CANCELLED",
    "CONTRACT_STATES",
    "CREATED",
    "DEFAULT_DEADLINE",
    "DELETED",
    "DEPLOYED",
    "ERROR",
    "EXPIRED",
    "FINAL_STATES",
    "GRACE",
    "MAX_DEADLINE",
    "MAX_HISTORY",
    "MAX_PENDING_PER_TWIN",
    "NEVER",
    "PENDING_HOLD",
    "ZERO",
    "Billing",
    "Capacity",
    "Charge",
    "Contract",
    "Farm",
    "FarmPricing",
    "Name",
    "Node",
    "Payout",
    "Receipt",
    "Report",
    "Solution",
    "State",
    "Template",
    "Twin",
    "Version",
    "apply",
    "apply_with_receipt",
    "billing_view",
    "contract_ids",
    "contract_prices",
    "genesis",
    "holds",
    "policy_at",
    "sender_key",
    "tick",
]


# ---- the transition function -----------------------------------------------------------


def apply(state: State, tx: t.Tx, *, time: int, verified: bool = False) -> State | Rejected:
    """Apply one transaction at block time `time`; return the new State or why not."""
    result = apply_with_receipt(state, tx, time=time, verified=verified)
    return result if isinstance(result, Rejected) else result[0]


def apply_with_receipt(
    state: State, tx: t.Tx, *, time: int, verified: bool = False
) -> tuple[State, Receipt] | Rejected:
    """`apply`, also returning a receipt: the ids the transaction created or touched.

    `verified=True` skips the signature check for a caller that already verified it
    against the same sender key (the server verifies batches in parallel threads).
    """
    try:
        if tx.type == "twin.register":
            return _twin_register(state, tx, time, verified)
        if tx.type == "grid.policy":
            return grid_policy(state, tx, time, verified)
        twin = _sender(state, tx, verified)
        handler = _HANDLERS[tx.type]
        new, receipt = handler(state, tx, twin, time)
        bumped = _replace(twin, nonce=twin.nonce + 1)
        return _replace(new, twins=new.twins.set(twin.id, bumped)), receipt
    except _Refuse as exc:
        return exc.rejected


def tick(state: State, time: int) -> State:
    """Advance the clock to `time` (start of a block): expire proposals past their deadline,
    release the capacity of pending versions past their hold, end grace periods that ran
    out, and charge every billed contract when a billing boundary has passed.

    A contract never approved by its deadline becomes `expired`; a new version not
    approved in time is dropped and the contract keeps running its active version.
    """
    if time > state.next_deadline or time > state.next_lapse:
        state = _expire(state, time)
    if time > state.next_grace:
        state = _end_graces(state, time)
    if time >= state.next_bill:
        state = bill(state, time)
    return state


def _expire(state: State, time: int) -> State:
    contracts, deadlines, nodes = state.contracts, state.deadlines, state.nodes
    lapses, pending = state.lapses, state.pending_by_owner
    for cid, at in state.lapses.items():
        if at < time:
            lapses = lapses.delete(cid)
            c = contracts[cid]
            nodes = _reserve(nodes, c.node, holds(c, True), holds(c, False))
    for cid, deadline in state.deadlines.items():
        if deadline >= time:
            continue
        deadlines = deadlines.delete(cid)
        c = contracts[cid]
        live = cid in lapses
        lapses = lapses.delete(cid) if live else lapses
        before = holds(c, live)
        if c.active is None:
            pool, c = _release_ips(state.public_ips, c)
            state = _replace(state, public_ips=pool)
            c = _replace(c, state=EXPIRED, updated=time)
        else:
            c = _replace(c, proposal=c.active, updated=time)
        nodes = _reserve(nodes, c.node, before, holds(c, False))
        pending = _count(pending, c.owner, -1)
        contracts = contracts.set(cid, c)
    return _replace(
        state,
        contracts=contracts,
        deadlines=deadlines,
        nodes=nodes,
        lapses=lapses,
        pending_by_owner=pending,
        next_deadline=min(deadlines.values(), default=NEVER),
        next_lapse=min(lapses.values(), default=NEVER),
    )


def _sender(state: State, tx: t.Tx, verified: bool) -> Twin:
    if not isinstance(tx.sender, int):
        raise _Refuse("invalid", f"{tx.type} must be sent by a twin id, not a public key")
    twin = state.twins.get(tx.sender)
    if twin is None:
        raise _Refuse("not_found", f"sender twin {tx.sender} is not registered")
    if not verified and not verify(Domain.TRANSACTION, twin.public_key, tx.hash, tx.signature):
        raise _Refuse("bad_signature", f"signature does not verify with twin {twin.id}'s key")
    if tx.nonce != twin.nonce:
        if tx.nonce < twin.nonce:
            why = f"nonce {tx.nonce} of twin {twin.id} was already used (replay?)"
        else:
            why = f"nonce {tx.nonce} of twin {twin.id} is out of order"
        raise _Refuse("bad_nonce", f"{why}; the next nonce is {twin.nonce}")
    return twin


def sender_key(state: State, tx: t.Tx) -> str | None:
    """The public key a transaction's signature must verify against, if known yet."""
    if isinstance(tx.sender, str):
        return tx.sender
    twin = state.twins.get(tx.sender)
    return twin.public_key if twin else None


def _twin_register(
    state: State, tx: t.Tx, time: int, verified: bool
) -> tuple[State, Receipt]:
    key = tx.sender
    if not isinstance(key, str):
        raise _Refuse("invalid", "twin.register is sent by the new twin's public key (hex)")
    if not verified and not verify(Domain.TRANSACTION, key, tx.hash, tx.signature):
        raise _Refuse("bad_signature", "signature does not verify with the sender's public key")
    existing = state.twin_by_key.get(key)
    if existing is not None:
        raise _Refuse("conflict", f"this public key is already twin {existing}")
    if tx.nonce != 0:
        raise _Refuse("bad_nonce", "twin.register uses nonce 0")
    p: t.TwinRegister = tx.payload
    tid = state.last_twin + 1
    twin = Twin(tid, key, 1, p.endpoint, time)
    return _replace(
        state,
        twins=state.twins.set(tid, twin),
        twin_by_key=state.twin_by_key.set(key, tid),
        balances=state.balances.set(tid, 0),
        last_twin=tid,
    ), {"twin": tid}


def _farm_create(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.FarmCreate = tx.payload
    if p.name in state.farm_by_name:
        raise _Refuse("conflict", f"farm name {p.name!r} is taken by farm {state.farm_by_name[p.name]}")
    fid = state.last_farm + 1
    farm = Farm(fid, p.name, twin.id, tuple(p.public_ips), p.pricing, time)
    return _replace(
        state,
        farms=state.farms.set(fid, farm),
        farm_by_name=state.farm_by_name.set(p.name, fid),
        last_farm=fid,
    ), {"farm": fid}


def _node_fields(state: State, p: t.NodeRegister) -> dict[str, Any]:
    if p.farm not in state.farms:
        raise _Refuse("not_found", f"farm {p.farm} does not exist")
    return {
        "farm": p.farm,
        "capacity": Capacity.of(p.capacity),
        "country": p.location.country,
        "city": p.location.city,
        "endpoint": p.endpoint,
        "public_ips": tuple(p.public_ips),
        "pricing": p.pricing,
    }


def _node_register(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    existing = state.node_by_twin.get(twin.id)
    if existing is not None:
        raise _Refuse(
            "conflict", f"twin {twin.id} already registered node {existing} (send node.update)"
        )
    fields = _node_fields(state, tx.payload)
    nid = state.last_node + 1
    node = Node(id=nid, twin=twin.id, created=time, updated=time, last_heartbeat=time, **fields)
    return _replace(
        state,
        nodes=state.nodes.set(nid, node),
        node_by_twin=state.node_by_twin.set(twin.id, nid),
        nodes_by_country=_index_add(state.nodes_by_country, node.country, nid),
        nodes_by_farm=_index_add(state.nodes_by_farm, node.farm, nid),
        last_node=nid,
    ), {"node": nid, "farm": node.farm}


def _own_node(state: State, twin: Twin, what: str) -> Node:
    nid = state.node_by_twin.get(twin.id)
    if nid is None:
        raise _Refuse("not_found", f"twin {twin.id} has no node ({what} needs node.register first)")
    return state.nodes[nid]


def _node_update(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    old = _own_node(state, twin, "node.update")
    node = _replace(old, updated=time, **_node_fields(state, tx.payload))
    by_country, by_farm = state.nodes_by_country, state.nodes_by_farm
    if node.country != old.country:
        by_country = _index_add(_index_remove(by_country, old.country, old.id), node.country, old.id)
    if node.farm != old.farm:
        by_farm = _index_add(_index_remove(by_farm, old.farm, old.id), node.farm, old.id)
    return _replace(
        state,
        nodes=state.nodes.set(node.id, node),
        nodes_by_country=by_country,
        nodes_by_farm=by_farm,
    ), {"node": node.id, "farm": node.farm}


def _node_heartbeat(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    old = _own_node(state, twin, "node.heartbeat")
    p: t.NodeHeartbeat = tx.payload
    node = _replace(
        old,
        last_heartbeat=time,
        used=old.used if p.used is None else Capacity.of(p.used),
        uptime=old.uptime if p.uptime is None else p.uptime,
    )
    return _replace(state, nodes=state.nodes.set(node.id, node)), {"node": node.id}


def _template_publish(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.TemplatePublish = tx.payload
    digest = hash_hex(tx.raw_payload)
    existing = state.templates.get(digest)
    if existing is not None:
        raise _Refuse(
            "conflict", f"template {digest} is already published (by twin {existing.author})"
        )
    tpl = Template(digest, p.name, p.version, p.description, tx.raw_payload["body"], twin.id, time,
                   p.author_share)
    return _replace(state, templates=state.templates.set(digest, tpl)), {"template": digest}


# ---- contracts ---------------------------------------------------------------------------


def _requirement(model: t.SignatureRequirementModel, what: str,
                 owner: int) -> SignatureRequirement:
    try:
        return SignatureRequirement.from_dict(model.model_dump(), owner=owner)
    except QuorumError as exc:
        raise _Refuse("invalid", f"{what}: {exc}") from None


def _derived_hash(p: t.ContractCreate | t.ContractUpdate, requirement: SignatureRequirement,
                  delete_req: SignatureRequirement | None) -> None:
    """The deployment hash must be the one its body and requirements make: what is enforced
    here is then exactly what the stakeholders approve and the node checks."""
    derived = deployment_hash(p.body_hash, requirement, delete_req)
    if derived != p.deployment_hash:
        raise _Refuse("invalid", f"deployment_hash {p.deployment_hash} is not the hash of its "
                      f"body and signature requirements ({derived})")


def holds(c: Contract, live: bool) -> Capacity:
    """The capacity contract `c` holds on its node: its active version's, or while a
    version waits for approvals within its hold (`live`), enough for either version."""
    if c.state in FINAL_STATES:
        return ZERO
    active = c.active.capacity if c.active is not None else ZERO
    return active.cover(c.proposal.capacity) if c.pending and live else active


def _reserve(nodes: Map[int, Node], nid: int, old: Capacity, new: Capacity) -> Map[int, Node]:
    """Replace a hold of `old` on node `nid` by `new`; refuse a sum past MAX_INT, which no
    JSON client could read back (it only grows on a create, update or approval)."""
    if old == new:
        return nodes
    node = nodes[nid]
    reserved = node.reserved - old + new
    unit = reserved.exceeds(_MAX_CAPACITY)
    if unit is not None:
        raise _Refuse("state", f"node {nid} cannot hold more {unit}: its reservations "
                      "would pass 2^53 - 1")
    return nodes.set(nid, _replace(node, reserved=reserved))


_MAX_CAPACITY = Capacity(MAX_INT, MAX_INT, MAX_INT, MAX_INT)


def _fits(node: Node, capacity: Capacity) -> None:
    unit = capacity.exceeds(node.capacity)
    if unit is not None:
        raise _Refuse("invalid", f"contract asks for {getattr(capacity, unit)} {unit} but "
                      f"node {node.id} has {getattr(node.capacity, unit)} in all")


def _deadline(requested: int | None, time: int) -> int:
    if requested is None:
        return time + DEFAULT_DEADLINE
    if requested <= time:
        raise _Refuse("invalid", f"deadline {requested} is not after the block time {time}")
    if requested > time + MAX_DEADLINE:
        raise _Refuse("invalid", f"deadline is more than {MAX_DEADLINE} s after the block time")
    return requested


def _check_approval(state: State, twin_id: int, where: tuple[int, int, int],
                    deployment_hash: str, signature: str) -> None:
    """`signature` is twin `twin_id`'s approval of `deployment_hash` as (contract, version,
    node) `where`: an approval of anything else, or a signature of another kind, fails."""
    twin = state.twins.get(twin_id)
    if twin is None:
        raise _Refuse("not_found", f"twin {twin_id} is not registered")
    digest = approval_digest(*where, deployment_hash)
    if not verify(Domain.APPROVAL, twin.public_key, digest, bytes.fromhex(signature)):
        contract, version, node = where
        raise _Refuse(
            "bad_signature",
            f"approval signature of twin {twin_id} does not verify as an approval of "
            f"{deployment_hash} for contract {contract} version {version} on node {node}",
        )


def _owner_approval(state: State, twin_id: int, where: tuple[int, int, int],
                    deployment_hash: str, signature: str | None) -> Map[int, str]:
    """The approvals a new version starts with: the sender's, when it signed along."""
    if signature is None:
        return Map()
    _check_approval(state, twin_id, where, deployment_hash, signature)
    return Map({twin_id: signature})


def _check_stakeholders(state: State, *requirements: SignatureRequirement | None) -> None:
    for req in requirements:
        for r in req.requests if req else ():
            twin = state.twins.get(r.twin)
            if twin is None:
                raise _Refuse("not_found", f"stakeholder twin {r.twin} is not registered")
            if twin.public_key != r.key:
                raise _Refuse("invalid", f"stakeholder twin {r.twin} is listed with key "
                              f"{r.key[:16]}…, but its key is {twin.public_key[:16]}…")


def _signers(c: Contract) -> frozenset[int]:
    """Who may approve the pending version: its stakeholders, plus the active version's."""
    allowed = c.proposal.requirement.twins
    if c.active is not None:
        allowed |= c.active.requirement.twins
    return allowed


def _quorum(c: Contract) -> bool:
    """The pending version needs its own quorum and, for an update, the active one's too,
    so an update cannot drop stakeholders without their consent."""
    signed = c.proposal.approvals.keys()
    if not c.proposal.requirement.holds(signed):
        return False
    return c.active is None or c.active.requirement.holds(signed)


def _settle(state: State, c: Contract, time: int) -> State:
    """Store `c`; if its pending version now has its quorum, make it the active version.
    Keeps what `c` holds on its node, its deadline and its owner's pending count in step."""
    old = state.contracts.get(c.id)
    before = ZERO if old is None else holds(old, c.id in state.lapses)
    deadlines, lapses, pending = state.deadlines, state.lapses, state.pending_by_owner
    billable = state.billable
    if _quorum(c):
        c = activate(state, old, c, time)
        if c.state == GRACE:  # an update approved in grace: still unpaid
            assert c.billing is not None
            c = _replace(c, active=c.proposal, report=None, updated=time,
                         billing=_replace(c.billing, resume=APPROVED))
        else:
            c = _replace(c, active=c.proposal, state=APPROVED, report=None, updated=time)
            if c.billing is not None:
                billable = billable.set(c.id, True)
        if c.id in deadlines:
            deadlines = deadlines.delete(c.id)
            pending = _count(pending, c.owner, -1)
        lapses = lapses.delete(c.id) if c.id in lapses else lapses
    else:
        if c.id not in deadlines:
            pending = _count(pending, c.owner, 1)
            if pending[c.owner] > MAX_PENDING_PER_TWIN:
                raise _Refuse("state", f"twin {c.owner} already has {MAX_PENDING_PER_TWIN} "
                              "contracts waiting for approvals")
        deadlines = deadlines.set(c.id, c.proposal.deadline)
        if old is None or old.proposal.version != c.proposal.version:
            lapses = lapses.set(c.id, min(time + PENDING_HOLD, c.proposal.deadline))
    nodes = _reserve(state.nodes, c.node, before, holds(c, c.id in lapses))
    return _replace(
        state,
        contracts=state.contracts.set(c.id, c),
        nodes=nodes,
        deadlines=deadlines,
        lapses=lapses,
        pending_by_owner=pending,
        billable=billable,
        next_deadline=min(deadlines.values(), default=NEVER),
        next_lapse=min(lapses.values(), default=NEVER),
    )


def _receipt(c: Contract) -> Receipt:
    return {
        "contract": c.id,
        "node": c.node,
        "owner": c.owner,
        "state": c.state,
        "version": c.proposal.version,
    }


def _contract_create(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.ContractCreate = tx.payload
    if p.node not in state.nodes:
        raise _Refuse("not_found", f"node {p.node} does not exist")
    requirement = _requirement(p.signature_requirement, "signature_requirement", twin.id)
    delete_req = (
        _requirement(p.delete_requirement, "delete_requirement", twin.id)
        if p.delete_requirement else None
    )
    _check_stakeholders(state, requirement, delete_req)
    _derived_hash(p, requirement, delete_req)
    _fits(state.nodes[p.node], Capacity.of(p.capacity))
    # contract 0 in the owner's approval: the id is assigned by this very transaction
    approvals = _owner_approval(state, twin.id, (0, 1, p.node), p.deployment_hash, p.approval)
    cid = state.last_contract + 1
    version = Version(
        1,
        p.deployment_hash,
        p.instructions,
        requirement,
        Capacity.of(p.capacity),
        approvals,
        _deadline(p.deadline, time),
    )
    pool, held = _allocate_ips(state, state.nodes[p.node].farm, cid, p.ipv4, p.ipv6)
    c = Contract(cid, twin.id, p.node, CREATED, version, None, delete_req, p.metadata, time, time,
                 billing=new_billing(state, p, time), public_ips=held)
    state = _replace(
        state,
        public_ips=pool,
        contracts_by_node=_index_add(state.contracts_by_node, p.node, cid),
        contracts_by_owner=_index_add(state.contracts_by_owner, twin.id, cid),
        last_contract=cid,
    )
    state = _settle(state, c, time)
    return state, _receipt(state.contracts[cid])


def _live(c: Contract, action: str) -> None:
    if c.state in (CANCELLED, DELETED, EXPIRED):
        raise _Refuse("state", f"contract {c.id} is {c.state}: cannot {action}")


def _contract_approve(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.ContractApprove = tx.payload
    c = _contract(state, p.contract)
    _live(c, "approve")
    if not c.pending:
        raise _Refuse(
            "conflict", f"contract {c.id} version {c.proposal.version} is already approved"
        )
    if p.deployment_hash != c.proposal.deployment_hash:
        raise _Refuse(
            "state",
            f"approval is for deployment {p.deployment_hash} but contract {c.id} version "
            f"{c.proposal.version} is {c.proposal.deployment_hash}",
        )
    if twin.id not in _signers(c):
        raise _Refuse("unauthorized", f"twin {twin.id} is not a stakeholder of contract {c.id}")
    sid = state.solution_of.get(c.id)
    if sid is not None and c.proposal.version == 1:
        raise _Refuse("state", f"contract {c.id} is a part of solution {sid}: approve "
                      "the solution as a whole (solution.approve)")
    if twin.id in c.proposal.approvals:
        raise _Refuse("conflict", f"twin {twin.id} already approved contract {c.id} version "
                      f"{c.proposal.version}")
    _check_approval(state, twin.id, (c.id, c.proposal.version, c.node), p.deployment_hash,
                    p.signature)
    proposal = _replace(c.proposal, approvals=c.proposal.approvals.set(twin.id, p.signature))
    state = _settle(state, _replace(c, proposal=proposal, updated=time), time)
    return state, _receipt(state.contracts[c.id])


def _contract_update(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.ContractUpdate = tx.payload
    c = _contract(state, p.contract)
    if c.owner != twin.id:
        raise _Refuse("unauthorized", f"only the owner (twin {c.owner}) updates contract {c.id}")
    _live(c, "update")
    if c.state == GRACE:
        raise _Refuse("state", f"contract {c.id} is in grace (its owner has not paid): top up "
                      "the owner's balance before updating it")
    requirement = (
        _requirement(p.signature_requirement, "signature_requirement", twin.id)
        if p.signature_requirement is not None
        else c.proposal.requirement
    )
    _check_stakeholders(state, requirement)
    _derived_hash(p, requirement, c.delete_requirement)
    approvals = _owner_approval(state, twin.id, (c.id, c.proposal.version + 1, c.node),
                                p.deployment_hash, p.approval)
    capacity = c.proposal.capacity
    if p.capacity is not None:
        capacity = Capacity.of(p.capacity)
        _fits(state.nodes[c.node], capacity)
    _within_caps(state, c, capacity)
    proposal = Version(
        c.proposal.version + 1,
        p.deployment_hash,
        p.instructions,
        requirement,
        capacity,
        approvals,
        _deadline(p.deadline, time),
    )
    c = _replace(
        c,
        proposal=proposal,
        metadata=c.metadata if p.metadata is None else p.metadata,
        updated=time,
    )
    state = _settle(state, c, time)
    return state, _receipt(state.contracts[c.id])


def _finish(state: State, c: Contract, final: str, time: int) -> State:
    """Move `c` to a final or cancelled state, releasing what it held."""
    before = holds(state.contracts[c.id], c.id in state.lapses)
    state, c = stop_billing(state, c, time)
    deadlines, lapses, pending = state.deadlines, state.lapses, state.pending_by_owner
    if c.id in deadlines:
        deadlines = deadlines.delete(c.id)
        pending = _count(pending, c.owner, -1)
    lapses = lapses.delete(c.id) if c.id in lapses else lapses
    if final in FINAL_STATES:
        # a cancelled contract's node still has its addresses until it reports them gone
        pool, c = _release_ips(state.public_ips, c)
        state = _replace(state, public_ips=pool)
    if final not in FINAL_STATES and c.pending and c.active is not None:
        # a cancelled contract's pending version will never run: hold only the active one
        c = _replace(c, proposal=c.active)
    c = _replace(c, state=final, updated=time)
    return _replace(
        state,
        contracts=state.contracts.set(c.id, c),
        deadlines=deadlines,
        lapses=lapses,
        pending_by_owner=pending,
        nodes=_reserve(state.nodes, c.node, before, holds(c, False)),
        next_deadline=min(deadlines.values(), default=NEVER),
        next_lapse=min(lapses.values(), default=NEVER),
    )


def _contract_cancel(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.ContractCancel = tx.payload
    c = _contract(state, p.contract)
    _live(c, "cancel")
    quorum = c.delete_requirement or SignatureRequirement(
        (SignatureRequest(c.owner, state.twins[c.owner].public_key, 1, True),), 1)
    if twin.id not in quorum.twins:
        raise _Refuse("unauthorized",
                      f"twin {twin.id} is not in contract {c.id}'s delete requirement"
                      if c.delete_requirement else
                      f"only the owner (twin {c.owner}) cancels contract {c.id}")
    if twin.id in c.cancel_votes:
        raise _Refuse("conflict", f"twin {twin.id} already voted to cancel contract {c.id}")
    # the vote is signed on its own (not only as this transaction) so that the node can
    # check the delete quorum itself, with the keys of the deployment it runs
    if not verify(Domain.DELETE_VOTE, twin.public_key, delete_vote_digest(c.id, c.node),
                  bytes.fromhex(p.signature)):
        raise _Refuse("bad_signature", f"cancel vote of twin {twin.id} does not verify as a "
                      f"vote to cancel contract {c.id} on node {c.node}")
    c = _replace(c, cancel_votes=c.cancel_votes.set(twin.id, p.signature), updated=time)
    if quorum.holds(c.cancel_votes.keys()):
        # nothing was ever approved, so nothing runs: straight to deleted
        state = _finish(state, c, DELETED if c.active is None else CANCELLED, time)
    else:
        state = _replace(state, contracts=state.contracts.set(c.id, c))
    return state, _receipt(state.contracts[c.id])


def _contract_report(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.ContractReport = tx.payload
    c = _contract(state, p.contract)
    node = state.nodes[c.node]
    if node.twin != twin.id:
        raise _Refuse(
            "unauthorized", f"only node {c.node}'s twin ({node.twin}) reports on contract {c.id}"
        )
    if c.state in FINAL_STATES:
        raise _Refuse("state", f"contract {c.id} is {c.state}: nothing to report")
    if c.active is None:
        raise _Refuse("state", f"contract {c.id} has no approved version to report on")
    if p.version != c.active.version:
        raise _Refuse(
            "state", f"report for version {p.version}, but contract {c.id} runs version "
            f"{c.active.version}"
        )
    workloads = tuple(w.model_dump() for w in p.workloads)
    states = [w.state for w in p.workloads]
    if c.state == CANCELLED:
        new_state = DELETED if all(s == "deleted" for s in states) and not p.error else CANCELLED
    elif p.error or "error" in states:
        new_state = ERROR
    elif all(s != "init" for s in states):
        new_state = DEPLOYED
    else:
        new_state = APPROVED
    c = _replace(c, report=Report(p.version, time, p.error, workloads), updated=time)
    if c.state == GRACE:  # stays unpaid: a top-up returns it to what the node reported
        assert c.billing is not None
        c = _replace(c, billing=_replace(c.billing, resume=new_state))
        new_state = GRACE
    if new_state == DELETED:
        state = _finish(state, c, DELETED, time)
    else:
        state = _replace(state, contracts=state.contracts.set(c.id, _replace(c, state=new_state)))
    return state, _receipt(state.contracts[c.id])


# ---- names -------------------------------------------------------------------------------


# ---- solutions -----------------------------------------------------------------------------


def _solution_create(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.SolutionCreate = tx.payload
    if len(set(p.contracts)) != len(p.contracts):
        raise _Refuse("invalid", "a contract is listed twice in the solution")
    parts = []
    requirement: SignatureRequirement | None = None
    for cid in p.contracts:
        c = _contract(state, cid)
        if c.owner != twin.id:
            raise _Refuse("unauthorized", f"contract {cid} belongs to twin {c.owner}")
        if c.state != CREATED or c.active is not None or c.proposal.version != 1:
            raise _Refuse("state", f"contract {cid} is {c.state} (version "
                          f"{c.proposal.version}): a solution groups new contracts only")
        if c.proposal.approvals:
            raise _Refuse("state", f"contract {cid} already has approvals: a solution is "
                          "approved as a whole, so its contracts are created without any")
        if cid in state.solution_of:
            raise _Refuse("conflict", f"contract {cid} is already in solution "
                          f"{state.solution_of[cid]}")
        if requirement is None:
            requirement = c.proposal.requirement
        elif c.proposal.requirement != requirement:
            # one quorum for all: the parts become approved in the same transaction
            raise _Refuse("invalid", f"contract {cid} has another signature requirement than "
                          f"contract {p.contracts[0]}: a solution's parts share one")
        parts.append((cid, 1, c.node, c.proposal.deployment_hash))
    assert requirement is not None
    sid = state.last_solution + 1
    sol = Solution(sid, twin.id, tuple(sorted(parts)), requirement, p.metadata, time)
    of = state.solution_of
    for cid in p.contracts:
        of = of.set(cid, sid)
    state = _replace(state, solutions=state.solutions.set(sid, sol), solution_of=of,
                     solutions_by_owner=_index_add(state.solutions_by_owner, twin.id, sid),
                     last_solution=sid)
    return state, {"solution": sid, "owner": twin.id, "nodes": sorted({n for _, _, n, _ in
                                                                       sol.parts})}


def solution_price(state: State, sol: Solution, moved: tuple[int, Capacity] | None = None,
                   ) -> int:
    """What `sol` costs per month: each part's latest version's capacity at the prices its
    contract was created with (a part created before the grid was priced costs 0).
    `moved`: (contract, capacity) to count instead of that part's current capacity."""
    total = 0
    for cid, _version, _node, _h in sol.parts:
        c = state.contracts.get(cid)
        if c is None or c.billing is None:
            continue
        capacity = moved[1] if moved is not None and moved[0] == cid else c.proposal.capacity
        total += monthly(c.billing.prices, capacity.to_dict(), c.billing.ipv4, c.billing.names)
    return min(total, MAX_INT)


def _within_caps(state: State, c: Contract, capacity: Capacity) -> None:
    """A new version of a solution's part must keep the solution within every monthly
    cap its stakeholders approved it with (`solution.approve` with `max_cost`)."""
    sid = state.solution_of.get(c.id)
    sol = state.solutions.get(sid) if sid is not None else None
    if sol is None or not sol.caps:
        return
    price = solution_price(state, sol, (c.id, capacity))
    twin, cap = min(sol.caps.items(), key=lambda kv: (kv[1], kv[0]))
    if price > cap:
        raise _Refuse("invalid", f"with this version solution {sol.id} would cost {price} per "
                      f"month, over the {cap} twin {twin} approved it with")


def _solution_approve(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.SolutionApprove = tx.payload
    sol = state.solutions.get(p.solution)
    if sol is None:
        raise _Refuse("not_found", f"solution {p.solution} does not exist")
    req = SignatureRequirement.from_dict(sol.requirement.to_dict(), owner=sol.owner)
    if twin.id not in req.twins:
        raise _Refuse("unauthorized", f"twin {twin.id} is not a stakeholder of solution {sol.id}")
    if twin.id in sol.approvals:
        raise _Refuse("conflict", f"twin {twin.id} already approved solution {sol.id}")
    # every part still waiting: approving what is left of a broken solution would provision
    # part of it
    for cid, version, _node, h in sol.parts:
        c = state.contracts[cid]
        if c.state != CREATED or c.proposal.version != version \
                or c.proposal.deployment_hash != h:
            raise _Refuse("state", f"part contract {cid} of solution {sol.id} is {c.state}: "
                          "the solution can no longer be approved as a whole")
    digest = solution_digest(sol.id, list(sol.parts))
    if not verify(Domain.SOLUTION_APPROVAL, twin.public_key, digest, bytes.fromhex(p.signature)):
        raise _Refuse("bad_signature", f"signature of twin {twin.id} does not verify as an "
                      f"approval of solution {sol.id} and its {len(sol.parts)} parts")
    caps = sol.caps
    if p.max_cost is not None:
        price = solution_price(state, sol)
        if price > p.max_cost:
            raise _Refuse("invalid", f"solution {sol.id} costs {price} per month, over the "
                          f"{p.max_cost} twin {twin.id} approves")
        caps = caps.set(twin.id, p.max_cost)
    sol = _replace(sol, approvals=sol.approvals.set(twin.id, p.signature), caps=caps)
    state = _replace(state, solutions=state.solutions.set(sol.id, sol))
    parts = []
    for cid, _version, node, _h in sol.parts:
        c = state.contracts[cid]
        proposal = _replace(c.proposal, approvals=c.proposal.approvals.set(twin.id, p.signature),
                            solution=sol.id)
        state = _settle(state, _replace(c, proposal=proposal, updated=time), time)
        parts.append({"contract": cid, "node": node, "state": state.contracts[cid].state})
    return state, {"solution": sol.id, "owner": sol.owner, "twin": twin.id,
                   "nodes": sorted({x["node"] for x in parts}), "parts": parts}


def _name_register(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.NameRegister = tx.payload
    existing = state.names.get(p.name)
    if existing is not None:
        raise _Refuse("conflict", f"name {p.name!r} is taken by twin {existing.owner}")
    return _replace(
        state, names=state.names.set(p.name, Name(p.name, twin.id, time))
    ), {"name": p.name}


def _name_release(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.NameRelease = tx.payload
    existing = state.names.get(p.name)
    if existing is None:
        raise _Refuse("not_found", f"name {p.name!r} is not registered")
    if existing.owner != twin.id:
        raise _Refuse("unauthorized", f"name {p.name!r} belongs to twin {existing.owner}")
    return _replace(state, names=state.names.delete(p.name)), {"name": p.name}


# ---- gateways and public addresses -----------------------------------------------------


def _interface(value: str, version: int, what: str) -> str:
    """`value` (ADDRESS/PREFIX) in its one normal spelling, if it is a unicast address of
    IP version `version`."""
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise _Refuse("invalid", f"{what} {value!r} is not an address with its prefix "
                      f"length: {exc}") from None
    if iface.version != version:
        raise _Refuse("invalid", f"{what} {value!r} is not an IPv{version} address")
    ip = iface.ip
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        raise _Refuse("invalid", f"{what} {value!r} is not a unicast address a WAN reaches")
    return str(iface)


def _farmer(state: State, farm_id: int, twin: Twin, what: str) -> None:
    farm = state.farms.get(farm_id)
    if farm is None:
        raise _Refuse("not_found", f"farm {farm_id} does not exist")
    if farm.owner != twin.id:
        raise _Refuse("unauthorized", f"only farm {farm_id}'s farmer (twin {farm.owner}) "
                      f"sends {what}")


def _node_gateway(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.NodeGateway = tx.payload
    node = state.nodes.get(p.node)
    if node is None:
        raise _Refuse("not_found", f"node {p.node} does not exist")
    _farmer(state, node.farm, twin, f"node.gateway for node {node.id}")
    domains = state.gateway_domains
    if node.gateway is not None:
        domains = domains.delete(node.gateway.domain)
    if not p.domain:
        gateway = None
    else:
        holder = domains.get(p.domain)
        if holder is not None:
            raise _Refuse("conflict", f"domain {p.domain!r} is the domain of gateway node "
                          f"{holder}")
        if not p.ipv4 and not p.ipv6:
            raise _Refuse("invalid", "a gateway needs a public IPv4 or IPv6 address")
        v4 = _interface(p.ipv4, 4, "ipv4") if p.ipv4 else ""
        v6 = _interface(p.ipv6, 6, "ipv6") if p.ipv6 else ""
        for addr in (v4, v6):
            if addr and addr.split("/")[0] in state.public_ips:
                raise _Refuse("conflict", f"{addr} is an address of a farm's public pool")
        gateway = Gateway(p.domain, v4, v6, time)
        domains = domains.set(p.domain, node.id)
    node = _replace(node, gateway=gateway, updated=time)
    return _replace(state, nodes=state.nodes.set(node.id, node),
                    gateway_domains=domains), {"node": node.id}


def _farm_public_ips(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    p: t.FarmPublicIps = tx.payload
    _farmer(state, p.farm, twin, f"farm.public_ips for farm {p.farm}")
    pool = state.public_ips
    for entry in p.add:
        version = 6 if ":" in entry.ip else 4
        ip = _interface(entry.ip, version, "pool address")
        try:
            gw = ipaddress.ip_address(entry.gateway)
        except ValueError:
            raise _Refuse("invalid", f"gateway {entry.gateway!r} of {ip} is not an IP "
                          "address") from None
        if gw.version != version or gw not in ipaddress.ip_interface(ip).network:
            raise _Refuse("invalid", f"gateway {entry.gateway} is not in {ip}'s network")
        key = ip.split("/")[0]
        held = pool.get(key)
        if held is not None:
            raise _Refuse("conflict", f"{key} is already in the pool of farm {held.farm}")
        for gw_node in state.gateway_domains.values():
            g = state.nodes[gw_node].gateway
            if g is not None and key in (g.ipv4.split("/")[0], g.ipv6.split("/")[0]):
                raise _Refuse("conflict", f"{key} is gateway node {gw_node}'s own address")
        pool = pool.set(key, PoolIp(ip, p.farm, str(gw)))
    for value in p.remove:
        key = value.split("/")[0]
        held = pool.get(key)
        if held is None or held.farm != p.farm:
            raise _Refuse("not_found", f"{key} is not in the pool of farm {p.farm}")
        if held.contract:
            raise _Refuse("state", f"{key} is held by contract {held.contract}: it leaves the "
                          "pool once that contract ends")
        pool = pool.delete(key)
    return _replace(state, public_ips=pool), {"farm": p.farm}


def _allocate_ips(state: State, farm: int, cid: int, v4: int,
                  v6: int) -> tuple[Map[str, PoolIp], tuple[str, ...]]:
    """Take `v4` free IPv4 and `v6` free IPv6 addresses of `farm`'s pool for contract
    `cid` (lowest first). Transactions apply one at a time, so two contracts racing for
    the last address get it once: the second is refused."""
    pool = state.public_ips
    if not v4 and not v6:
        return pool, ()
    free = sorted((ipaddress.ip_address(k) for k, e in pool.items()
                   if e.farm == farm and not e.contract), key=lambda a: (a.version, a))
    held: list[str] = []
    for version, want in ((4, v4), (6, v6)):
        mine = [a for a in free if a.version == version][:want]
        if len(mine) < want:
            raise _Refuse("state", f"farm {farm}'s public IPv{version} pool is exhausted: "
                          f"{want} asked, {len(mine)} free")
        for a in mine:
            entry = pool[str(a)]
            pool = pool.set(str(a), _replace(entry, contract=cid))
            held.append(entry.ip)
    return pool, tuple(held)


def _release_ips(pool: Map[str, PoolIp], c: Contract) -> tuple[Map[str, PoolIp], Contract]:
    """Give the addresses `c` holds back to its farm's pool."""
    if not c.public_ips:
        return pool, c
    for ip in c.public_ips:
        key = ip.split("/")[0]
        entry = pool.get(key)
        if entry is not None and entry.contract == c.id:
            pool = pool.set(key, _replace(entry, contract=0))
    return pool, _replace(c, public_ips=())


# ---- the end of a grace period -----------------------------------------------------------


def _end_graces(state: State, time: int) -> State:
    """Contracts whose grace ran out are cancelled: the node decommissions them."""
    for cid, until in sorted(state.graces.items()):
        if until >= time:
            continue
        c = state.contracts[cid]
        b = c.billing
        assert b is not None
        state = _replace(state, graces=state.graces.delete(cid),
                         graced_owners=_count(state.graced_owners, c.owner, -1))
        c = _replace(c, billing=_replace(b, unpaid=b.unpaid + sum(b.due), due=(),
                                         resume="", grace_ended=time))
        state = _finish(state, c, CANCELLED, time)
    return _replace(state, next_grace=min(state.graces.values(), default=NEVER))


_HANDLERS: dict[str, Any] = {
    "farm.create": _farm_create,
    "node.register": _node_register,
    "node.update": _node_update,
    "node.heartbeat": _node_heartbeat,
    "template.publish": _template_publish,
    "contract.create": _contract_create,
    "contract.approve": _contract_approve,
    "contract.update": _contract_update,
    "contract.cancel": _contract_cancel,
    "contract.report": _contract_report,
    "solution.create": _solution_create,
    "solution.approve": _solution_approve,
    "name.register": _name_register,
    "name.release": _name_release,
    "node.gateway": _node_gateway,
    "farm.public_ips": _farm_public_ips,
    "contract.consumption": contract_consumption,
    "farm.prices": farm_prices,
    "balance.transfer": balance_transfer,
    "balance.faucet": balance_faucet,
    "validator.set": validator_set,
}

assert set(_HANDLERS) | {"twin.register", "grid.policy"} == t.TX_TYPES
