"""The ledger's state machine: `apply(state, tx, time=...)` returns a new State or a Rejected.

Pure and deterministic, like etcd's raft: no I/O, no clock (the block's time is passed in),
no mutation (maps are persistent `immutables.Map`s and records are frozen dataclasses, so
an old State stays valid and a rejected transaction leaves nothing behind). Storage,
ordering and HTTP live in other modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
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
    verify,
)
from zerostack.ledger import pricing as pr
from zerostack.ledger import tx as t
from zerostack.ledger.errors import Rejected
from zerostack.ledger.pricing import Policy, Prices

CREATED = "created"
APPROVED = "approved"
DEPLOYED = "deployed"
ERROR = "error"
CANCELLED = "cancelled"
DELETED = "deleted"
EXPIRED = "expired"
GRACE = "grace"
CONTRACT_STATES = (CREATED, APPROVED, DEPLOYED, ERROR, GRACE, CANCELLED, DELETED, EXPIRED)
BILLED_STATES = frozenset({APPROVED, DEPLOYED, ERROR})
"""States whose contract pays at every boundary: it holds its reservation on the node."""
FINAL_STATES = frozenset({DELETED, EXPIRED})

DEFAULT_DEADLINE = 24 * 3600
"""Seconds a contract (or a new version) has to gather its approval quorum by default."""
MAX_DEADLINE = 30 * 24 * 3600
PENDING_HOLD = 15 * 60
"""Seconds a version waiting for its approvals holds capacity on its node. After that it
holds nothing beyond the active version's until its quorum is reached, so unapproved
contracts cannot keep a node looking full."""
MAX_PENDING_PER_TWIN = 64
"""Most contracts one twin may have waiting for approvals at once."""
NEVER = 2**62
"""A time after every deadline: the value of `next_deadline` when there is none."""
MAX_HISTORY = 1000
"""Charge rows kept per contract and payout rows per twin (totals are kept forever)."""

K = TypeVar("K")
V = TypeVar("V")

Receipt = dict[str, Any]
"""What a transaction did, for events and clients (ids it created or touched)."""


# ---- records ---------------------------------------------------------------------------


class _PlainRecord:
    """A record whose JSON is its fields, in their declared order (tuples as lists)."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, slots=True)
class Capacity:
    cru: int = 0
    mru: int = 0
    sru: int = 0
    hru: int = 0

    @classmethod
    def of(cls, model: t.Capacity | None) -> Capacity:
        if model is None:
            return ZERO
        return cls(model.cru, model.mru, model.sru, model.hru)

    def __add__(self, o: Capacity) -> Capacity:
        return Capacity(self.cru + o.cru, self.mru + o.mru, self.sru + o.sru, self.hru + o.hru)

    def __sub__(self, o: Capacity) -> Capacity:
        return Capacity(self.cru - o.cru, self.mru - o.mru, self.sru - o.sru, self.hru - o.hru)

    def cover(self, o: Capacity) -> Capacity:
        """The least capacity that holds both (the larger of each unit)."""
        return Capacity(max(self.cru, o.cru), max(self.mru, o.mru), max(self.sru, o.sru),
                        max(self.hru, o.hru))

    def exceeds(self, o: Capacity) -> str | None:
        """The first unit in which self is larger than `o`, if any."""
        for unit in ("cru", "mru", "sru", "hru"):
            if getattr(self, unit) > getattr(o, unit):
                return unit
        return None

    def to_dict(self) -> dict[str, int]:
        return {"cru": self.cru, "mru": self.mru, "sru": self.sru, "hru": self.hru}


ZERO = Capacity()


@dataclass(frozen=True, slots=True)
class Twin(_PlainRecord):
    id: int
    public_key: str
    nonce: int  # the next nonce this twin must use
    endpoint: str
    created: int


@dataclass(frozen=True, slots=True)
class Farm(_PlainRecord):
    id: int
    name: str
    owner: int
    public_ips: tuple[str, ...]
    pricing: dict[str, Any] | None  # never mutated
    created: int


