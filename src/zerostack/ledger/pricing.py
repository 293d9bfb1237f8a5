"""Prices and the arithmetic of a charge: what a contract costs for a span of ledger time,
and how the amount is split between farmer, template author and treasury.

Integers only: amounts are in the grid's base unit, shares in basis points (1/10,000),
resources in resource-seconds while they accrue. Every division rounds down, once, at the
end of a charge, so the same inputs always give the same amounts on every replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from zerostack.crypto import MAX_INT

GiB = 1 << 30
HOUR = 3600
BASIS = 10_000
"""Shares are in basis points: 10,000 is the whole amount."""

RESERVED = ("cru", "mru", "sru", "hru", "ipv4", "names")
"""Resources charged by the hour for what a contract reserves."""
RESOURCES = (*RESERVED, "traffic")
"""Every priced resource; traffic is charged per GiB counted by the node."""
UNIT = {"cru": 1, "mru": GiB, "sru": GiB, "hru": GiB, "ipv4": 1, "names": 1, "traffic": GiB}
"""What one price buys: a core, a GiB (memory, SSD, HDD, traffic), an address, a name."""


@dataclass(frozen=True, slots=True)
class Prices:
    """Base units per resource-hour (cru per core, mru/sru/hru per GiB, ipv4 per address,
    names per gateway name) and per GiB of traffic."""

    cru: int = 0
    mru: int = 0
    sru: int = 0
    hru: int = 0
    ipv4: int = 0
    names: int = 0
    traffic: int = 0

    @classmethod
    def of(cls, values: dict[str, int]) -> Prices:
        return cls(**{r: int(values.get(r, 0)) for r in RESOURCES})

    def to_dict(self) -> dict[str, int]:
        return {r: getattr(self, r) for r in RESOURCES}

    def outside(self, low: Prices, high: Prices) -> str | None:
        """The first resource priced below `low` or above `high`, with why."""
        for r in RESOURCES:
            value = getattr(self, r)
            if value < getattr(low, r):
                return f"{r} price {value} is below the grid's minimum {getattr(low, r)}"
            if value > getattr(high, r):
                return f"{r} price {value} is above the grid's maximum {getattr(high, r)}"
        return None

    def clamp(self, low: Prices, high: Prices) -> Prices:
        return Prices(*(min(max(getattr(self, r), getattr(low, r)), getattr(high, r))
                        for r in RESOURCES))


@dataclass(frozen=True, slots=True)
class Policy:
    """The grid's pricing policy, set by its governing key."""

    prices: Prices
    minimum: Prices
    maximum: Prices
    period: int  # seconds between billing boundaries (fixed for the grid's life)
    grace: int  # seconds an unpaid contract waits for a top-up
    treasury_share: int  # basis points of every charge
    max_author_share: int  # basis points: the most a template author may take
    max_traffic: int  # bytes one contract may report per period
    dev_faucet: bool  # fixed at genesis: only a development grid mints money

    def to_dict(self) -> dict[str, Any]:
        return {
            "prices": self.prices.to_dict(),
            "min": self.minimum.to_dict(),
            "max": self.maximum.to_dict(),
            "period": self.period,
            "grace": self.grace,
            "treasury_share": self.treasury_share,
            "max_author_share": self.max_author_share,
            "max_traffic": self.max_traffic,
            "dev_faucet": self.dev_faucet,
        }


def usage(units: tuple[int, ...], seconds: int) -> tuple[int, ...]:
    """Resource-seconds of reserving `units` (in RESERVED order) for `seconds`."""
    return tuple(u * seconds for u in units)


