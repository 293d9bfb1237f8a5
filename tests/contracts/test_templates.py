"""Templates: loading with positions, parameters, sandboxed expansion, placement."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostack.contracts import (
    NodeOffer,
    PlacementError,
    TemplateError,
    expand,
    load_text,
    place,
)
from zerostack.contracts.sandbox import MAX_OUTPUT, Sandbox
from zerostack.ledger.pricing import Prices
from zerostack.workloads import Resources, ZdbWorkload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "templates"
GiB = 1 << 30


def example(name: str) -> str:
    return (EXAMPLES / f"{name}.yaml").read_text()


def nodes(n: int, country: str = "BE", hdd: int = 1000 * GiB, farms: int = 3,
          public: bool = False) -> list[NodeOffer]:
    cap = Resources(8, 16 * GiB, 200 * GiB, hdd)
    return [NodeOffer(i, 1 + i % farms, country, cap, cap, public) for i in range(1, n + 1)]


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_every_example_lints_and_expands_with_defaults(name: str) -> None:
    plan = expand(load_text(example(name)), {})
    assert plan.parts


def test_archive_spreads_shards_over_distinct_nodes() -> None:
    plan = expand(load_text(example("archive")), {"size": "30G", "shards": "5",
                                                  "country": "CH"})
    shards = [p for p in plan.parts if p.part == "shard"]
    assert len(shards) == 5 and len(plan.parts) == 10
    assert all(isinstance(p.workloads[0], ZdbWorkload) for p in plan.parts)
    assert sum(p.workloads[0].size for p in shards) >= 30 * GiB  # type: ignore[union-attr]
    for n in (5, 6):
        placed = place(plan, nodes(n, "CH"))
        assert len({placed.nodes[p.key] for p in shards}) == 5
        for i in range(5):  # each namespace's replica is on another node
            assert placed.nodes[f"shard-{i}"] != placed.nodes[f"replica-{i}"]
    plain = expand(load_text(example("archive")), {"size": "30G", "shards": "5",
                                                   "replicas": "false"})
    assert [p.part for p in plain.parts] == ["shard"] * 5


def test_placement_names_the_unmet_constraint() -> None:
    plan = expand(load_text(example("archive")), {"size": "1200G", "country": "CH"})
    with pytest.raises(PlacementError, match=r"no 3 nodes in CH with 400 GiB free HDD"):
        place(plan, nodes(2, "CH") + nodes(5, "BE"))


def test_placement_prefers_cheap_nodes_and_honours_max_cost() -> None:
    plan = expand(load_text(example("archive")), {"size": "30G", "replicas": "false"})
    offers = nodes(6)
    cheap, dear = Prices(hru=1), Prices(hru=50)
    prices = {n.id: (cheap if n.id in (2, 4, 6) else dear) for n in offers}
    placed = place(plan, offers, prices)
    assert sorted(placed.nodes.values()) == [2, 4, 6]
    assert placed.per_month == 3 * 10 * 1 * 730


def test_spread_over_farms_is_enforced() -> None:
    text = example("archive").replace('nodes: "{{ shards }}"', 'nodes: "{{ shards }}"\n  farms: 3')
    plan = expand(load_text(text), {})
    with pytest.raises(PlacementError, match="at least 3 farms"):
        place(plan, nodes(5, farms=2))
    assert len({1 + n % 3 for n in place(plan, nodes(5, farms=3)).nodes.values()}) == 3


@pytest.mark.parametrize(("params", "message"), [
    ({"size": "1M"}, "below the minimum 3M"),
    ({"shards": "many"}, "not an integer"),
    ({"shards": "99"}, "above the maximum 16"),
    ({"colour": "red"}, "unknown parameter 'colour'"),
    ({"disk": "tape"}, "not one of hdd, ssd"),
    ({"country": "ch"}, "does not match"),
])
def test_bad_parameters_are_refused_clearly(params: dict[str, str], message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        expand(load_text(example("archive")), params)


def test_missing_parameter_names_it_with_help() -> None:
    text = example("archive").replace("    default: BE\n", "")
    with pytest.raises(TemplateError, match=r"missing parameter 'country'.*two-letter"):
        expand(load_text(text), {})


def test_lint_errors_carry_line_and_column() -> None:
    text = example("archive").replace("        mode: seq", "        mode: sideways")
    with pytest.raises(TemplateError) as info:
        expand(load_text(text), {})
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "sideways" in s)
    assert info.value.line == line and info.value.column == 15
    text = example("archive").replace("  shard_size:", "  shard_size: 1\n  shard_size:")
    with pytest.raises(TemplateError, match="appears twice") as info:
        load_text(text)
    assert info.value.line is not None
    text = example("archive").replace("parts:", "partz:")
    with pytest.raises(TemplateError, match="unknown field 'partz'"):
        load_text(text)
    text = example("archive").replace("{{ index }}", "{{ index + }}")
    with pytest.raises(TemplateError, match="expression syntax") as info:
        load_text(text)
    assert info.value.render("archive.yaml").startswith(f"archive.yaml:{info.value.line}:")


@pytest.mark.parametrize(("expr", "message"), [
    ("{{ ''.__class__ }}", "not allowed|unsafe|undefined"),
    ("{{ size.__class__.__mro__ }}", "not allowed|unsafe|undefined"),
    ("{{ 'x' * 100000000 }}", "repetition"),
    ("{{ 2 ** 100000 }}", "exponent"),
    ("{{ range(100000) | list }}", "range"),
    ("{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
     "looped more than|more than"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "macro"),
    ("{% include 'x' %}", "include"),
    ("{% set a = 'x' %}" + "{% set a = a ~ a %}" * 40 + "{{ a }}", "assign"),
    ("{% set a %}xx{% endset %}{{ a }}", "assignblock"),
    ("{% with a = 'x' ~ 'x' %}{{ a }}{% endwith %}", "with"),
    ("{{ lipsum() }}", "only range"),
    ("{{ 'a' | center(1000000000) }}", "No filter|filter"),
    ("{{ nothing }}", "undefined"),
    ("{{ 1 / 3 }}", "fraction"),
    ("{{ '%0999999999d' % 1 }}", "formatting"),
])
def test_sandbox_refuses_escapes_and_unbounded_work(expr: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        Sandbox().evaluate(expr, {"size": 5})


def test_sandbox_output_is_bounded() -> None:
    sb = Sandbox()
    big = "{% for i in range(1000) %}" + "y" * 2000 + "{% endfor %}"
    with pytest.raises(TemplateError, match=str(MAX_OUTPUT)):
        sb.evaluate([big] * 5, {})


def test_sandbox_keeps_types_of_whole_expressions() -> None:
    sb = Sandbox()
    assert sb.evaluate("{{ n * 2 }}", {"n": 3}) == 6
    assert sb.evaluate("{{ n > 2 }}", {"n": 3}) is True
    assert sb.evaluate("n={{ n }}", {"n": 3}) == "n=3"
    assert sb.evaluate("{{ size('2G') }}", {}) == 2 * GiB
    assert sb.evaluate("{{ range(3) | list }}", {}) == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(size_gib=st.integers(3, 5000), shards=st.integers(3, 16),
       disk=st.sampled_from(["hdd", "ssd"]))
def test_archive_expansion_properties(size_gib: int, shards: int, disk: str) -> None:
    """Whatever the parameters: exactly `shards` copies, unique names, the whole size
    covered with less than one byte per shard to spare, every copy's disk as asked, and
    expanding twice gives the same plan."""
    t = load_text(example("archive"))
    params = {"size": f"{size_gib}G", "shards": str(shards), "disk": disk}
    plan = expand(t, params)
    zdbs = [p.workloads[0] for p in plan.parts if p.part == "shard"]
    replicas = [p.workloads[0] for p in plan.parts if p.part == "replica"]
    assert len(zdbs) == shards
    assert [r.replica_of.workload for r in replicas] == [  # type: ignore[union-attr]
        w.name for w in zdbs]
    assert [r.size for r in replicas] == [w.size for w in zdbs]  # type: ignore[union-attr]
    assert len({w.name for w in zdbs}) == shards
    total = sum(w.size for w in zdbs)  # type: ignore[union-attr]
    assert size_gib * GiB <= total < size_gib * GiB + shards
    assert all(w.disk_type == disk for w in zdbs)  # type: ignore[union-attr]
    assert expand(t, params) == plan


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_parameter_text_never_escapes_the_error_type(value: str) -> None:
    t = load_text(example("crm"))
    for name in ("users", "country"):
        try:
            expand(t, {name: value})
        except TemplateError:
            pass


offer_lists = st.lists(
    st.builds(lambda i, farm, country, hdd, cru, public: (i, farm, country, hdd, cru, public),
              st.integers(1, 10_000), st.integers(1, 4), st.sampled_from(["BE", "CH"]),
              st.integers(0, 40), st.integers(0, 4), st.booleans()),
    max_size=12, unique_by=lambda t: t[0])


@settings(max_examples=150, deadline=None)
@given(offers=offer_lists, shards=st.integers(3, 6), size_gib=st.integers(3, 60),
       country=st.sampled_from(["BE", "CH"]))
def test_placement_either_meets_every_rule_or_says_which_fails(
        offers: list[tuple[int, int, str, int, int, bool]], shards: int, size_gib: int,
        country: str) -> None:
    plan = expand(load_text(example("archive")),
                  {"size": f"{size_gib}G", "shards": str(shards), "country": country})
    nodes = [NodeOffer(i, farm, c, Resources(cru, 0, 0, hdd * GiB),
                       Resources(cru, 0, 0, hdd * GiB), public)
             for i, farm, c, hdd, cru, public in offers]
    try:
        placed = place(plan, nodes)
    except PlacementError as exc:
        assert str(exc).startswith(("no ", "the template asks"))
        return
    by_id = {n.id: n for n in nodes}
    assert set(placed.nodes) == {p.key for p in plan.parts}
    for part in ("shard", "replica"):  # distinct copies
        assert len({n for k, n in placed.nodes.items() if k.startswith(part)}) == shards
    for i in range(shards):  # a replica never shares its primary's node
        assert placed.nodes[f"shard-{i}"] != placed.nodes[f"replica-{i}"]
    used: dict[int, int] = {}
    for p in plan.parts:
        node = by_id[placed.nodes[p.key]]
        assert node.country == country and node.capacity.hru > 0
        used[node.id] = used.get(node.id, 0) + p.resources.hru
    assert all(used[n] <= by_id[n].free.hru for n in used)


@pytest.mark.parametrize("expr", [
    "{{ [['x' * 60000] * 1] * 60000 }}",
    "{{ ([[1] * 60000] * 2) | string }}",
    "{{ ('x' * 60000) | replace('x', 'yyyyyyyy') }}",
    "{{ ['a' * 30000, 'b' * 30000, 'c' * 30000] }}",
])
def test_nested_and_multiplying_values_are_bounded_before_they_grow(expr: str) -> None:
    with pytest.raises(TemplateError, match="more than"):
        Sandbox().evaluate(expr, {})


REPLICATED = """
name: pair
version: "1"
parts:
  - name: main
    count: 2
    workloads:
      - type: zdb
        name: "db-{{ index }}"
        size: 1G
  - name: copy
    count: 2
    workloads:
      - type: zdb
        name: "db-{{ index }}-copy"
        size: 1G
        replica_of: {workload: "db-{{ index }}"}
