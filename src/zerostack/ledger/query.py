"""Read-side queries over a materialized State: filters served by the API's GET endpoints.

Pure functions; the State's indexes (nodes by country and farm, contracts by node and
owner) keep the common queries well under a millisecond per thousand nodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zerostack.ledger.state import Contract, Node, State

NODE_DOWN_AFTER = 600
"""A node whose last heartbeat (or registration) is older than this many seconds is `down`."""


@dataclass(frozen=True)
class NodeFilter:
    country: str | None = None
    city: str | None = None
    farm: int | None = None
    twin: int | None = None
    free_cru: int = 0
    free_mru: int = 0
    free_sru: int = 0
    free_hru: int = 0
    status: str | None = None  # "up" | "down"


def node_status(node: Node, now: int, down_after: int = NODE_DOWN_AFTER) -> str:
    return "up" if node.last_heartbeat >= now - down_after else "down"


def node_view(node: Node, now: int) -> dict[str, Any]:
    return {**node.to_dict(), "status": node_status(node, now)}


def find_nodes(
    state: State, f: NodeFilter, *, now: int, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """Nodes matching every given criterion, by id."""
    return [node_view(n, now) for n in find_node_records(state, f, now=now, limit=limit,
                                                         offset=offset)]


def nodes_json(nodes: list[Node], now: int) -> bytes:
    """A JSON array of node views, spliced from each node's cached encoding."""
    parts = []
    for node in nodes:
        status = b'"up"' if node_status(node, now) == "up" else b'"down"'
        # the cached object ends with "}": add the status (key order is not significant)
        parts.append(node.to_json()[:-1] + b',"status":' + status + b"}")
    return b"[" + b",".join(parts) + b"]"


def find_node_records(
    state: State, f: NodeFilter, *, now: int, limit: int = 100, offset: int = 0
) -> list[Node]:
    """The Node records matching every given criterion, by id."""
    ids: Iterable[int]
    if f.twin is not None:
        nid = state.node_by_twin.get(f.twin)
        ids = [] if nid is None else [nid]
    elif f.country is not None:
        members = state.nodes_by_country.get(f.country)
        ids = sorted(members.keys()) if members is not None else []
    elif f.farm is not None:
        members = state.nodes_by_farm.get(f.farm)
        ids = sorted(members.keys()) if members is not None else []
    else:
        ids = sorted(state.nodes.keys())
    need_free = f.free_cru or f.free_mru or f.free_sru or f.free_hru
    out: list[Node] = []
    skipped = 0
    nodes = state.nodes
    for nid in ids:
        node = nodes[nid]
        if f.country is not None and node.country != f.country:
            continue
        if f.farm is not None and node.farm != f.farm:
            continue
        if f.city is not None and node.city != f.city:
            continue
        if need_free:
            free = node.free
            if (
                free.mru < f.free_mru
                or free.cru < f.free_cru
                or free.sru < f.free_sru
                or free.hru < f.free_hru
            ):
                continue
        if f.status is not None and node_status(node, now) != f.status:
            continue
        if skipped < offset:
            skipped += 1
            continue
        out.append(node)
        if len(out) >= limit:
            break
    return out


def find_contracts(
    state: State,
    *,
    owner: int | None = None,
    node: int | None = None,
    states: set[str] | None = None,
    twin: int | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Contracts by owner, node, states, or where `twin` is a stakeholder; by id."""
    ids: Iterable[int]
    if node is not None:
        members = state.contracts_by_node.get(node)
        ids = sorted(members.keys()) if members is not None else []
    elif owner is not None:
        members = state.contracts_by_owner.get(owner)
        ids = sorted(members.keys()) if members is not None else []
    else:
        ids = sorted(state.contracts.keys())
    out: list[dict[str, Any]] = []
    skipped = 0
    for cid in ids:
        c: Contract = state.contracts[cid]
        if owner is not None and c.owner != owner:
            continue
        if states is not None and c.state not in states:
            continue
        if twin is not None and twin != c.owner and twin not in c.proposal.requirement.twins:
            continue
        if skipped < offset:
            skipped += 1
            continue
        out.append(c.to_dict())
        if len(out) >= limit:
            break
    return out


def page(items: Iterable[Any], limit: int, offset: int) -> list[Any]:
    out: list[Any] = []
    for i, item in enumerate(items):
        if i < offset:
            continue
        if len(out) >= limit:
            break
        out.append(item)
    return out
