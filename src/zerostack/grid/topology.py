"""The simulated WAN of a grid whose nodes are hosts, as data: which namespaces, links,
addresses, routes and NAT rules it has. Pure: nothing here touches the kernel
(`zerostack.grid.hosts` does, step by step, what `steps()` lists).

Layout, for a grid whose id is G (six hex digits, unique per grid folder):

- site S (0, 1, …) is a Linux bridge `zsGsS` in the root namespace with no address
  there, carrying 198.18.S.0/24 and fd00:5a:0:S::/64 (site 0: fd00:5a::/64);
- the router namespace `zsG-router` has a leg on every site (198.18.S.1, fd00:5a:0:S::1)
  and forwards between them; the ledger's WAN address 198.18.0.1 is its site-0 leg;
- a public host N (index I) is namespace `zsG-N`, on its site at 198.18.S.(10+I) and
  fd00:5a:0:S::(10+I), default route through the router;
- a hidden host is namespace `zsG-N` on a small LAN 192.168.(I+1).0/24 (.2) behind its
  NAT gateway `zsG-N-nat` (.1), whose WAN leg is 198.18.S.(100+I): it masquerades what
  the host sends out and drops every connection opened from the WAN, so the host reaches
  the WAN and the ledger but nothing can dial it. A hidden host has no IPv6 on the WAN.

Every interface name starts with `zsG` and has at most 15 characters, so `ip link`
names the grid that owns each one, and teardown removes exactly the names recorded.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from zerostack.grid.errors import GridError

PREFIX = "zs"
ID_LEN = 6
MAX_HOSTS = 90  # public hosts use .10-.99 of their site, NAT gateways .100-.189
MAX_SITES = 16
IFNAMSIZ = 15  # the kernel's limit on an interface name, without the trailing NUL
_ID = re.compile(f"[0-9a-f]{{{ID_LEN}}}")
_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")


def new_grid_id() -> str:
    return secrets.token_hex(ID_LEN // 2)


@dataclass(frozen=True)
class Step:
    """One change to the kernel: `ip [-n ns] ARGS`, an nftables ruleset loaded in `ns`,
    or a sysctl written in `ns` (None: the root namespace)."""

    kind: str  # "ip" | "nft" | "sysctl" | "netns"
    ns: str | None
    args: tuple[str, ...]


@dataclass(frozen=True)
class Site:
    grid: str
    index: int

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.grid}s{self.index}"

    @property
    def v4_prefix(self) -> str:
        return f"198.18.{self.index}"

    @property
    def v6_prefix(self) -> str:
        return f"fd00:5a:0:{self.index:x}:" if self.index else "fd00:5a:"

    @property
    def router_v4(self) -> str:
        return f"{self.v4_prefix}.1"

    @property
    def router_v6(self) -> str:
        return f"{self.v6_prefix}:1"

    @property
    def router_leg(self) -> str:
        """The router's veth on this site, seen from the root namespace (a bridge port)."""
        return f"{PREFIX}{self.grid}r{self.index}"


@dataclass(frozen=True)
class Host:
    """A node's host: a namespace on a site, public or hidden behind NAT."""

    grid: str
    name: str
    index: int
    site: Site
    hidden: bool = False

    @property
    def namespace(self) -> str:
        return f"{PREFIX}{self.grid}-{self.name}"

    @property
    def nat_namespace(self) -> str:
        """The NAT gateway's namespace (hidden hosts only)."""
        return f"{PREFIX}{self.grid}-{self.name}-nat"

    @property
    def uplink(self) -> str:
        """The host's own interface (inside its namespace)."""
        return f"{PREFIX}{self.grid}h{self.index}e"

    @property
    def port(self) -> str:
        """The bridge port in the root namespace: the host's (or its gateway's) veth end."""
        return f"{PREFIX}{self.grid}{'g' if self.hidden else 'h'}{self.index}"

    @property
    def gateway_wan(self) -> str:
        return f"{PREFIX}{self.grid}g{self.index}e"

    @property
    def gateway_lan(self) -> str:
        return f"{PREFIX}{self.grid}g{self.index}l"

    @property
    def address(self) -> str:
        """Where the host's services listen: its WAN address, or its LAN one when hidden."""
        return f"192.168.{self.index + 1}.2" if self.hidden else f"{self.site.v4_prefix}.{10 + self.index}"

    @property
    def address6(self) -> str | None:
        return None if self.hidden else f"{self.site.v6_prefix}:{10 + self.index}"

    @property
    def endpoint(self) -> str:
        """What the node registers as its public endpoint: '' when nothing can dial it."""
        return "" if self.hidden else self.address

    @property
    def gateway_address(self) -> str:
        """The NAT gateway's WAN address (hidden hosts only): what others see it come from."""
        return f"{self.site.v4_prefix}.{100 + self.index}"

    def namespaces(self) -> list[str]:
        return [self.nat_namespace, self.namespace] if self.hidden else [self.namespace]