@dataclass(frozen=True, slots=True)
class Node:
    id: int
    twin: int
    farm: int
    capacity: Capacity
    country: str
    city: str
    endpoint: str
    public_ips: tuple[str, ...]
    pricing: dict[str, Any] | None
    created: int
    updated: int
    used: Capacity = ZERO  # as reported by the node's last heartbeat
    reserved: Capacity = ZERO  # summed holds of its contracts (see `holds`)
    last_heartbeat: int = 0
    uptime: int = 0
    # derived once per version of the record: queries read them for thousands of nodes
    free: Capacity = field(init=False, compare=False)
    _view: dict[str, Any] | None = field(init=False, compare=False, repr=False)
    _json: bytes | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        c, u, r = self.capacity, self.used, self.reserved
        # total minus the larger of what the node says it uses and what contracts reserve
        free = Capacity(
            max(0, c.cru - max(u.cru, r.cru)),
            max(0, c.mru - max(u.mru, r.mru)),
            max(0, c.sru - max(u.sru, r.sru)),
            max(0, c.hru - max(u.hru, r.hru)),
        )
        object.__setattr__(self, "free", free)
        object.__setattr__(self, "_view", None)
        object.__setattr__(self, "_json", None)

    def to_dict(self) -> dict[str, Any]:
        """The node as JSON; built once per record and shared, so callers must not mutate it."""
        if self._view is None:
            object.__setattr__(self, "_view", {
                "id": self.id,
                "twin": self.twin,
                "farm": self.farm,
                "capacity": self.capacity.to_dict(),
                "used": self.used.to_dict(),
                "reserved": self.reserved.to_dict(),
                "free": self.free.to_dict(),
                "location": {"country": self.country, "city": self.city},
                "endpoint": self.endpoint,
                "public_ips": list(self.public_ips),
                "pricing": self.pricing,
                "created": self.created,
                "updated": self.updated,
                "last_heartbeat": self.last_heartbeat,
                "uptime": self.uptime,
            })
        assert self._view is not None
        return self._view

    def to_json(self) -> bytes:
        """`to_dict()` encoded (sorted keys), cached like it."""
        if self._json is None:
            object.__setattr__(self, "_json", orjson.dumps(self.to_dict(),
                                                           option=orjson.OPT_SORT_KEYS))
        assert self._json is not None
        return self._json


@dataclass(frozen=True, slots=True)
class Template(_PlainRecord):
    hash: str
    name: str
    version: str
    description: str
    body: dict[str, Any]
    author: int
    created: int
    author_share: int = 0  # basis points of every charge of a contract made from it


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a contract's deployment, and the approvals gathered for it."""

    version: int
    deployment_hash: str
    instructions: str
    requirement: SignatureRequirement  # as given; the owner is added when checking
    capacity: Capacity
    approvals: Map[int, str] = field(default_factory=Map)  # twin -> signature hex
    deadline: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "deployment_hash": self.deployment_hash,
            "instructions": self.instructions,
            "signature_requirement": self.requirement.to_dict(),
            "capacity": self.capacity.to_dict(),
            "approvals": {str(k): v for k, v in sorted(self.approvals.items())},
            "deadline": self.deadline,
        }


@dataclass(frozen=True, slots=True)
class Report(_PlainRecord):
    version: int
    time: int
    error: str
    workloads: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Billing:
    """What a contract pays and where it stands: the prices it was created under (a later
    price change never reaches it), and what accrued since it was last charged."""

    prices: Prices
    ipv4: int
    names: int
    template: str  # "" when not made from a template
    author: int  # the template's author (0: none)
    author_share: int  # basis points, already capped by the policy of the day
    since: int  # charged up to this time (or active since)
    accrued: tuple[int, ...] = (0,) * len(pr.RESERVED)  # resource-seconds not charged yet
    traffic: int = 0  # reported bytes not charged yet
    last_period: int = -1  # the last period a consumption report was accepted for
    due: tuple[int, ...] = ()  # in grace: the unpaid charge, per resource (RESOURCES order)
    due_span: tuple[int, int] = (0, 0)  # in grace: the span the unpaid charge covers
    resume: str = ""  # in grace: the state a top-up returns to
    grace_until: int = 0
    charged: int = 0  # paid so far, in all
    totals: tuple[int, ...] = (0,) * len(pr.RESOURCES)  # paid so far, per resource
    unpaid: int = 0  # charges never paid (the contract ended in or into grace)
    consumption: dict[str, Any] | None = None  # the node's last accepted report

    def to_dict(self) -> dict[str, Any]:
        return {
            "prices": self.prices.to_dict(),
            "ipv4": self.ipv4,
            "names": self.names,
            "template": self.template,
            "author": self.author,
            "author_share": self.author_share,
            "since": self.since,
            "traffic_due": self.traffic,
            "last_period": self.last_period,
            "due": sum(self.due),
            "grace_until": self.grace_until,
            "charged": self.charged,
            "totals": dict(zip(pr.RESOURCES, self.totals, strict=True)),
            "unpaid": self.unpaid,
            "consumption": self.consumption,
        }


