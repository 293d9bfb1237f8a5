"""The pure plan of a grid's WAN: names, addresses, routes and NAT rules, and its record."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.grid import GridError, Topology
from zerostack.grid.hosts import load, save
from zerostack.grid.topology import IFNAMSIZ, MAX_HOSTS, nat_ruleset, new_grid_id

WAN4 = ipaddress.ip_network("198.18.0.0/15")
WAN6 = ipaddress.ip_network("fd00:5a::/48")

layouts = st.lists(st.tuples(st.integers(0, 1), st.booleans()), min_size=0, max_size=MAX_HOSTS)


def grid_of(layout: list[tuple[int, bool]], gid: str = "0a1b2c") -> Topology:
    topo = Topology(gid, sites=2)
    for i, (site, hidden) in enumerate(layout):
        topo.add_host(f"node{i + 1}", site, hidden)
    return topo


@given(layouts)
def test_every_name_is_short_unique_and_names_its_grid(layout: list[tuple[int, bool]]) -> None:
    topo = grid_of(layout)
    names = topo.interfaces()
    assert len(names) == len(set(names))
    assert all(len(n) <= IFNAMSIZ and n.startswith("zs0a1b2c") for n in names)
    assert len(topo.namespaces()) == len(set(topo.namespaces()))
    assert all(n.startswith("zs0a1b2c-") for n in topo.namespaces())
    # what teardown removes from the root namespace is a subset of what is made
    assert set(topo.links()) <= set(names)


@given(layouts)
def test_addresses_are_distinct_and_inside_the_grid_ranges(layout: list[tuple[int, bool]]) -> None:
    topo = grid_of(layout)
    seen: set[str] = set()
    for h in topo.hosts:
        site4 = ipaddress.ip_network(f"198.18.{h.site.index}.0/24")
        if h.hidden:
            assert ipaddress.ip_address(h.address) in ipaddress.ip_network("192.168.0.0/16")
            assert ipaddress.ip_address(h.gateway_address) in site4
            assert h.endpoint == "" and h.address6 is None
            seen.add(h.gateway_address)
        else:
            assert ipaddress.ip_address(h.address) in site4
            assert h.address6 is not None
            a6 = ipaddress.ip_address(h.address6)
            assert a6 in WAN6 and a6 in ipaddress.ip_network(
                f"fd00:5a:0:{h.site.index}::/64")
            assert h.endpoint == h.address
            seen.add(h.address6)
        seen.add(h.address)
    routers = {topo.site(i).router_v4 for i in range(topo.sites)}
    assert len(seen) == sum(2 for _ in topo.hosts) and not seen & routers


def test_the_root_namespace_gets_links_but_no_address_or_route() -> None:
    topo = grid_of([(0, False), (0, True), (1, False)])
    steps = topo.wan_steps() + [s for h in topo.hosts for s in topo.host_steps(h)]
    root = [s for s in steps if s.kind == "ip" and s.ns is None]
    assert root and all(s.args[0] == "link" for s in root)
    touched = {s.args[2] for s in root}
    assert touched <= set(topo.links())
    for s in steps:
        if s.kind == "sysctl" and s.ns is None:
            assert s.args[1] == "1" and s.args[0].endswith(".disable_ipv6")
    # every namespace a step uses is one the grid makes
    made = {s.args[1] for s in steps if s.kind == "netns"}
    assert made == set(topo.namespaces())
    assert {s.ns for s in steps if s.ns} <= made


def test_site_zero_is_fd00_5a_slash_64_and_the_ledger_sits_on_the_router() -> None:
    topo = grid_of([(0, False), (1, False)])
    assert topo.ledger_address == "198.18.0.1"
    assert topo.ledger_address6 == "fd00:5a::1"
    h1, h2 = topo.hosts
    assert (h1.address, h1.address6) == ("198.18.0.10", "fd00:5a::10")
    assert (h2.address, h2.address6) == ("198.18.1.11", "fd00:5a:0:1::11")
    routes = [s.args for s in topo.host_steps(h2) if "route" in s.args]
    assert ("route", "add", "default", "via", "198.18.1.1") in routes
    assert ("-6", "route", "add", "default", "via", "fd00:5a:0:1::1") in routes
    router_addrs = [s.args[2] for s in topo.wan_steps() if s.ns == topo.router
                    and s.args[:2] == ("addr", "add")]
    assert router_addrs == ["198.18.0.1/24", "fd00:5a::1/64", "198.18.1.1/24",
                            "fd00:5a:0:1::1/64"]


def test_a_hidden_host_sits_behind_its_own_nat_gateway() -> None:
    topo = grid_of([(0, False), (0, True)])
    hidden = topo.hosts[1]
    steps = topo.host_steps(hidden)
    assert hidden.namespaces() == ["zs0a1b2c-node2-nat", "zs0a1b2c-node2"]
    assert hidden.port == "zs0a1b2cg1"  # the gateway, not the host, is on the bridge
    nft = [s for s in steps if s.kind == "nft"]
    assert len(nft) == 1 and nft[0].ns == hidden.nat_namespace
    rules = nft[0].args[0]
    assert rules == nat_ruleset("0a1b2c", hidden)
    assert f'oifname "{hidden.gateway_wan}" masquerade' in rules
    assert f'iifname "{hidden.gateway_lan}" oifname "{hidden.gateway_wan}" accept' in rules
    assert rules.count("policy drop") == 3  # forward, input and IPv6 forward
    host_addrs = [s.args for s in steps if s.ns == hidden.namespace and "addr" in s.args]
    assert host_addrs == [("addr", "add", "192.168.2.2/24", "dev", hidden.uplink)]


@pytest.mark.parametrize("name", ["", "Node1", "1node", "node-1", "n" * 17, "a b", "../x"])
def test_bad_host_names_are_refused(name: str) -> None:
    with pytest.raises(GridError, match="host name"):
        Topology("0a1b2c").add_host(name)


def test_bad_plans_are_refused_and_change_nothing() -> None:
    topo = Topology("0a1b2c", sites=2)
    topo.add_host("node1")
    with pytest.raises(GridError, match="exists already"):
        topo.add_host("node1")
    with pytest.raises(GridError, match="site 2 does not exist"):
        topo.add_host("node2", site=2)
    assert [h.name for h in topo.hosts] == ["node1"]
    for _ in range(MAX_HOSTS - 1):
        topo.add_host(f"n{len(topo.hosts)}")
    with pytest.raises(GridError, match="at most"):
        topo.add_host("onemore")
    for gid in ("", "0A1B2C", "0a1b2", "0a1b2c3", "zz1b2c"):
        with pytest.raises(GridError, match="grid id"):
            Topology(gid)
    with pytest.raises(GridError, match="sites"):
        Topology("0a1b2c", sites=0)


def test_new_grid_ids_are_valid_and_differ() -> None:
    ids = {new_grid_id() for _ in range(50)}
    assert len(ids) == 50
    for gid in ids:
        Topology(gid)


def test_the_record_round_trips_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    topo = grid_of([(0, False), (0, True), (1, False)], gid=new_grid_id())
    save(tmp_path, topo)
    again = load(tmp_path)
    assert again is not None
    assert again.namespaces() == topo.namespaces() and again.links() == topo.links()
    assert load(tmp_path / "nothing-here") is None
    data = json.loads((tmp_path / "grid.json").read_text())
    data["hosts"][0]["name"] = "x; rm -rf /"
    (tmp_path / "grid.json").write_text(json.dumps(data))
    with pytest.raises(GridError, match="host name"):
        load(tmp_path)
    (tmp_path / "grid.json").write_text("{not json")
    with pytest.raises(GridError, match="not a grid record"):
        load(tmp_path)
