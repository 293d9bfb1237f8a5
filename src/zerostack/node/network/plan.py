"""What a node's network resource must hold, as data: names, addresses, WireGuard peers,
routes and nftables rules, computed from a network workload. Pure: `resource.py` makes it.

A network resource of contract C, workload W on node K is:

- namespace `zn-H` (H: 10 hex digits of a hash of K, C and W, so names are unique on a
  machine shared by several nodes), holding
- bridge `znHb` with the first host of the node's /24: the containers' gateway;
- WireGuard interface `znHw`, created in the node's namespace (its UDP socket stays
  there, on the node's uplink) and then moved into the resource's namespace, with one
  route per peer network through it;
- veth pair `znHu` (node side) / `znHi` (resource side) for egress: the resource side
  has 100.127.X.Y/32 (from H), the node side 100.127.0.1/32; the resource masquerades
  onto its side and the node masquerades that address onto its uplink.

Nothing enters the resource's namespace from its uplink but replies to what left it:
peers come in only through WireGuard. What leaves the bridge carries a source address of
the node's /24 (a container cannot pose as a peer's or another network's address). From
its uplink a resource reaches the node's WAN and beyond, never the node itself (its
host namespace: the node's own services, whatever listens there) nor another resource.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from zerostack.node.provisioners.base import ProvisionError, WorkloadID
from zerostack.workloads.types import (
    BRIDGE_HOST,
    FIRST_CONTAINER_HOST,
    LAST_HOST,
    NODE_UPLINK_RANGE,
    NetworkWorkload,
    check_wireguard_key,
)

PREFIX = "zn"
CONTAINER_PREFIX = "zc"
HASH_LEN = 10
IFNAMSIZ = 15
UPLINK_GATEWAY = "100.127.0.1"
UPLINK_NET = ipaddress.IPv4Network(NODE_UPLINK_RANGE)
KEEPALIVE = 25  # seconds: keeps a NAT mapping open towards peers with an endpoint
NFT_TABLE = "zerostack"


def short_hash(node_key: str, contract: int, name: str) -> str:
    """10 hex digits naming what node `node_key` makes for workload `name` of `contract`."""
    digest = hashlib.sha256(f"{node_key}/{contract}/{name}".encode()).hexdigest()
    return digest[:HASH_LEN]


@dataclass(frozen=True)
class ResourceNames:
    """Everything a network resource creates on the machine, by name."""

    tag: str

    @property
    def namespace(self) -> str:
        return f"{PREFIX}-{self.tag}"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.tag}b"

    @property
    def wireguard(self) -> str:
        return f"{PREFIX}{self.tag}w"

    @property
    def uplink_outer(self) -> str:
        """The egress veth's end in the node's namespace."""
        return f"{PREFIX}{self.tag}u"

    @property
    def uplink_inner(self) -> str:
        """The egress veth's end inside the resource's namespace."""
        return f"{PREFIX}{self.tag}i"

    @property
    def node_table(self) -> str:
        """This resource's nftables table in the node's namespace."""
        return f"{PREFIX}{self.tag}"

    @property
    def join_table(self) -> str:
        """The node-side filter of the node's join of this network (`join`)."""
        return f"zgj{self.tag}"

    def links(self) -> tuple[str, ...]:
        return (self.bridge, self.wireguard, self.uplink_outer, self.uplink_inner)


def resource_names(node_key: str, wid: WorkloadID) -> ResourceNames:
    return ResourceNames(short_hash(node_key, wid.contract, wid.name))


@dataclass(frozen=True)
class ContainerLinkNames:
    """A container's attachment: a veth whose `outer` end is a port of the resource's
    bridge and whose `inner` end (`eth0` once moved) is in the container's namespace."""

    tag: str

    @property
    def namespace(self) -> str:
        return f"{CONTAINER_PREFIX}-{self.tag}"

    @property
    def outer(self) -> str:
        return f"{CONTAINER_PREFIX}{self.tag}h"

    @property
    def inner(self) -> str:
        return f"{CONTAINER_PREFIX}{self.tag}c"


def container_link_names(node_key: str, wid: WorkloadID) -> ContainerLinkNames:
    return ContainerLinkNames(short_hash(node_key, wid.contract, wid.name))


@dataclass(frozen=True)
class PeerPlan:
    public_key: str
    endpoint: str
    allowed_ips: tuple[str, ...]