"""


@pytest.mark.parametrize(("old", "new", "message"), [
    ('replica_of: {workload: "db-{{ index }}"}', 'replica_of: {workload: "dbx-{{ index }}"}',
     "no part of the template has a zdb workload of that name"),
    ('replica_of: {workload: "db-{{ index }}"}', 'replica_of: {workload: "db-{{ index }}-copy"}',
     "cannot be a replica of itself"),
    ('replica_of: {workload: "db-{{ index }}"}', 'replica_of: {workload: "db-{{ 1 - index }}-copy"}',
     "itself a replica"),
    ('replica_of: {workload: "db-{{ index }}"}',
     'replica_of: {workload: "db-{{ index }}", node: 3}', "takes only `workload`"),
    ('replica_of: {workload: "db-{{ index }}"}',
     'replica_of: {workload: "db-{{ index }}"}\n        replication: {port: 24001, '
     'password: aaaaaaaaaaaaaaaaaaaa}', "filled in by `zerostack deploy`"),
    ('"db-{{ index }}"', '"db"', "2 part copies use"),
])
def test_replica_mistakes_are_refused_with_their_position(old: str, new: str,
                                                          message: str) -> None:
    text = REPLICATED.replace(old, new)
    assert text != REPLICATED
    with pytest.raises(TemplateError, match=message) as info:
        expand(load_text(text), {})
    assert info.value.line is not None


def test_a_replica_in_the_same_part_copy_as_its_primary_is_refused() -> None:
    text = REPLICATED.replace("""        replica_of: {workload: "db-{{ index }}"}