@dataclass(frozen=True, slots=True)
class Charge(_PlainRecord):
    """One charge of a contract: the span of ledger time it covers and who got what."""

    start: int
    end: int
    time: int  # the block time it was made at
    amounts: dict[str, int]  # per resource
    total: int
    status: str  # "paid", "late" (paid on a top-up in grace) or "unpaid"
    farmer: int
    farmer_amount: int
    author: int
    author_amount: int
    treasury_amount: int


@dataclass(frozen=True, slots=True)
class Payout(_PlainRecord):
    """What one twin received at one block, as farmer or as template author."""

    time: int
    role: str
    amount: int
    contracts: int


@dataclass(frozen=True, slots=True)
class FarmPricing:
    """A farm's own prices, and the ones it scheduled for later."""

    prices: Prices | None
    next: Prices | None = None
    at: int = NEVER

    def now(self, time: int) -> Prices | None:
        return self.next if self.next is not None and self.at <= time else self.prices


@dataclass(frozen=True, slots=True)
class Contract:
    id: int
    owner: int
    node: int
    state: str
    proposal: Version  # the latest version (waiting for its quorum unless == active)
    active: Version | None  # the latest approved version: what the node must run
    delete_requirement: SignatureRequirement | None  # None: the owner alone cancels
    metadata: str
    created: int
    updated: int
    cancel_votes: Map[int, str] = field(default_factory=Map)  # twin -> delete-vote signature
    report: Report | None = None
    billing: Billing | None = None  # None: created before the grid had a pricing policy

    @property
    def pending(self) -> bool:
        """A version is waiting for its approval quorum."""
        return self.active is None or self.active.version != self.proposal.version

    def to_dict(self) -> dict[str, Any]:
        p = self.proposal
        return {
            "id": self.id,
            "owner": self.owner,
            "node": self.node,
            "state": self.state,
            "version": p.version,
            "deployment_hash": p.deployment_hash,
            "instructions": p.instructions,
            "signature_requirement": p.requirement.to_dict(),
            "delete_requirement": (
                self.delete_requirement.to_dict() if self.delete_requirement else None
            ),
            "deadline": p.deadline,
            "capacity": p.capacity.to_dict(),
            "approvals": {str(k): v for k, v in sorted(p.approvals.items())},
            "pending": self.pending,
            "active": self.active.to_dict() if self.active else None,
            "cancel_votes": {str(k): v for k, v in sorted(self.cancel_votes.items())},
            "report": self.report.to_dict() if self.report else None,
            "billing": self.billing.to_dict() if self.billing else None,
            "metadata": self.metadata,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(frozen=True, slots=True)
class Name(_PlainRecord):
    name: str
    owner: int
    created: int


def _empty() -> Map[Any, Any]:
    return Map()


@dataclass(frozen=True, slots=True)
class State:
    """Everything the ledger knows, plus the indexes queries need."""

    twins: Map[int, Twin] = field(default_factory=_empty)
    twin_by_key: Map[str, int] = field(default_factory=_empty)
    farms: Map[int, Farm] = field(default_factory=_empty)
    farm_by_name: Map[str, int] = field(default_factory=_empty)
    nodes: Map[int, Node] = field(default_factory=_empty)
    node_by_twin: Map[int, int] = field(default_factory=_empty)
    nodes_by_country: Map[str, Map[int, bool]] = field(default_factory=_empty)
    nodes_by_farm: Map[int, Map[int, bool]] = field(default_factory=_empty)
    templates: Map[str, Template] = field(default_factory=_empty)
    contracts: Map[int, Contract] = field(default_factory=_empty)
    contracts_by_node: Map[int, Map[int, bool]] = field(default_factory=_empty)
    contracts_by_owner: Map[int, Map[int, bool]] = field(default_factory=_empty)
    deadlines: Map[int, int] = field(default_factory=_empty)  # contract -> pending deadline
    # contract -> when its pending version stops holding capacity (see PENDING_HOLD)
    lapses: Map[int, int] = field(default_factory=_empty)
    pending_by_owner: Map[int, int] = field(default_factory=_empty)  # twin -> len(deadlines)
    names: Map[str, Name] = field(default_factory=_empty)
    balances: Map[int, int] = field(default_factory=_empty)
    next_deadline: int = NEVER  # earliest value in `deadlines`, so tick() is O(1) mostly
    next_lapse: int = NEVER  # earliest value in `lapses`
    # ---- billing
    operator: str | None = None  # the ledger operator key: the grid's governing key
    policy: Policy | None = None  # None: nothing is priced (no grid.policy yet)
    policy_next: tuple[int, Policy] | None = None  # a policy scheduled for a later time
    governor_nonce: int = 0
    supply: int = 0  # all money minted: sum(balances) + treasury, always
    treasury: int = 0
    farm_prices: Map[int, FarmPricing] = field(default_factory=_empty)
    billable: Map[int, bool] = field(default_factory=_empty)  # contracts charged at boundaries
    graces: Map[int, int] = field(default_factory=_empty)  # contract in grace -> its end
    graced_owners: Map[int, int] = field(default_factory=_empty)  # twin -> contracts in grace
    charges: Map[int, tuple[Charge, ...]] = field(default_factory=_empty)
    payouts: Map[int, tuple[Payout, ...]] = field(default_factory=_empty)
    paid_out: Map[int, int] = field(default_factory=_empty)  # twin -> all it received
    next_bill: int = NEVER  # the next billing boundary
    next_grace: int = NEVER  # earliest value in `graces`
    last_twin: int = 0
    last_farm: int = 0
    last_node: int = 0
    last_contract: int = 0


def genesis(operator: str | None = None) -> State:
    """The empty state every ledger starts from; `operator` is the key that signs the
    ledger's blocks, which also governs the grid's pricing policy."""
    return State(operator=operator)


def _replace(obj: Any, **changes: Any) -> Any:
    """`dataclasses.replace`, but several times faster: State is replaced twice per
    transaction, so this is on the hot path."""
    cls = type(obj)
    fast = _REPLACERS.get(cls)
    if fast is None:
        fast = _REPLACERS[cls] = _compile_replacer(cls)
    return fast(obj, changes)


_REPLACERS: dict[type, Any] = {}


def _compile_replacer(cls: type) -> Any:
    # one straight-line function per record type, as dataclasses itself generates __init__
    names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
    body = ["def replace(obj, changes):", "    new = _new(cls)"]
    body += [f"    _set(new, {n!r}, changes.pop({n!r}) if {n!r} in changes else obj.{n})"
             for n in names]
    body += ["    if changes:",
             "        raise TypeError(f'{cls.__name__} has no field(s) {sorted(changes)}')"]
    if hasattr(cls, "__post_init__"):  # derived fields (Node.free...) are recomputed
        body.append("    new.__post_init__()")
    body.append("    return new")
    scope: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__, "cls": cls}
    exec("\n".join(body), scope)
    return scope["replace"]


