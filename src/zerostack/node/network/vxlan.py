"""The farm's public segment: the public bridges of a farm's gateway nodes on different
WAN subnets (the sites of a grid) joined into one layer-2 segment with VXLAN, so that an
address of the farm's pool can be held by a gateway of another site than its subnet's.

Who takes part, from ledger facts only (the farm's gateway records and its pool, read by
the agent after it checked the ledger's signed head):

- per WAN subnet, the farm's gateway with the lowest node id is the subnet's member (two
  members on one subnet would loop the segment through the site's own switch);
- a member whose subnet holds addresses of the farm's pool is an *anchor*: its WAN link
  becomes a port of the public bridge (its addresses and routes move onto the bridge),
  so the site's router reaches the pool's addresses wherever they are held;
- the segment exists when the farm has members on at least two subnets.

On a member: bridge `zpbF` and VXLAN device `zpxF` (F: the farm id in hex, VNI = farm
id, UDP port 4789, its source the node's WAN address), one all-zeros fdb entry per other
member (head-end replication of broadcasts: a frame that came in over VXLAN never goes
back out of it, so a full mesh cannot loop). An anchor filters what crosses between its
WAN link and the VXLAN (bridge table `zpfF`): only ARP, IPv4 and IPv6 from or to a pool
address, and neighbour discovery, so the sites do not merge into one broadcast domain.
Everything is removed (the WAN link's addresses moved back) when the node stops being a
member. The names do not start with `zg`: the node's joins of user networks forward
nothing to links named so (see `join`), and the public bridge carries what a container
with a public address sends out.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any

from zerostack.node.network import resource
from zerostack.node.provisioners.base import ProvisionError

log = logging.getLogger("zerostack.node.network.vxlan")

PORT = 4789
MAX_VNI = (1 << 24) - 1
MAX_PEERS = 16
MAX_POOL = 1024


@dataclass(frozen=True)
class SegmentNames:
    farm: int

    @property
    def bridge(self) -> str:
        return f"zpb{self.farm:x}"

    @property
    def vxlan(self) -> str:
        return f"zpx{self.farm:x}"

    @property
    def table(self) -> str:
        return f"zpf{self.farm:x}"


@dataclass(frozen=True)
class Segment:
    """What one member of the farm's segment makes."""

    names: SegmentNames
    local: str  # the node's own WAN IPv4 address (the VXLAN's source)
    peers: tuple[str, ...]  # the other members' WAN IPv4 addresses
    anchor: bool  # the node's WAN link is a port of the bridge
    pool: tuple[str, ...]  # the farm's pool addresses, without prefix

    @property
    def vni(self) -> int:
        return self.names.farm

    def filter_rules(self, wan: str) -> str:
        """The anchor's bridge filter between its WAN link and the VXLAN (pure)."""
        v4 = [a for a in self.pool if ":" not in a]
        v6 = [a for a in self.pool if ":" in a]
        t, vx = self.names.table, self.names.vxlan
        cross = (f'iifname {{ "{wan}", "{vx}" }} oifname {{ "{wan}", "{vx}" }}')
        lines = [f"{cross} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept"]
        if v4:
            s = "{ " + ", ".join(v4) + " }"
            lines += [f"{cross} arp saddr ip {s} accept", f"{cross} arp daddr ip {s} accept",
                      f"{cross} ip saddr {s} accept", f"{cross} ip daddr {s} accept"]
        if v6:
            s = "{ " + ", ".join(v6) + " }"
            lines += [f"{cross} ip6 saddr {s} accept", f"{cross} ip6 daddr {s} accept"]
        lines.append(f"{cross} drop")
        body = "\n    ".join(lines)
        return f"""table bridge {t}
delete table bridge {t}
table bridge {t} {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    {body}
  }}
}}
"""


def _v4(value: Any) -> ipaddress.IPv4Interface | None:
    try:
        return ipaddress.IPv4Interface(str(value)) if value else None
    except ValueError:
        return None


