"""The explorer's grid summary over a state: counts, capacity totals, filters, search, pages."""

from __future__ import annotations

from tests.ledger.world import GiB, World
from zerostack.ledger.explorer.grid import GridQuery, SummaryCache, grid_view


def world() -> tuple[World, dict[str, int]]:
    w = World()
    farmer = w.twin()
    farms = {"north": w.farm(farmer, "north"), "south": w.farm(farmer, "south")}
    nodes: dict[str, int] = {}
    for name, farm, country in (("a", "north", "BE"), ("b", "north", "NL"),
                                ("c", "south", "NL"), ("d", "south", "DE")):
        nodes[name], twin = w.node(farms[farm], country, mru=8 * GiB, cru=4)
        nodes[f"{name}-twin"] = twin
    w.time += 700  # every node is down now...
    w.ok(nodes["b-twin"], "node.heartbeat", {"used": {"cru": 1, "mru": GiB}})  # ...but b
    return w, {**nodes, **{f"farm-{k}": v for k, v in farms.items()}}


def ids(view: dict[str, object]) -> list[int]:
    return [row[0] for row in view["nodes"]]  # type: ignore[attr-defined,index]


def test_counts_by_country_and_farm_and_capacity_totals() -> None:
    w, n = world()
    view = grid_view(w.state, GridQuery(), w.time)
    assert (view["nodes_total"], view["up"], view["matched"], view["farms_total"]) == (4, 1, 4, 2)
    assert view["countries"] == [["BE", 1, 0], ["DE", 1, 0], ["NL", 2, 1]]
    assert view["farms"] == [[n["farm-north"], "north", 2, 1], [n["farm-south"], "south", 2, 0]]
    assert view["capacity"]["total"][:2] == [16, 32 * GiB]
    assert view["capacity"]["used"][:2] == [1, GiB]
    row = next(r for r in view["nodes"] if r[0] == n["b"])
    assert dict(zip(view["columns"], row, strict=True))["up"] == 1
    assert row[6][:2] == [4, 8 * GiB] and row[9][:2] == [3, 7 * GiB]


def test_filters_search_and_pages() -> None:
    w, n = world()

    def find(**kw: object) -> list[int]:
        return ids(grid_view(w.state, GridQuery(**kw), w.time))  # type: ignore[arg-type]

    assert find(country="NL") == [n["b"], n["c"]]
    assert find(status="up") == [n["b"]]
    assert find(status="down", country="NL") == [n["c"]]
    assert find(farm=n["farm-south"]) == [n["c"], n["d"]]
    assert find(q="SOUTH") == [n["c"], n["d"]]  # a farm name, any case
    assert find(q="de") == [n["d"]]  # a country code
    assert find(q=str(n["d"])) == [n["d"]]  # a node id...
    # ...or a farm id: node 2 and the nodes of farm 2
    assert (n["b"], n["farm-south"]) == (2, 2)
    assert find(q="2") == [n["b"], n["c"], n["d"]]
    assert find(q="nothing") == []
    assert find(q="²") == []  # a digit that is no decimal number: a search, not an error
    view = grid_view(w.state, GridQuery(offset=1, limit=2), w.time)
    assert ids(view) == [n["b"], n["c"]] and view["matched"] == 4
    # the summary counts the whole grid whatever the filter
    assert grid_view(w.state, GridQuery(country="BE"), w.time)["nodes_total"] == 4


def test_the_cached_summary_follows_the_state_and_the_clock() -> None:
    w, n = world()
    cache = SummaryCache()
    first = cache.view(w.state, GridQuery(), w.time)
    assert first == grid_view(w.state, GridQuery(), w.time)
    assert cache.view(w.state, GridQuery(status="up"), w.time) == grid_view(
        w.state, GridQuery(status="up"), w.time)
    w.ok(n["c-twin"], "node.heartbeat", {})  # a new state: c is up
    assert cache.view(w.state, GridQuery(), w.time)["up"] == 2
    # the same state a second later... and 700 s later, when b's heartbeat is old
    assert cache.view(w.state, GridQuery(), w.time + 1)["up"] == 2
    assert cache.view(w.state, GridQuery(), w.time + 700)["up"] == 0