def _index_add(index: Map[K, Map[int, bool]], key: K, item: int) -> Map[K, Map[int, bool]]:
    return index.set(key, index.get(key, Map()).set(item, True))


def _index_remove(index: Map[K, Map[int, bool]], key: K, item: int) -> Map[K, Map[int, bool]]:
    members = index.get(key)
    if members is None or item not in members:
        return index
    members = members.delete(item)
    return index.set(key, members) if members else index.delete(key)


# ---- the transition function -----------------------------------------------------------


class _Refuse(Exception):
    """Internal: unwinds a handler with a Rejected (nothing was committed)."""

    def __init__(self, code: str, reason: str) -> None:
        self.rejected = Rejected(code, reason)


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
            return _grid_policy(state, tx, time, verified)
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
        state = _bill(state, time)
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


def _count(counts: Map[int, int], key: int, delta: int) -> Map[int, int]:
    n = counts.get(key, 0) + delta
    return counts.set(key, n) if n else counts.delete(key)


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
        c = _activate(state, old, c, time)
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
    c = Contract(cid, twin.id, p.node, CREATED, version, None, delete_req, p.metadata, time, time,
                 billing=_new_billing(state, p, time))
    state = _replace(
        state,
        contracts_by_node=_index_add(state.contracts_by_node, p.node, cid),
        contracts_by_owner=_index_add(state.contracts_by_owner, twin.id, cid),
        last_contract=cid,
    )
    state = _settle(state, c, time)
    return state, _receipt(state.contracts[cid])