def plan(farm: int, node_id: int, own: dict[str, Any] | None,
         peers: list[dict[str, Any]], pool: list[dict[str, Any]]) -> Segment | None:
    """The node's part of the farm's segment, or None when it takes no part (pure).
    `own`: the node's gateway record; `peers`: the farm's other gateways ({node, ipv4,
    ...}); `pool`: the farm's pool ({ip, gateway, ...})."""
    if not 1 <= farm <= MAX_VNI or not own:
        return None
    mine = _v4(own.get("ipv4"))
    if mine is None:
        return None
    members: dict[ipaddress.IPv4Network, tuple[int, ipaddress.IPv4Interface]] = {
        mine.network: (node_id, mine)}
    for p in peers[:MAX_PEERS * 4]:
        address, node = _v4(p.get("ipv4")), p.get("node")
        if address is None or type(node) is not int or node == node_id:
            continue
        held = members.get(address.network)
        if held is None or node < held[0]:
            members[address.network] = (node, address)
    if members[mine.network][0] != node_id:
        return None  # another gateway of this subnet is its member
    others = sorted(str(a.ip) for net, (_, a) in members.items() if net != mine.network)
    if not others:
        return None
    addresses: list[str] = []
    for entry in pool[:MAX_POOL]:
        try:
            addresses.append(str(ipaddress.ip_interface(str(entry.get("ip"))).ip))
        except ValueError:
            continue
    anchor = any(ipaddress.ip_address(a) in mine.network for a in addresses if ":" not in a)
    return Segment(SegmentNames(farm), str(mine.ip), tuple(others[:MAX_PEERS]), anchor,
                   tuple(sorted(set(addresses))))


# ---- the kernel ---------------------------------------------------------------------


def _json(*args: str) -> list[dict[str, Any]]:
    out = resource._ip(None, "-j", *args, check=False)
    try:
        data = json.loads(out or "[]")
    except ValueError:
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _link_with(address: str) -> str | None:
    """The node's link that has `address` as one of its own."""
    for link in _json("addr", "show"):
        if any(a.get("local") == address for a in link.get("addr_info", [])):
            return str(link.get("ifname"))
    return None


def ports(bridge: str) -> list[str]:
    return [str(link.get("ifname")) for link in _json("link", "show", "master", bridge)]


def _move(src: str, dst: str, master: str | None) -> None:
    """Move the global addresses, the routes and the proxy neighbour entries of link
    `src` to link `dst`, making `src` a port of `master` (None: of no bridge), in one
    `ip -batch` (the node's own connections keep their addresses)."""
    addrs = [a for link in _json("addr", "show", "dev", src) for a in link.get("addr_info", [])
             if a.get("scope") == "global"]
    routes = [(4, r) for r in _json("-4", "route", "show", "dev", src)]
    routes += [(6, r) for r in _json("-6", "route", "show", "dev", src)]
    proxies = _json("-6", "neigh", "show", "proxy", "dev", src)
    lines = [f"addr del {a['local']}/{a['prefixlen']} dev {src}" for a in addrs]
    lines.append(f"link set {src} master {master}" if master else f"link set {src} nomaster")
    lines.append(f"link set {src} up")
    for a in addrs:
        nodad = " nodad" if a.get("family") == "inet6" else ""
        lines.append(f"addr add {a['local']}/{a['prefixlen']} dev {dst}{nodad}")
    for family, r in routes:  # a batch line names no family: the addresses do
        target = str(r.get("dst", "default"))
        if r.get("protocol") == "kernel" or target.startswith(("fe80", "ff")):
            continue
        if family == 6 and target == "default" and not r.get("gateway"):
            continue
        via = f" via {r['gateway']}" if r.get("gateway") else ""
        metric = f" metric {r['metric']}" if family == 4 and r.get("metric") else ""
        lines.append(f"route replace {target}{via} dev {dst}{metric}")
    lines += [f"neigh add proxy {p['dst']} dev {dst}" for p in proxies if p.get("dst")]
    resource._run(["ip", "-force", "-batch", "-"], stdin="\n".join(lines) + "\n", check=False)
    log.info("event=wan_moved from=%s to=%s addresses=%d", src, dst, len(addrs))


def _vxlan_ok(seg: Segment) -> bool:
    for link in _json("-d", "link", "show", "dev", seg.names.vxlan):
        data = (link.get("linkinfo") or {}).get("info_data") or {}
        return bool(data.get("id") == seg.vni and data.get("local") == seg.local
                    and data.get("port") == PORT)
    return False


