"""The ledger's records and its State: frozen dataclasses and persistent maps, with the
few helpers the transition functions share (fast record replacement, indexes, refusals).

Nothing here decides anything: `state.py` (the transition function) and `billing.py`
(prices and charges) do, on these values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
from immutables import Map

from zerostack.crypto import SignatureRequirement
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
class Gateway(_PlainRecord):
    """What makes a node a gateway: its domain and its public addresses on the WAN."""

    domain: str
    ipv4: str
    ipv6: str
    updated: int


@dataclass(frozen=True, slots=True)
class PoolIp(_PlainRecord):
    """An address of a farm's public pool and the contract holding it (0: free)."""

    ip: str
    farm: int
    gateway: str
    contract: int = 0


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
    gateway: Gateway | None = None  # set by the farmer with node.gateway
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
                "gateway": self.gateway.to_dict() if self.gateway else None,
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
    solution: int = 0  # != 0: the approvals are solution approvals of this solution

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "deployment_hash": self.deployment_hash,
            "instructions": self.instructions,
            "signature_requirement": self.requirement.to_dict(),
            "capacity": self.capacity.to_dict(),
            "approvals": {str(k): v for k, v in sorted(self.approvals.items())},
            "deadline": self.deadline,
            "solution": self.solution,
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
    grace_ended: int = 0  # the block time its grace ran out (it was cancelled unpaid)

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
            "grace_ended": self.grace_ended,
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
    public_ips: tuple[str, ...] = ()  # addresses of the farm's pool it holds while it lives

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
            "solution": p.solution,
            "pending": self.pending,
            "active": self.active.to_dict() if self.active else None,
            "cancel_votes": {str(k): v for k, v in sorted(self.cancel_votes.items())},
            "report": self.report.to_dict() if self.report else None,
            "billing": self.billing.to_dict() if self.billing else None,
            "metadata": self.metadata,
            "public_ips": list(self.public_ips),
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(frozen=True, slots=True)
class Solution:
    """Contracts on several nodes made from one request and approved as one: each
    stakeholder signs once over every part's (contract, version, node, deployment hash)."""

    id: int
    owner: int
    parts: tuple[tuple[int, int, int, str], ...]  # (contract, version, node, deployment hash)
    requirement: SignatureRequirement
    metadata: str
    created: int
    approvals: Map[int, str] = field(default_factory=Map)  # twin -> solution approval
    caps: Map[int, int] = field(default_factory=Map)  # twin -> the max_cost it approved with

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_cost": {str(k): v for k, v in sorted(self.caps.items())},
            "id": self.id,
            "owner": self.owner,
            "parts": [{"contract": c, "version": v, "node": n, "deployment_hash": h}
                      for c, v, n, h in self.parts],
            "signature_requirement": self.requirement.to_dict(),
            "approvals": {str(k): v for k, v in sorted(self.approvals.items())},
            "metadata": self.metadata,
            "created": self.created,
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
    gateway_domains: Map[str, int] = field(default_factory=_empty)  # domain -> node
    public_ips: Map[str, PoolIp] = field(default_factory=_empty)  # address/prefix -> entry
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
    solutions: Map[int, Solution] = field(default_factory=_empty)
    solution_of: Map[int, int] = field(default_factory=_empty)  # contract -> its solution
    solutions_by_owner: Map[int, Map[int, bool]] = field(default_factory=_empty)
    last_solution: int = 0
    # ---- validators (ledger/validators.py): the keys whose signatures make a block final
    validators: tuple[str, ...] = ()
    validator_epoch: int = 0
    # every change of the set: (epoch, new set, approvals (key, signature) of the previous
    # set that authorised it, hash of the transaction that made it)
    validator_changes: tuple[
        tuple[int, tuple[str, ...], tuple[tuple[str, str], ...], str], ...] = ()


def genesis(operator: str | None = None, validators: tuple[str, ...] | None = None) -> State:
    """The empty state every ledger starts from; `operator` is the key that signs the
    ledger's blocks, which also governs the grid's pricing policy. `validators` is the
    genesis validator set (default: the operator alone, a one-validator grid)."""
    if validators is None:
        validators = (operator,) if operator else ()
    return State(operator=operator, validators=tuple(validators))


def replace_record(obj: Any, **changes: Any) -> Any:
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


def index_add(index: Map[K, Map[int, bool]], key: K, item: int) -> Map[K, Map[int, bool]]:
    return index.set(key, index.get(key, Map()).set(item, True))


def index_remove(index: Map[K, Map[int, bool]], key: K, item: int) -> Map[K, Map[int, bool]]:
    members = index.get(key)
    if members is None or item not in members:
        return index
    members = members.delete(item)
    return index.set(key, members) if members else index.delete(key)


class Refuse(Exception):
    """Internal: unwinds a handler with a Rejected (nothing was committed)."""

    def __init__(self, code: str, reason: str) -> None:
        self.rejected = Rejected(code, reason)


def count(counts: Map[int, int], key: int, delta: int) -> Map[int, int]:
    n = counts.get(key, 0) + delta
    return counts.set(key, n) if n else counts.delete(key)


def get_contract(state: State, cid: int) -> Contract:
    c = state.contracts.get(cid)
    if c is None:
        raise Refuse("not_found", f"contract {cid} does not exist")
    return c


def contract_ids(index: Map[int, Map[int, bool]], key: int) -> Iterable[int]:
    return index.get(key, Map()).keys()