def _contract(state: State, cid: int) -> Contract:
    c = state.contracts.get(cid)
    if c is None:
        raise _Refuse("not_found", f"contract {cid} does not exist")
    return c


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
    state, c = _stop_billing(state, c, time)
    deadlines, lapses, pending = state.deadlines, state.lapses, state.pending_by_owner
    if c.id in deadlines:
        deadlines = deadlines.delete(c.id)
        pending = _count(pending, c.owner, -1)
    lapses = lapses.delete(c.id) if c.id in lapses else lapses
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


# ---- billing -----------------------------------------------------------------------------
#
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


def _grid_policy(state: State, tx: t.Tx, time: int, verified: bool) -> tuple[State, Receipt]:
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


def _farm_prices(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
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


def _new_billing(state: State, p: t.ContractCreate, time: int) -> Billing | None:
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


def _bill(state: State, time: int) -> State:
    """Charge every billed contract up to the last boundary at or before `time`."""
    policy = policy_at(state, time)
    assert policy is not None
    boundary = time // policy.period * policy.period
    books = _Books(state, time)
    for cid in state.billable:
        books.charge_to(state.contracts[cid], boundary, settle=False)
    return _replace(books.commit(), next_bill=boundary + policy.period)


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
                                         resume=""))
        state = _finish(state, c, CANCELLED, time)
    return _replace(state, next_grace=min(state.graces.values(), default=NEVER))


def _stop_billing(state: State, c: Contract, time: int) -> tuple[State, Contract]:
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


def _activate(state: State, old: Contract | None, c: Contract, time: int) -> Contract:
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


def _contract_consumption(state: State, tx: t.Tx, twin: Twin,
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
    if traffic > policy.max_traffic:
        raise _Refuse("invalid", f"report counts {traffic} bytes of traffic: the policy allows "
                      f"at most {policy.max_traffic} per period")
    report = {"period": p.period, "time": time, "reserved": reserved.model_dump(),
              "traffic_in": p.traffic_in, "traffic_out": p.traffic_out}
    b = _replace(b, traffic=b.traffic + traffic, last_period=p.period, consumption=report)
    c = _replace(c, billing=b)
    return _replace(state, contracts=state.contracts.set(c.id, c)), {
        "contract": c.id, "node": c.node, "owner": c.owner, "period": p.period}


def _balance_transfer(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
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


def _balance_faucet(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
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
    "name.register": _name_register,
    "name.release": _name_release,
    "contract.consumption": _contract_consumption,
    "farm.prices": _farm_prices,
    "balance.transfer": _balance_transfer,
    "balance.faucet": _balance_faucet,
}

assert set(_HANDLERS) | {"twin.register", "grid.policy"} == t.TX_TYPES


def contract_ids(index: Map[int, Map[int, bool]], key: int) -> Iterable[int]:
    return index.get(key, Map()).keys()
