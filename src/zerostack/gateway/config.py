"""Caddy's JSON configuration, rendered from the routes a gateway serves: pure data in,
a dict out, so every rule (redirects, health checks, TLS issuer, admin socket) is
unit-tested without a Caddy.

One HTTPS server on :443 holds a route per host; one HTTP server on :80 answers each
host with a redirect to HTTPS or, when its workload says so, with the same proxy. While
the gateway's TLS front (`front`) runs, the HTTPS server listens on `BEHIND_FRONT`
(loopback) instead, and a TLS-passthrough host has no HTTPS route at all: its TLS never
reaches Caddy, only its plain HTTP redirect and health answer do.
Certificates come from Caddy's internal CA unless an ACME email is set; Caddy never
installs its root into the system's trust store. A paused route (its contract is in
grace) answers 503 with a static response on both servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HTTP_PORT = 80
HTTPS_PORT = 443
DIAL_TIMEOUT = "2s"
HEALTH_PATH = "/.well-known/zerostack-gateway"
"""Answered 200 on plain HTTP for every host a gateway serves: how the other gateways of
the farm check it is alive and serves that host (see `dns`)."""
BEHIND_FRONT = "127.0.0.1:44300"
"""Where Caddy's HTTPS server listens while the TLS front holds :443 (loopback of the
node's namespace: nothing outside it reaches the port)."""
PUBLIC_HTTPS = (f":{HTTPS_PORT}",)
TRY_DURATION = "4s"
"""How long a request keeps trying the other backends when one fails to connect."""


@dataclass(frozen=True, order=True)
class Upstream:
    """A backend: scheme, address and port (`address` is an IP, v6 without brackets)."""

    scheme: str
    address: str
    port: int

    @property
    def dial(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Route:
    """One proxied host: what `id` (the workload) serves at `host`, to `upstreams`."""

    id: str
    host: str
    upstreams: tuple[Upstream, ...]
    https_redirect: bool = True
    health_path: str = "/"
    health_interval: int = 2
    owner: int = 0  # the twin the route was checked for (names: the name's owner)
    network: str = ""  # the network key through which the upstreams are reached
    paused: bool = False  # its contract is in grace: the host answers 503, no proxying
    passthrough: bool = False  # TLS forwarded untouched by SNI (the front), not by Caddy
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _proxy(route: Route) -> dict[str, Any]:
    handler: dict[str, Any] = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": u.dial} for u in route.upstreams],
        "health_checks": {
            "active": {"uri": route.health_path, "interval": f"{route.health_interval}s",
                       "timeout": f"{max(1, route.health_interval)}s"},
            "passive": {"fail_duration": "10s", "max_fails": 1},
        },
        "load_balancing": {"selection_policy": {"policy": "round_robin"},
                           "try_duration": TRY_DURATION, "try_interval": "100ms"},
        "transport": {"protocol": "http", "dial_timeout": DIAL_TIMEOUT},
    }
    if route.upstreams and route.upstreams[0].scheme == "https":
        # a backend's own certificate is from the owner's network, not a public CA
        handler["transport"]["tls"] = {"insecure_skip_verify": True}
    return handler


PAUSED_BODY = "503: this site is paused (its contract is in its grace period)\n"


def _paused() -> dict[str, Any]:
    """What a paused host answers, on HTTPS and plain HTTP alike: nothing reaches its
    backends until the contract is resumed."""
    return {"handler": "static_response", "status_code": 503, "body": PAUSED_BODY,
            "headers": {"Content-Type": ["text/plain; charset=utf-8"],
                        "Retry-After": ["3600"]}}


def _serve(route: Route) -> dict[str, Any]:
    return _paused() if route.paused else _proxy(route)


def _route(route: Route, handle: dict[str, Any]) -> dict[str, Any]:
    return {"@id": route.id, "match": [{"host": [route.host]}], "handle": [handle],
            "terminal": True}


def _redirect(route: Route) -> dict[str, Any]:
    return {"handler": "static_response", "status_code": 308,
            "headers": {"Location": [f"https://{route.host}{{http.request.uri}}"]}}


def render(routes: list[Route], admin_socket: str, storage: str,
           acme_email: str = "", https_listen: tuple[str, ...] = PUBLIC_HTTPS
           ) -> dict[str, Any]:
    """The whole configuration for `routes` (sorted by host: one config per route set);
    the HTTPS server listens on `https_listen` (`BEHIND_FRONT` behind the TLS front)."""
    ordered = sorted(routes, key=lambda r: (r.host, r.id))
    https = [_route(r, _serve(r)) for r in ordered if not r.passthrough]
    http: list[dict[str, Any]] = []
    for r in ordered:
        http.append({"match": [{"host": [r.host], "path": [HEALTH_PATH]}],
                     "handle": [{"handler": "static_response", "status_code": 200,
                                 "body": r.host}], "terminal": True})
        # a passthrough host's backends speak TLS only: its plain HTTP always redirects
        plain = (_paused() if r.paused else _redirect(r)
                 if r.https_redirect or r.passthrough else _proxy(r))
        http.append({**_route(r, plain),
                     "@id": f"{r.id}-http"})
    issuer: dict[str, Any] = ({"module": "acme", "email": acme_email} if acme_email
                              else {"module": "internal"})
    config: dict[str, Any] = {
        "admin": {"listen": f"unix/{admin_socket}", "config": {"persist": False},
                  "origins": ["localhost"]},
        "storage": {"module": "file_system", "root": storage},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {
            "http": {
                "http_port": HTTP_PORT,
                "https_port": HTTPS_PORT,
                "servers": {
                    "https": {"listen": list(https_listen), "routes": https,
                              # TLS on every listener, the loopback one behind the front too
                              "tls_connection_policies": [{}],
                              "automatic_https": {"disable_redirects": True}},
                    "http": {"listen": [f":{HTTP_PORT}"], "routes": http,
                             "automatic_https": {"disable": True}},
                },
            },
            "pki": {"certificate_authorities": {"local": {"install_trust": False}}},
            "tls": {"automation": {"policies": [{"issuers": [issuer]}]}},
        },
    }
    if not ordered:
        # nothing to serve: no listener at all until the first route
        config["apps"]["http"]["servers"] = {}
    return config