def add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def amounts(prices: Prices, resource_seconds: tuple[int, ...], traffic: int) -> dict[str, int]:
    """What `resource_seconds` (RESERVED order) and `traffic` bytes cost, per resource.
    Each amount is capped at 2^53 - 1: no balance can hold more, so a larger charge is
    simply unpayable, and every figure stays one JSON clients can read."""
    out = {}
    for r, rs in zip(RESERVED, resource_seconds, strict=True):
        out[r] = min(MAX_INT, getattr(prices, r) * rs // (UNIT[r] * HOUR))
    out["traffic"] = min(MAX_INT, prices.traffic * traffic // GiB)
    return out


def hourly(prices: Prices, units: tuple[int, ...]) -> int:
    """What reserving `units` (RESERVED order) costs per hour, rounded down."""
    return min(MAX_INT, sum(amounts(prices, usage(units, HOUR), 0).values()))


def split(total: int, treasury_share: int, author_share: int) -> tuple[int, int, int]:
    """(farmer, author, treasury) parts of `total`: the shares are rounded down and the
    farmer gets the rest, so the parts always add up to the total."""
    treasury = total * treasury_share // BASIS
    author = total * author_share // BASIS
    return total - treasury - author, author, treasury


# ---- what a deployment would cost, and where it is cheapest --------------------------

HOURS_PER_MONTH = 730
"""A month, for prices per month: a year of 8,760 hours over 12 months."""


def units_of(reserved: Mapping[str, int]) -> tuple[int, ...]:
    """`reserved` ({cru, mru, sru, hru, ipv4, names}, bytes for memory and disks; absent
    is 0) in RESERVED order."""
    return tuple(int(reserved.get(r, 0)) for r in RESERVED)


def cost(prices: Prices | Mapping[str, int], reserved: Mapping[str, int],
         hours: int = 1) -> int:
    """What reserving `reserved` for `hours` hours costs at `prices`, in base units (the
    ledger's arithmetic: per resource, rounded down once)."""
    p = prices if isinstance(prices, Prices) else Prices.of(dict(prices))
    return min(MAX_INT, sum(amounts(p, usage(units_of(reserved), hours * HOUR), 0).values()))


def monthly(prices: Prices | Mapping[str, int], capacity: Mapping[str, int], ipv4: int = 0,
            names: int = 0) -> int:
    """What a contract reserving `capacity` ({cru, mru, sru, hru}) with `ipv4` public
    addresses and `names` gateway names costs per month (730 h) at `prices`: the figure a
    budget cap (`solution approve --max-cost`) is held against."""
    return cost(prices, {**capacity, "ipv4": ipv4, "names": names}, HOURS_PER_MONTH)


@dataclass(frozen=True, slots=True)
class Offer:
    """One node that can take a deployment, and what the deployment would cost there."""

    node: int
    farm: int
    per_hour: int
    per_month: int


def _fits(node: Mapping[str, Any], reserved: Mapping[str, int]) -> bool:
    free = node.get("free") or {}
    return all(int(free.get(r, 0)) >= int(reserved.get(r, 0)) for r in ("cru", "mru", "sru", "hru"))


def rank_nodes(nodes: Iterable[Mapping[str, Any]], reserved: Mapping[str, int],
               node_prices: Mapping[int, Prices | Mapping[str, int] | None],
               max_cost: int | None = None) -> list[Offer]:
    """The nodes that can take a deployment reserving `reserved`, cheapest first.

    - `nodes`: node records as `GET /nodes` serves them (`id`, `farm`, `free`): the
      caller has already applied its other constraints (country, status, farm...).
    - `reserved`: what the deployment reserves: `cru` (cores), `mru`, `sru`, `hru`
      (bytes), `ipv4`, `names` (counts), e.g. `total_resources(workloads).to_dict()`
      merged with `priced_units(workloads)`.
    - `node_prices`: node id -> the prices a contract created there now gets
      (`GET /nodes/{id}/prices`, or `contract_prices` on a ledger state); a node absent
      from it is left out; None (a grid that prices nothing) costs 0.
    - `max_cost`: the most the deployment may cost per month (730 h), in base units;
      a node above it is left out.

    Ties go to the lower node id, so the choice is the same on every run. Traffic is
    not in the estimate: it is charged as counted."""
    offers = []
    for node in nodes:
        nid = int(node["id"])
        if nid not in node_prices or not _fits(node, reserved):
            continue
        prices = node_prices[nid]
        hour = 0 if prices is None else cost(prices, reserved)
        month = 0 if prices is None else cost(prices, reserved, HOURS_PER_MONTH)
        if max_cost is not None and month > max_cost:
            continue
        offers.append(Offer(nid, int(node.get("farm", 0)), hour, month))
    return sorted(offers, key=lambda o: (o.per_month, o.node))


def cheapest_node(nodes: Iterable[Mapping[str, Any]], reserved: Mapping[str, int],
                  node_prices: Mapping[int, Prices | Mapping[str, int] | None],
                  max_cost: int | None = None) -> Offer | None:
    """The cheapest node of `rank_nodes` (same arguments); None when no node fits."""
    ranked = rank_nodes(nodes, reserved, node_prices, max_cost)
    return ranked[0] if ranked else None


DEV_POLICY: dict[str, Any] = {
    "prices": {"cru": 1000, "mru": 500, "sru": 20, "hru": 5, "ipv4": 800, "names": 100,
               "traffic": 50},
    "min": {r: 0 for r in RESOURCES},
    "max": {"cru": 100_000, "mru": 50_000, "sru": 2_000, "hru": 500, "ipv4": 80_000,
            "names": 10_000, "traffic": 5_000},
    "period": 3600,
    "grace": 24 * 3600,
    "treasury_share": 1000,
    "max_author_share": 2000,
    "max_traffic": 1 << 40,
}
"""The policy `ledger serve --dev-faucet` starts a development grid with (without
`--policy`): amounts in base units, 1,000,000 base units being one token."""
