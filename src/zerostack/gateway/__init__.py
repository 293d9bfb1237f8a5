"""Zero-GW: HTTP(S) name and fqdn proxies run by Caddy, configured through its admin API
on a unix socket. `config` renders Caddy's configuration from routes (pure); `caddy`
runs and talks to the process; `front` runs the TLS front (HAProxy) that passes TLS
through by SNI, and `front.serve` puts a route set on both."""

from zerostack.gateway.caddy import Caddy
from zerostack.gateway.config import Route, Upstream, render
from zerostack.gateway.errors import GatewayError

__all__ = ["Caddy", "GatewayError", "Route", "Upstream", "render"]
