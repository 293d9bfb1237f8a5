"""The grid page's data: every node counted by country, farm and status, and one page of
nodes matching a filter, as compact rows (arrays, not objects) so that a grid of 10,000
nodes is summarised in a few kilobytes and the browser renders one page at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zerostack.ledger.query import node_status
from zerostack.ledger.records import Capacity, Node
from zerostack.ledger.state import State

MAX_QUERY = 64
"""Longest search text: an id, a country, a city, a farm name."""
MAX_PAGE = 500
"""Most node rows in one answer."""
MAX_FARMS = 500
"""Most farms listed in the summary (those with the most nodes)."""

ROW_COLUMNS = ("id", "farm", "country", "city", "up", "last_heartbeat", "capacity", "used",
               "reserved", "free")
"""What each node row holds, in order; capacities are [cru, mru, sru, hru]."""


@dataclass(frozen=True)
class GridQuery:
    country: str | None = None
    farm: int | None = None
    status: str | None = None  # "up" | "down"
    q: str = ""
    offset: int = 0
    limit: int = 50


def _units(c: Capacity) -> list[int]:
    return [c.cru, c.mru, c.sru, c.hru]


def _row(node: Node, up: bool) -> list[Any]:
    return [node.id, node.farm, node.country, node.city, 1 if up else 0, node.last_heartbeat,
            _units(node.capacity), _units(node.used), _units(node.reserved), _units(node.free)]


def _matches(node: Node, q: GridQuery, up: bool, farm_name: str, text: str) -> bool:
    if q.country is not None and node.country != q.country:
        return False
    if q.farm is not None and node.farm != q.farm:
        return False
    if q.status is not None and up != (q.status == "up"):
        return False
    if not text:
        return True
    if text.isdecimal():
        return node.id == int(text) or node.farm == int(text)
    return (text in node.city.casefold() or text == node.country.casefold()
            or text in farm_name)


def grid_summary(state: State, now: int) -> dict[str, Any]:
    """The whole grid counted: nodes up and down, by country and by farm, capacity totals."""
    names = {fid: farm.name for fid, farm in state.farms.items()}
    countries: dict[str, list[int]] = {}
    farms: dict[int, list[int]] = {}
    total = [0, 0, 0, 0]
    used = [0, 0, 0, 0]
    reserved = [0, 0, 0, 0]
    up_count = 0
    for node in state.nodes.values():
        up = node_status(node, now) == "up"
        by_country = countries.setdefault(node.country, [0, 0])
        by_farm = farms.setdefault(node.farm, [0, 0])
        by_country[0] += 1
        by_farm[0] += 1
        if up:
            up_count += 1
            by_country[1] += 1
            by_farm[1] += 1
        c, u, r = node.capacity, node.used, node.reserved
        total[0] += c.cru
        total[1] += c.mru
        total[2] += c.sru
        total[3] += c.hru
        used[0] += u.cru
        used[1] += u.mru
        used[2] += u.sru
        used[3] += u.hru
        reserved[0] += r.cru
        reserved[1] += r.mru
        reserved[2] += r.sru
        reserved[3] += r.hru
    top_farms = sorted(farms.items(), key=lambda kv: (-kv[1][0], kv[0]))[:MAX_FARMS]
    return {
        "now": now,
        "nodes_total": len(state.nodes),
        "up": up_count,
        "capacity": {"total": total, "used": used, "reserved": reserved},
        "countries": [[code, n[0], n[1]] for code, n in sorted(countries.items())],
        "farms": [[fid, names.get(fid, ""), n[0], n[1]] for fid, n in top_farms],
        "farms_total": len(farms),
    }


def grid_page(state: State, q: GridQuery, now: int) -> dict[str, Any]:
    """The nodes `q` selects, by id: how many match, and the rows of one page."""
    text = q.q.strip().casefold()[:MAX_QUERY]
    if q.country is not None:
        members = state.nodes_by_country.get(q.country)
        ids = sorted(members.keys()) if members is not None else []
    elif q.farm is not None:
        members = state.nodes_by_farm.get(q.farm)
        ids = sorted(members.keys()) if members is not None else []
    else:
        ids = sorted(state.nodes.keys())
    rows: list[list[Any]] = []
    if q.country is None and q.farm is None and q.status is None and not text:
        # nothing to test: the page is a slice of the ids
        for nid in ids[q.offset:q.offset + q.limit]:
            node = state.nodes[nid]
            rows.append(_row(node, node_status(node, now) == "up"))
        return {"matched": len(ids), "offset": q.offset, "limit": q.limit,
                "columns": list(ROW_COLUMNS), "nodes": rows}
    names = {fid: farm.name.casefold() for fid, farm in state.farms.items()} if text else {}
    matched = 0
    for nid in ids:
        node = state.nodes[nid]
        up = node_status(node, now) == "up"
        if _matches(node, q, up, names.get(node.farm, ""), text):
            if q.offset <= matched < q.offset + q.limit:
                rows.append(_row(node, up))
            matched += 1
    return {"matched": matched, "offset": q.offset, "limit": q.limit,
            "columns": list(ROW_COLUMNS), "nodes": rows}


def grid_view(state: State, q: GridQuery, now: int) -> dict[str, Any]:
    """The summary of the whole grid and the page of nodes `q` selects (by node id)."""
    return {**grid_summary(state, now), **grid_page(state, q, now)}


class SummaryCache:
    """The last grid summary, reused while the state and the clock's second are the same:
    many viewers of a big grid then cost one count per block, not one per request."""

    def __init__(self) -> None:
        self._key: tuple[State, int] | None = None
        self._summary: dict[str, Any] = {}

    def view(self, state: State, q: GridQuery, now: int) -> dict[str, Any]:
        key = self._key
        if key is None or key[0] is not state or key[1] != now:
            self._summary = grid_summary(state, now)
            self._key = (state, now)
        return {**self._summary, **grid_page(state, q, now)}
