"""Caddy's configuration rendered from routes (pure): the admin API on a unix socket
only, redirects per route, health checks, the internal CA without touching the system's
trust store, ACME when an email is set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from zerostack.gateway import Route, Upstream, render

UP = (Upstream("http", "10.20.1.10", 8080), Upstream("http", "fd00:5a::20", 80))


def route(host: str = "shop.gw1.grid.test", **kw: object) -> Route:
    return Route(id="c1-web", host=host, upstreams=UP, **kw)  # type: ignore[arg-type]


def test_admin_socket_and_trust() -> None:
    cfg = render([route()], "/n/gateway/caddy-admin.sock", "/n/gateway/caddy")
    assert cfg["admin"]["listen"] == "unix//n/gateway/caddy-admin.sock"
    assert cfg["admin"]["config"] == {"persist": False}
    assert cfg["apps"]["pki"]["certificate_authorities"]["local"]["install_trust"] is False
    assert cfg["apps"]["tls"]["automation"]["policies"][0]["issuers"] == [{"module": "internal"}]
    acme = render([route()], "/s", "/d", acme_email="ops@example.org")
    assert acme["apps"]["tls"]["automation"]["policies"][0]["issuers"] == [
        {"module": "acme", "email": "ops@example.org"}]


def test_proxy_route_and_redirect() -> None:
    cfg = render([route(health_path="/health", health_interval=3)], "/s", "/d")
    servers = cfg["apps"]["http"]["servers"]
    (https,) = servers["https"]["routes"]
    assert https["match"] == [{"host": ["shop.gw1.grid.test"]}] and https["@id"] == "c1-web"
    proxy = https["handle"][0]
    assert [u["dial"] for u in proxy["upstreams"]] == ["10.20.1.10:8080", "[fd00:5a::20]:80"]
    assert proxy["health_checks"]["active"] == {"uri": "/health", "interval": "3s",
                                                "timeout": "3s"}
    health, http = servers["http"]["routes"]
    assert health["match"] == [{"host": ["shop.gw1.grid.test"],
                                "path": ["/.well-known/zerostack-gateway"]}]
    assert http["handle"][0]["status_code"] == 308
    assert http["handle"][0]["headers"]["Location"] == [
        "https://shop.gw1.grid.test{http.request.uri}"]
    plain = render([route(https_redirect=False)], "/s", "/d")
    assert plain["apps"]["http"]["servers"]["http"]["routes"][1]["handle"][0]["handler"] == \
        "reverse_proxy"


def test_nothing_to_serve_listens_nowhere() -> None:
    assert render([], "/s", "/d")["apps"]["http"]["servers"] == {}


@given(st.lists(st.from_regex(r"[a-z]{1,8}\.gw1\.grid\.test", fullmatch=True),
                unique=True, max_size=8))
def test_one_route_per_host_whatever_the_order(hosts: list[str]) -> None:
    routes = [Route(f"c{i}-w", h, UP) for i, h in enumerate(hosts)]
    a = render(routes, "/s", "/d")
    b = render(list(reversed(routes)), "/s", "/d")
    assert a == b
    if hosts:
        served = [r["match"][0]["host"][0] for r in a["apps"]["http"]["servers"]["https"]
                  ["routes"]]
        assert served == sorted(hosts)