def _fdb_peers(vxlan: str) -> set[str]:
    out = resource._run(["bridge", "-j", "fdb", "show", "dev", vxlan], check=False)
    try:
        rows = json.loads(out or "[]")
    except ValueError:
        return set()
    return {str(r["dst"]) for r in rows if isinstance(r, dict)
            and r.get("mac") == "00:00:00:00:00:00" and r.get("dst")}


def ensure(seg: Segment) -> str:
    """Make the node's part of the segment (converging); returns the public bridge."""
    n = seg.names
    wan = _link_with(seg.local)
    if wan is None:
        raise ProvisionError(f"the node's WAN address {seg.local} is on none of its links")
    links = resource._links(None)
    if n.bridge not in links:
        resource._ip(None, "link", "add", n.bridge, "type", "bridge")
    resource._ip(None, "link", "set", n.bridge, "up")
    if n.vxlan in links and not _vxlan_ok(seg):
        resource._ip(None, "link", "delete", n.vxlan, check=False)
        links.pop(n.vxlan)
    if n.vxlan not in links:
        # mtu 1500: the node's own traffic keeps its MTU; the WAN fragments what is
        # larger once wrapped (the VXLAN leaves DF unset)
        resource._ip(None, "link", "add", n.vxlan, "mtu", "1500", "type", "vxlan", "id",
                     str(seg.vni), "local", seg.local, "dstport", str(PORT))
    resource._ip(None, "link", "set", n.vxlan, "master", n.bridge, "up")
    have = _fdb_peers(n.vxlan)
    for peer in seg.peers:
        if peer not in have:
            resource._run(["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", n.vxlan,
                           "dst", peer])
    for peer in have - set(seg.peers):
        resource._run(["bridge", "fdb", "delete", "00:00:00:00:00:00", "dev", n.vxlan,
                       "dst", peer], check=False)
    uplinks = [p for p in ports(n.bridge) if p != n.vxlan]
    if seg.anchor:
        if wan != n.bridge:
            resource._run(["nft", "-f", "-"], stdin=seg.filter_rules(wan))
            # the bridge takes the WAN link's MAC, which the site's neighbours know
            resource._ip(None, "link", "set", n.bridge, "address",
                         str(links.get(wan, {}).get("address", "")), check=False)
            _move(wan, n.bridge, n.bridge)
            uplinks = [wan]
        if uplinks:
            resource._run(["nft", "-f", "-"], stdin=seg.filter_rules(uplinks[0]))
    else:
        _release_uplinks(n, uplinks)
    return n.bridge


def _release_uplinks(n: SegmentNames, uplinks: list[str]) -> None:
    for link in uplinks:
        _move(n.bridge, link, None)
    resource._run(["nft", "delete", "table", "bridge", n.table], check=False)


def remove(names: SegmentNames) -> None:
    """Undo `ensure`: the WAN link gets its addresses back, the devices go."""
    links = resource._links(None)
    if names.bridge in links:
        _release_uplinks(names, [p for p in ports(names.bridge) if p != names.vxlan])
    else:
        resource._run(["nft", "delete", "table", "bridge", names.table], check=False)
    for link in (names.vxlan, names.bridge):
        if link in links:
            resource._ip(None, "link", "delete", link, check=False)
            log.info("event=segment_link_deleted name=%s", link)


def present() -> list[SegmentNames]:
    """The segments this node has (by their bridges' names)."""
    found = []
    for name in resource._links(None):
        if name.startswith("zpb"):
            try:
                found.append(SegmentNames(int(name[3:], 16)))
            except ValueError:
                continue
    return found


def converge(farm: int, node_id: int, own: dict[str, Any] | None,
             peers: list[dict[str, Any]], pool: list[dict[str, Any]]) -> Segment | None:
    """Make what `plan` says and remove any other segment of this node."""
    seg = plan(farm, node_id, own, peers, pool)
    if seg is None:
        if SegmentNames(farm) in present():
            remove(SegmentNames(farm))
        return None
    if _link_with(seg.local) is None:
        # the gateway's address is not this namespace's (a grid on loopback, or a record
        # that does not match the node): nothing to join from
        log.debug("event=segment_skipped farm=%s local=%s", farm, seg.local)
        return None
    ensure(seg)
    return seg


def segment_bridge(farm: int) -> str | None:
    """The farm's public bridge on this node, if it has one."""
    name = SegmentNames(farm).bridge
    return name if name in resource._links(None) else None
