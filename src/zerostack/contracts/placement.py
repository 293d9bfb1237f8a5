"""Placement: which node runs each part copy of a Plan. A pure function over the nodes a
ledger query returned (and their prices when the grid has any): it honours country, farm,
disk type, public IP, free capacity, distinct nodes per part, a spread over N nodes and N
farms, and a monthly budget; it prefers the cheapest nodes; when nothing fits it names the
rule no node meets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zerostack.contracts.errors import PlacementError
from zerostack.contracts.expand import PartPlan, Plan
from zerostack.ledger.pricing import Prices, hourly
from zerostack.workloads import Resources, priced_units

HOURS_PER_MONTH = 730
GiB = 1 << 30


@dataclass(frozen=True)
class NodeOffer:
    """What placement needs to know of a node (from the ledger's node view)."""

    id: int
    farm: int
    country: str
    free: Resources
    capacity: Resources
    public: bool
    up: bool = True
    gateway: bool = False  # its farmer made it a gateway (node.gateway with a domain)
    reachable: bool = True  # it registered an address (a node behind NAT has none)

    @classmethod
    def of(cls, view: Mapping[str, Any]) -> NodeOffer:
        free, cap = view.get("free") or {}, view.get("capacity") or {}
        return cls(int(view["id"]), int(view["farm"]),
                   str((view.get("location") or {}).get("country", "")),
                   Resources(**{u: int(free.get(u, 0)) for u in ("cru", "mru", "sru", "hru")}),
                   Resources(**{u: int(cap.get(u, 0)) for u in ("cru", "mru", "sru", "hru")}),
                   bool(view.get("public_ips")), view.get("status", "up") == "up",
                   bool((view.get("gateway") or {}).get("domain")),
                   bool(view.get("endpoint")))


@dataclass(frozen=True)
class Placed:
    """The outcome: node per part copy (by PartPlan.key) and the price of each part."""

    nodes: dict[str, int]
    hourly: dict[str, int]

    @property
    def per_hour(self) -> int:
        return sum(self.hourly.values())

    @property
    def per_month(self) -> int:
        return self.per_hour * HOURS_PER_MONTH


def part_hourly(part: PartPlan, prices: Prices | None) -> int:
    if prices is None:
        return 0
    r = part.resources
    units = priced_units(part.workloads)
    return hourly(prices, (r.cru, r.mru, r.sru, r.hru, units["ipv4"], units["names"]))


def _gib(n: int) -> str:
    return f"{-(-n // GiB)} GiB"


def _need_text(part: PartPlan, copies: int) -> str:
    r, w = part.resources, part.where
    where = f" in {w.country}" if w.country else ""
    if w.farm is not None:
        where += f" of farm {w.farm}"
    bits = []
    if r.hru:
        bits.append(f"{_gib(r.hru)} free HDD")
    if r.sru:
        bits.append(f"{_gib(r.sru)} free SSD")
    if r.mru:
        bits.append(f"{_gib(r.mru)} free memory")
    if r.cru:
        bits.append(f"{r.cru} free core{'s' if r.cru > 1 else ''}")
    if part.gateway is not None:
        bits.append("a gateway")
    elif w.public_ip:
        bits.append("a public IP")
    if part.followed:
        bits.append("an address its replicas reach")
    if w.disk_type and not (r.hru or r.sru):
        bits.append(f"{w.disk_type.upper()} disks")
    what = " and ".join(bits) if bits else "room"
    n = f"{copies} nodes" if copies > 1 else "a node"
    return f"no {n}{where} with {what}"


def _eligible(part: PartPlan, node: NodeOffer) -> bool:
    w = part.where
    if not node.up or (part.followed and not node.reachable):
        return False
    if w.country is not None and node.country != w.country:
        return False
    if w.farm is not None and node.farm != w.farm:
        return False
    if part.gateway is not None:
        if not node.gateway:  # a gateway copy runs on a gateway node, public by making
            return False
    elif w.public_ip and not node.public:
        return False
    if w.disk_type == "hdd" and node.capacity.hru == 0:
        return False
    return not (w.disk_type == "ssd" and node.capacity.sru == 0)


def _swap_apart(part: PartPlan, cands: list[NodeOffer], avoid: set[int], plan: Plan,
                out: dict[str, int], free: dict[int, Resources],
                eligible: Mapping[str, list[NodeOffer]],
                prices: Mapping[int, Prices | None]) -> tuple[NodeOffer, dict[str, int]] | None:
    """Every node left for `part` holds what it must stay apart from (its primary or
    replica): move an already placed copy of the same part to such a node and take that
    copy's node instead, when both still meet every rule. Returns the node the other copy
    moved to and the new prices of both (`out` and `free` updated), or None when no such
    swap exists."""
    by_key = {p.key: p for p in plan.parts}
    for key, z in sorted(out.items()):
        other = by_key[key]
        if other.part != part.part or z in avoid:
            continue
        other_avoid = {out[k] for k in other.apart_from if k in out}
        for y in cands:
            if y.id in other_avoid or y not in eligible[other.key] \
                    or other.resources.fits_in(free[y.id]) is not None:
                continue
            if part.resources.fits_in(free[z] + other.resources) is not None:
                continue
            free[y.id] = free[y.id] - other.resources
            free[z] = free[z] + other.resources - part.resources
            out[other.key], out[part.key] = y.id, z
            return y, {other.key: part_hourly(other, prices.get(y.id)),
                       part.key: part_hourly(part, prices.get(z))}
    return None


def place(plan: Plan, nodes: Sequence[NodeOffer],
          prices: Mapping[int, Prices | None] | None = None) -> Placed:
    """Assign every part copy of `plan` to a node; raise PlacementError naming the unmet
    constraint. Deterministic for the same inputs (ties go to the lower node id)."""
    prices = prices or {}
    free = {n.id: n.free for n in nodes}
    by_id = {n.id: n for n in nodes}
    used_nodes: dict[int, int] = {}
    used_farms: set[int] = set()
    taken: dict[str, set[int]] = {}
    out: dict[str, int] = {}
    cost: dict[str, int] = {}
    copies = {p.part: sum(1 for q in plan.parts if q.part == p.part) for p in plan.parts}
    # the largest parts first: they have the fewest candidates
    order = sorted(plan.parts, key=lambda p: (-(p.resources.hru + p.resources.sru
                                               + p.resources.mru), p.key))
    eligible = {p.key: [n for n in nodes if _eligible(p, n)] for p in plan.parts}
    for part in order:
        need = part.resources
        cands = [n for n in eligible[part.key]
                 if need.fits_in(free[n.id]) is None
                 and not (part.where.distinct and n.id in taken.get(part.part, set()))]
        avoid = {out[k] for k in part.apart_from if k in out}
        if cands and avoid and all(n.id in avoid for n in cands):
            moved = _swap_apart(part, cands, avoid, plan, out, free, eligible, prices)
            if moved is not None:
                to, prices_now = moved
                cost.update(prices_now)
                used_nodes[to.id] = used_nodes.get(to.id, 0) + 1
                used_farms.add(to.farm)
                taken.setdefault(part.part, set()).add(to.id)
                continue
            raise PlacementError(f"no node for part copy {part.key!r} other than node "
                                 f"{', '.join(map(str, sorted(avoid)))}, which holds "
                                 f"{', '.join(k for k in part.apart_from if k in out)}: a "
                                 "replica namespace must be on another node than its primary")
        cands = [n for n in cands if n.id not in avoid]
        if not cands:
            fitting = {n.id for n in eligible[part.key] if need.fits_in(n.free) is None}
            msg = _need_text(part, copies[part.part] if part.where.distinct else 1)
            have = len(fitting)
            raise PlacementError(f"{msg}: part {part.part!r} needs "
                                 f"{copies[part.part] if part.where.distinct else 1} "
                                 f"and {have} qualif{'ies' if have == 1 else 'y'}")
        spread_nodes = len(used_nodes) < plan.min_nodes
        spread_farms = len(used_farms) < plan.min_farms

        def rank(n: NodeOffer, part: PartPlan = part, spread_nodes: bool = spread_nodes,
                 spread_farms: bool = spread_farms) -> tuple[int, ...]:
            return (int(spread_farms and n.farm in used_farms),
                    int(spread_nodes and n.id in used_nodes),
                    part_hourly(part, prices.get(n.id)), n.id)

        best = min(cands, key=rank)
        out[part.key] = best.id
        cost[part.key] = part_hourly(part, prices.get(best.id))
        free[best.id] = free[best.id] - need
        used_nodes[best.id] = used_nodes.get(best.id, 0) + 1
        used_farms.add(best.farm)
        taken.setdefault(part.part, set()).add(best.id)
    if len(used_nodes) < plan.min_nodes:
        raise PlacementError(f"the template asks for a spread over at least {plan.min_nodes} "
                             f"nodes, but its parts fit on only {len(used_nodes)} eligible "
                             f"node{'s' if len(used_nodes) != 1 else ''}")
    farms = {by_id[n].farm for n in used_nodes}
    if len(farms) < plan.min_farms:
        raise PlacementError(f"the template asks for a spread over at least {plan.min_farms} "
                             f"farms, but only {len(farms)} eligible farm"
                             f"{'s' if len(farms) != 1 else ''} can hold its parts")
    placed = Placed(out, cost)
    if plan.max_cost is not None and placed.per_month > plan.max_cost:
        raise PlacementError(f"the cheapest placement costs {placed.per_month} per month, "
                             f"over max_cost {plan.max_cost}")
    return placed