""", "").replace("""        size: 1G
  - name: copy""", """        size: 1G
      - type: zdb
        name: "db-{{ index }}-near"
        size: 1G
        replica_of: {workload: "db-{{ index }}"}
  - name: copy""")
    with pytest.raises(TemplateError, match="on the same node"):
        expand(load_text(text), {})


def test_replicas_are_placed_apart_from_their_primaries() -> None:
    plan = expand(load_text(REPLICATED), {})
    assert dict((p.key, p.apart_from) for p in plan.parts) == {
        "main-0": ("copy-0",), "main-1": ("copy-1",),
        "copy-0": ("main-0",), "copy-1": ("main-1",)}
    placed = place(plan, nodes(2))
    assert placed.nodes["main-0"] != placed.nodes["copy-0"]
    assert placed.nodes["main-1"] != placed.nodes["copy-1"]
    # sharing nodes is allowed, but never a primary's with its replica
    text = REPLICATED.replace("    count: 2\n", "    count: 2\n    placement: {distinct: false}\n")
    with pytest.raises(PlacementError, match="must be on another node than its primary"):
        place(expand(load_text(text), {}), nodes(1))
    assert len(set(place(expand(load_text(text), {}), nodes(2)).nodes.values())) == 2


def test_a_primary_goes_only_to_a_node_its_replicas_can_reach() -> None:
    plan = expand(load_text(REPLICATED), {})
    assert [p.followed for p in plan.parts] == [True, True, False, False]
    cap = Resources(8, 16 * GiB, 200 * GiB, 1000 * GiB)
    hidden = [NodeOffer(i, 1, "BE", cap, cap, False, reachable=i > 2) for i in range(1, 5)]
    placed = place(plan, hidden)
    assert {placed.nodes["main-0"], placed.nodes["main-1"]} <= {3, 4}
    with pytest.raises(PlacementError, match="an address its replicas reach"):
        place(plan, hidden[:3])
    view = {"id": 1, "farm": 1, "capacity": {}, "free": {}, "endpoint": ""}
    assert not NodeOffer.of(view).reachable
    assert NodeOffer.of({**view, "endpoint": "198.18.0.10"}).reachable
