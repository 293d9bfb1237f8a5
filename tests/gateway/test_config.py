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


def test_passthrough_hosts_leave_caddy_https_to_the_front() -> None:
    from zerostack.gateway.config import BEHIND_FRONT
    from zerostack.gateway.front import backend_name
    from zerostack.gateway.front import render as front

    tls = (Upstream("https", "10.20.1.10", 8443), Upstream("https", "fd00:5a::20", 443))
    pt = Route("c2-vault", "vault.gw1.grid.test", tls, passthrough=True, health_interval=3)
    paused = Route("c3-old", "old.gw1.grid.test", tls, passthrough=True, paused=True)
    cfg = render([route(), pt, paused], "/s", "/d", https_listen=(BEHIND_FRONT,))
    servers = cfg["apps"]["http"]["servers"]
    assert servers["https"]["listen"] == ["127.0.0.1:44300"]
    assert servers["https"]["tls_connection_policies"] == [{}]
    assert [r["@id"] for r in servers["https"]["routes"]] == ["c1-web"]
    # plain HTTP of a passthrough host redirects (and answers the grid's health probe)
    http = {r.get("@id"): r for r in servers["http"]["routes"]}
    assert http["c2-vault-http"]["handle"][0]["status_code"] == 308
    assert http["c3-old-http"]["handle"][0]["status_code"] == 503

    text = front([route(), pt, paused], "/n/gateway/front/haproxy.sock")
    assert "bind :::443 v4v6" in text
    assert "stats socket /n/gateway/front/haproxy.sock mode 600 level admin" in text
    assert "reject unless { req.ssl_hello_type 1 }" in text
    assert "reject unless { req.ssl_sni -m found }" in text
    assert f"use_backend {backend_name(pt)} if {{ req.ssl_sni -i vault.gw1.grid.test }}" in text
    assert "reject if { req.ssl_sni -i old.gw1.grid.test }" in text  # paused: closed
    assert "shop.gw1.grid.test" not in text  # Caddy's names go to the default backend
    assert "server caddy 127.0.0.1:44300" in text
    assert "server s0 10.20.1.10:8443 check inter 3s" in text
    assert "server s1 [fd00:5a::20]:443 check inter 3s" in text
    assert text.count("\nbackend pt_") == 1  # none for the paused host
