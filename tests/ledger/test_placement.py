"""Price-aware placement: the cheapest node with room, under an optional monthly cap."""

from __future__ import annotations

from zerostack.ledger.pricing import (
    HOURS_PER_MONTH,
    Offer,
    Prices,
    cheapest_node,
    cost,
    rank_nodes,
)

GiB = 1 << 30


def node(nid: int, farm: int, cru: int = 8, mru: int = 16 * GiB) -> dict[str, object]:
    return {"id": nid, "farm": farm, "free": {"cru": cru, "mru": mru, "sru": 0, "hru": 0}}


def test_cost_is_the_ledgers_arithmetic() -> None:
    p = Prices(cru=1000, mru=500, ipv4=800)
    need = {"cru": 2, "mru": 4 * GiB, "ipv4": 1}
    assert cost(p, need) == 2 * 1000 + 4 * 500 + 800
    assert cost(p.to_dict(), need, HOURS_PER_MONTH) == (2000 + 2000 + 800) * 730
    assert cost(Prices(mru=1), {"mru": GiB // 2}) == 0  # rounded down, per resource


def test_cheapest_node_with_room_within_max_cost() -> None:
    need = {"cru": 2, "mru": 2 * GiB}
    nodes = [node(1, 1), node(2, 2), node(3, 3, cru=1), node(4, 2), node(5, 4)]
    prices = {1: Prices(cru=1000, mru=500), 2: {"cru": 600, "mru": 400},
              3: Prices(), 4: {"cru": 600, "mru": 400}}  # node 5: no prices known
    ranked = rank_nodes(nodes, need, prices)
    # node 3 is free but too small; node 5 is left out; 2 and 4 tie: lower id first
    assert [o.node for o in ranked] == [2, 4, 1]
    assert ranked[0] == Offer(2, 2, 2000, 2000 * 730)
    assert cheapest_node(nodes, need, prices) == ranked[0]
    assert [o.node for o in rank_nodes(nodes, need, prices, max_cost=2000 * 730)] == [2, 4]
    assert cheapest_node(nodes, need, prices, max_cost=2000 * 730 - 1) is None
    # a grid that prices nothing: every node with room costs 0, in id order
    free = {n: None for n in (1, 2, 3, 4, 5)}
    assert [o.node for o in rank_nodes(nodes, need, free, max_cost=0)] == [1, 2, 4, 5]
