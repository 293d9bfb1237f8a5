"""The node itself as a member of a user network it hosts a resource of: a veth from the
node's namespace to the resource's bridge, with the last address of the node's /24 and
a route to the network's range through the bridge. What a gateway on the node (Caddy,
port forwards) uses to reach backends on the owner's network, on this node or through
its WireGuard peers, without the resource's firewall opening anything else.

Links: `zgHo` on the bridge (resource side), `zgHi` in the node's namespace, H the
resource's tag. The join is a way for the node into the network, never one for the
network into the node: `zgHi` has no IPv6, and the nftables table `inet zgjH` of the
node's namespace lets in from `zgHi` only replies to what the node started, and nothing
from `zgHi` goes on to another network the node joined. A container's public address
(`public_ip`) is routed to it through the resource (`route_to`), so that the resource
sees both ways of its traffic.

Two networks whose ranges overlap cannot both be joined on one node: the node would not
know where to send a packet for an address in both (refused)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from zerostack.node.network import resource
from zerostack.node.network.plan import NetworkResource, ResourceNames
from zerostack.node.provisioners.base import ProvisionError
from zerostack.workloads.types import LAST_HOST

MTU = resource.WIREGUARD_MTU


@dataclass(frozen=True)
class JoinNames:
    outer: str  # on the resource's bridge
    inner: str  # in the node's namespace


def join_names(names: ResourceNames) -> JoinNames:
    return JoinNames(f"zg{names.tag}o", f"zg{names.tag}i")


def join_rules(names: ResourceNames) -> str:
    """The node-side filter of the join (pure)."""
    t, inner = names.join_table, join_names(names).inner
    return f"""table inet {t}
delete table inet {t}
table inet {t} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{inner}" ct state established,related accept
    iifname "{inner}" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{inner}" oifname "zg*" drop
  }}
}}
"""


def join_address(subnet: str) -> str:
    """The node's address on the network: the last host of its /24 (.254)."""
    net = ipaddress.IPv4Network(subnet)
    return str(net.network_address + LAST_HOST)


def _overlapping_route(ip_range: str, own: str) -> str | None:
    """A route of the node's namespace, through another link, that overlaps `ip_range`."""
    out = resource._ip(None, "-j", "-4", "route", "show", check=False)
    try:
        routes = json.loads(out or "[]")
    except ValueError:
        return None
    rng = ipaddress.IPv4Network(ip_range)
    for r in routes:
        dst, dev = str(r.get("dst", "")), str(r.get("dev", ""))
        if dst in ("", "default") or dev == own:
            continue
        try:
            net = ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if net.overlaps(rng):
            return f"{dst} (through {dev})"
    return None


def ensure_join(res: NetworkResource) -> str:
    """Join the node to `res`'s network (converging like `resource.ensure`); returns the
    node's address on it."""
    names = res.names
    j = join_names(names)
    ns = names.namespace
    if not resource.namespace_exists(ns):
        raise ProvisionError(f"network resource {ns} does not exist on this node")
    clash = _overlapping_route(res.ip_range, j.inner)
    if clash is not None:
        raise ProvisionError(f"network range {res.ip_range} overlaps {clash}, already routed "
                             "on this gateway: use a range of its own for this network")
    resource._run(["nft", "-f", "-"], stdin=join_rules(names))  # before the link exists
    inner_ok = j.inner in resource._links(None)
    outer_ok = j.outer in resource._links(ns)
    if not (inner_ok and outer_ok):
        if inner_ok:
            resource._ip(None, "link", "delete", j.inner, check=False)
        if outer_ok:
            resource._ip(ns, "link", "delete", j.outer, check=False)
        resource._ip(None, "link", "add", j.inner, "type", "veth", "peer", "name", j.outer,
                     "netns", ns)
    resource._ip(ns, "link", "set", j.outer, "mtu", str(MTU), "master", names.bridge, "up")
    address = join_address(res.subnet)
    prefix = res.bridge_address.split("/")[1]
    # IPv4 only, like the network: no link-local IPv6 address a container could reach
    resource._run(["sysctl", "-qw", f"net.ipv6.conf.{j.inner}.disable_ipv6=1"])
    resource._ip(None, "link", "set", j.inner, "mtu", str(MTU), "up")
    resource._ip(None, "addr", "replace", f"{address}/{prefix}", "dev", j.inner)
    bridge = res.bridge_address.split("/")[0]
    if res.ip_range != res.subnet:
        resource._ip(None, "route", "replace", res.ip_range, "via", bridge, "dev", j.inner)
    return address


def route_to(res: NetworkResource, address: str) -> None:
    """Send what the node forwards to container `address` through the resource's bridge
    address rather than straight onto the bridge: the resource's connection tracking
    then sees the flow's first packet, so the container's replies (routed by the
    resource) are known to it."""
    resource._ip(None, "route", "replace", f"{address}/32", "via",
                 res.bridge_address.split("/")[0], "dev", join_names(res.names).inner)


def unroute(names: ResourceNames, address: str) -> None:
    j = join_names(names)
    if j.inner in resource._links(None):
        resource._ip(None, "route", "delete", f"{address}/32", "dev", j.inner, check=False)


def leave(names: ResourceNames) -> None:
    """Undo `ensure_join` (deleting one end of a veth deletes both, and its routes)."""
    j = join_names(names)
    resource._run(["nft", "delete", "table", "inet", names.join_table], check=False)
    if j.inner in resource._links(None):
        resource._ip(None, "link", "delete", j.inner, check=False)
    if resource.namespace_exists(names.namespace) and j.outer in resource._links(
            names.namespace):
        resource._ip(names.namespace, "link", "delete", j.outer, check=False)


def joined(names: ResourceNames) -> bool:
    j = join_names(names)
    return j.inner in resource._links(None)