@dataclass
class Topology:
    """A grid's WAN: its sites, its router and its hosts (added one by one)."""

    grid: str
    sites: int = 2
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.grid):
            raise GridError(f"grid id {self.grid!r} must be {ID_LEN} lowercase hex digits")
        if not 1 <= self.sites <= MAX_SITES:
            raise GridError(f"a grid has 1 to {MAX_SITES} sites, not {self.sites}")

    def site(self, index: int) -> Site:
        if not 0 <= index < self.sites:
            raise GridError(f"site {index} does not exist (the grid has {self.sites})")
        return Site(self.grid, index)

    @property
    def router(self) -> str:
        return f"{PREFIX}{self.grid}-router"

    @property
    def ledger_address(self) -> str:
        return self.site(0).router_v4

    @property
    def ledger_address6(self) -> str:
        return self.site(0).router_v6

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise GridError(f"no host {name!r} in grid {self.grid}")

    def add_host(self, name: str, site: int = 0, hidden: bool = False) -> Host:
        """Plan one more host; `host_steps()` says how to make it."""
        if not _HOST_NAME.fullmatch(name):
            raise GridError(f"host name {name!r} must be 1-16 lowercase letters and digits, "
                            "starting with a letter")
        if any(h.name == name for h in self.hosts):
            raise GridError(f"host {name!r} exists already")
        if len(self.hosts) >= MAX_HOSTS:
            raise GridError(f"a grid has at most {MAX_HOSTS} hosts")
        host = Host(self.grid, name, len(self.hosts), self.site(site), hidden)
        self.hosts.append(host)
        return host

    # ---- what exists ------------------------------------------------------------------

    def wan_namespaces(self) -> list[str]:
        return [self.router]

    def wan_links(self) -> list[str]:
        """Root-namespace links of the WAN itself: bridges and the router's ports."""
        sites = [self.site(i) for i in range(self.sites)]
        return [s.bridge for s in sites] + [s.router_leg for s in sites]

    def namespaces(self) -> list[str]:
        return self.wan_namespaces() + [ns for h in self.hosts for ns in h.namespaces()]

    def links(self) -> list[str]:
        """Every link this grid has in the root namespace."""
        return self.wan_links() + [h.port for h in self.hosts]

    def interfaces(self) -> list[str]:
        """Every interface name the grid creates, in any namespace (for checks)."""
        names = self.links() + [s.router_leg + "e" for s in map(self.site, range(self.sites))]
        for h in self.hosts:
            names.append(h.uplink)
            if h.hidden:
                names += [h.gateway_wan, h.gateway_lan]
        return names

    # ---- how to make it ---------------------------------------------------------------

    def wan_steps(self) -> list[Step]:
        """The bridges of every site and the router with a leg on each."""
        r = self.router
        steps = [Step("netns", None, ("add", r)), _ip(r, "link", "set", "lo", "up"),
                 Step("sysctl", r, ("net.ipv4.ip_forward", "1")),
                 Step("sysctl", r, ("net.ipv6.conf.all.forwarding", "1"))]
        for i in range(self.sites):
            s = self.site(i)
            leg = s.router_leg + "e"
            steps += [
                _ip(None, "link", "add", s.bridge, "type", "bridge"),
                Step("sysctl", None, (f"net.ipv6.conf.{s.bridge}.disable_ipv6", "1")),
                _ip(None, "link", "set", s.bridge, "up"),
                *_port(s.router_leg, leg, r, s.bridge),
                _ip(r, "addr", "add", f"{s.router_v4}/24", "dev", leg),
                _ip(r, "addr", "add", f"{s.router_v6}/64", "dev", leg, "nodad"),
                _ip(r, "link", "set", leg, "up"),
            ]
        return steps

    def host_steps(self, host: Host) -> list[Step]:
        """The host's namespace and its way onto the WAN (through its NAT when hidden)."""
        ns, s = host.namespace, host.site
        steps = [Step("netns", None, ("add", ns)), _ip(ns, "link", "set", "lo", "up")]
        if not host.hidden:
            steps += [
                *_port(host.port, host.uplink, ns, s.bridge),
                _ip(ns, "addr", "add", f"{host.address}/24", "dev", host.uplink),
                _ip(ns, "addr", "add", f"{host.address6}/64", "dev", host.uplink, "nodad"),
                _ip(ns, "link", "set", host.uplink, "up"),
                _ip(ns, "route", "add", "default", "via", s.router_v4),
                _ip(ns, "-6", "route", "add", "default", "via", s.router_v6),
            ]
            return steps
        gw, lan = host.nat_namespace, host.address.rsplit(".", 1)[0]
        steps += [
            Step("netns", None, ("add", gw)), _ip(gw, "link", "set", "lo", "up"),
            *_port(host.port, host.gateway_wan, gw, s.bridge),
            _ip(gw, "addr", "add", f"{host.gateway_address}/24", "dev", host.gateway_wan),
            _ip(gw, "link", "set", host.gateway_wan, "up"),
            _ip(gw, "route", "add", "default", "via", s.router_v4),
            _ip(gw, "link", "add", host.gateway_lan, "type", "veth", "peer", "name",
                host.uplink, "netns", ns),
            _ip(gw, "addr", "add", f"{lan}.1/24", "dev", host.gateway_lan),
            _ip(gw, "link", "set", host.gateway_lan, "up"),
            _ip(ns, "addr", "add", f"{host.address}/24", "dev", host.uplink),
            _ip(ns, "link", "set", host.uplink, "up"),
            _ip(ns, "route", "add", "default", "via", f"{lan}.1"),
            Step("sysctl", gw, ("net.ipv4.ip_forward", "1")),
            Step("nft", gw, (nat_ruleset(self.grid, host),)),
        ]
        return steps


def nat_ruleset(grid: str, host: Host) -> str:
    """The NAT gateway's rules: out from the LAN is masqueraded, in from the WAN only
    what answers a connection the LAN opened; the gateway itself accepts nothing new from
    the WAN. IPv6 is not forwarded at all."""
    wan, lan = host.gateway_wan, host.gateway_lan
    return f"""table ip {PREFIX}{grid}nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{lan}" oifname "{wan}" accept
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname "lo" accept
    iifname "{lan}" accept
  }}
}}
table ip6 {PREFIX}{grid}nat6 {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
  }}
}}
"""


def _ip(ns: str | None, *args: str) -> Step:
    return Step("ip", ns, args)


def _port(root_end: str, inner_end: str, ns: str, bridge: str) -> list[Step]:
    """A veth pair: `inner_end` inside `ns`, `root_end` a port of `bridge` in the root
    namespace, with no IPv6 there (the root namespace gets no address of the grid)."""
    return [
        _ip(None, "link", "add", root_end, "type", "veth", "peer", "name", inner_end,
            "netns", ns),
        Step("sysctl", None, (f"net.ipv6.conf.{root_end}.disable_ipv6", "1")),
        _ip(None, "link", "set", root_end, "master", bridge, "up"),
    ]