@dataclass(frozen=True)
class NetworkResource:
    """The desired state of one network resource on this node."""

    names: ResourceNames
    ip_range: str
    subnet: str
    bridge_address: str  # with its prefix, e.g. 10.20.3.1/24
    uplink_address: str  # the resource side of the egress veth, without prefix
    private_key: str
    listen_port: int
    peers: tuple[PeerPlan, ...]

    @property
    def join_address(self) -> str:
        """The node's own address on the network when it joins it (`join`): the last
        host of its /24."""
        return str(ipaddress.IPv4Network(self.subnet).network_address + LAST_HOST)

    @property
    def routes(self) -> tuple[str, ...]:
        """Networks routed through the WireGuard interface: what every peer carries."""
        return tuple(a for p in self.peers for a in p.allowed_ips)

    def wireguard_config(self) -> str:
        """The interface's configuration in `wg setconf`/`wg syncconf` form (holds the
        private key: it goes to `wg` on its standard input, never to a file)."""
        lines = ["[Interface]", f"PrivateKey = {self.private_key}"]
        if self.listen_port:
            lines.append(f"ListenPort = {self.listen_port}")
        for p in self.peers:
            lines += ["", "[Peer]", f"PublicKey = {p.public_key}",
                      f"AllowedIPs = {', '.join(p.allowed_ips)}"]
            if p.endpoint:
                lines += [f"Endpoint = {p.endpoint}", f"PersistentKeepalive = {KEEPALIVE}"]
        return "\n".join(lines) + "\n"

    def resource_rules(self) -> str:
        """The nftables ruleset of the resource's namespace (replaces its own table).
        Containers may go anywhere, with their own /24 as source; peers (through
        WireGuard, which admits a peer's packets only from the addresses it carries)
        reach containers and other peers this node forwards for; from the uplink only
        replies come in. What the bridge carries back onto itself towards a container
        passes whatever its source: the node's join of the network (`join`) sends the
        public address's traffic (DNAT) that way, and containers on one bridge reach
        each other anyway; the node's own join address is not among those containers.
        Where the kernel passes bridged frames through this chain too (br_netfilter),
        the same rule admits what the join port sends to a container."""
        n = self.names
        hairpin = (f'iifname "{n.bridge}" oifname "{n.bridge}" ip daddr {self.subnet} '
                   f'ip daddr != {self.join_address}')
        return f"""table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
  chain input {{
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
    ct state invalid drop
    iifname {{ "{n.bridge}", "{n.wireguard}" }} accept
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ct state invalid drop
    {hairpin} accept
    iifname "{n.bridge}" ip saddr {self.subnet} accept
    iifname "{n.wireguard}" oifname {{ "{n.bridge}", "{n.wireguard}" }} accept
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{n.uplink_inner}" masquerade
  }}
}}
"""

    def node_rules(self) -> str:
        """This resource's table in the node's namespace: what leaves the resource is
        masqueraded onto the node's uplink; it never enters the node's own namespace nor
        goes to another resource's uplink; nothing else is touched."""
        t = self.names.node_table
        up = self.names.uplink_outer
        return f"""table ip {t}
delete table ip {t}
table ip {t} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{up}" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{up}" ip saddr != {self.uplink_address} drop
    iifname "{up}" ip daddr {UPLINK_NET} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {self.uplink_address} oifname != "{self.names.uplink_outer}" masquerade
  }}
}}
"""


def uplink_address(tag: str) -> str:
    """The resource side of the egress veth: 100.127.X.Y from the tag, never .0, .255 or
    the node side's 100.127.0.1 (two resources of a node colliding is refused when made)."""
    value = int(tag, 16) % (255 * 254)
    third, fourth = divmod(value, 254)
    return f"100.127.{third + 1}.{fourth + 1}"


def plan(node_key: str, wid: WorkloadID, spec: NetworkWorkload,
         private_key: str = "") -> NetworkResource:
    """The network resource for `spec`. `private_key` stands in when the workload carries
    none (a network without peers: the node makes its own key)."""
    key = spec.wireguard_private_key or private_key
    try:
        check_wireguard_key(key, "wireguard private key")
    except ValueError as exc:
        raise ProvisionError(f"network {wid.name}: {exc}") from None
    subnet = ipaddress.IPv4Network(spec.subnet)
    names = resource_names(node_key, wid)
    peers = tuple(PeerPlan(p.wireguard_public_key, p.endpoint,
                           tuple(str(n) for n in p.routes())) for p in spec.peers)
    return NetworkResource(
        names=names, ip_range=spec.ip_range, subnet=str(subnet),
        bridge_address=f"{subnet.network_address + BRIDGE_HOST}/{subnet.prefixlen}",
        uplink_address=uplink_address(names.tag), private_key=key,
        listen_port=spec.wireguard_listen_port, peers=peers)


def allocate_ip(subnet: str, taken: set[str]) -> str:
    """The lowest container address of `subnet` not in `taken`; ProvisionError when full."""
    net = ipaddress.IPv4Network(subnet)
    for host in range(FIRST_CONTAINER_HOST, LAST_HOST + 1):
        ip = str(net.network_address + host)
        if ip not in taken:
            return ip
    raise ProvisionError(f"no free address left in {subnet}")


@dataclass(frozen=True)
class RouteChanges:
    add: tuple[str, ...]
    remove: tuple[str, ...]


def route_changes(desired: tuple[str, ...], actual: set[str]) -> RouteChanges:
    """Routes through the WireGuard interface to add and to remove, so that an update
    touches only what changed (existing tunnels keep their routes)."""
    want = list(dict.fromkeys(desired))
    return RouteChanges(tuple(r for r in want if r not in actual),
                        tuple(sorted(r for r in actual if r not in want)))
