"""`public_ip`: an address of the farm's public pool, allocated to the contract by the
ledger (one contract per address), put on the node's WAN link and mapped one to one onto
the container that names it (`network.public_ip`): what the WAN sends to the address
reaches the container (DNAT), and what the container sends out leaves from the address
(SNAT), through the node's join of the container's network (policy routing in the
network's namespace sends the container's traffic for anywhere but its own network to
the node; the node routes the address's traffic to the container through the resource,
so the resource's connection tracking sees both ways).

Made in the node's namespace: the address (/32 on the link that carries its subnet) and
one nftables table `zgpH` (the NAT and two byte counters, `in` and `out`, which the node
bills as the contract's traffic); in the network's namespace: two rules and one routing table,
all named from the workload, all removed on cancel. IPv4 only: user networks are IPv4.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import subprocess
from pathlib import Path

from zerostack.node.hostfs import create_private, private_dir
from zerostack.node.network import announce, join, resource, vxlan
from zerostack.node.network.plan import PREFIX, ResourceNames, container_link_names
from zerostack.node.provisioners.base import (
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.workloads import (
    ContainerWorkload,
    Deployment,
    NetworkWorkload,
    PublicIPWorkload,
    Workload,
)

TIMEOUT = 15.0
log = logging.getLogger("zerostack.node.public_ip")


def _digest(node_key: str, wid: WorkloadID) -> str:
    return hashlib.blake2b(f"{node_key}/{wid.contract}/{wid.name}".encode(),
                           digest_size=5).hexdigest()


def table_name(node_key: str, wid: WorkloadID) -> str:
    return f"zgp{_digest(node_key, wid)}"


def route_table(node_key: str, wid: WorkloadID) -> int:
    """A routing table number of the network's namespace for this workload."""
    return 10_000 + int(_digest(node_key, wid), 16) % 1_000_000


def ruleset(table: str, public: str, private: str, join_link: str) -> str:
    """One to one NAT between `public` and the container's `private` address, and two
    named counters of the bytes it carries (pure): `in` what the node forwards to the
    container, `out` what it forwards from it, of connections the table NATs (its DNAT
    in or its SNAT out). The NAT chains see only a connection's first packet, so the
    counting is in the forward chain, where the addresses are the container's."""
    return f"""table ip {table}
delete table ip {table}
table ip {table} {{
  counter in {{
  }}
  counter out {{
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip daddr {private} ct status dnat,snat counter name "in"
    ip saddr {private} ct status dnat,snat counter name "out"
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    ip daddr {public} dnat to {private}
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {private} oifname != "{join_link}" snat to {public}
  }}
}}
"""


def read_counters(table: str, family: str = "ip") -> tuple[int, int] | None:
    """Bytes (in, out) the table's counters hold (they restart from 0 when the table is
    made again); None when the table is not there."""
    out = _nft("-j", "list", "counters", "table", family, table, check=False)
    if not out:
        return None
    try:
        items = json.loads(out[:1 << 20]).get("nftables", [])
    except (ValueError, AttributeError):
        raise ProvisionError(f"nft listed the counters of {table} unreadably") from None
    got: dict[str, int] = {}
    for item in items if isinstance(items, list) else []:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") in ("in", "out"):
            value = counter.get("bytes")
            if type(value) is int and value >= 0:
                got[str(counter["name"])] = value
    if set(got) != {"in", "out"}:
        raise ProvisionError(f"table {table} lacks its byte counters (made by an older "
                             "version: it gets them when the workload is provisioned again)")
    return got["in"], got["out"]


def route_out(names: ResourceNames, table: str, private: str, via: str) -> None:
    """In the network's namespace: the container's traffic for anything its own network
    does not route goes to the node (which SNATs it to the public address)."""
    ns = names.namespace
    drop_rules(ns, table, private)
    resource._ip(ns, "route", "replace", "default", "via", via, "dev", names.bridge,
                 "table", table)
    resource._ip(ns, "rule", "add", "from", private, "lookup", "main",
                 "suppress_prefixlength", "0", "priority", "100")
    resource._ip(ns, "rule", "add", "from", private, "lookup", table, "priority", "101")


def drop_rules(ns: str, table: str, private: str) -> None:
    for priority in ("100", "101"):
        for _ in range(8):  # one per call; a crash may have left a duplicate
            out = subprocess.run(["ip", "-n", ns, "rule", "delete", "from", private,
                                  "priority", priority], capture_output=True,
                                 timeout=TIMEOUT, check=False)
            if out.returncode != 0:
                break
    resource._ip(ns, "route", "flush", "table", table, check=False)


def _nft(*args: str, stdin: str | None = None, check: bool = True) -> str:
    try:
        out = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                             timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"nft: {exc}") from None
    if check and out.returncode != 0:
        raise ProvisionError(f"nft {' '.join(args)[:80]} failed: {out.stderr.strip()[:300]}")
    return out.stdout if out.returncode == 0 else ""


def _wan_link(address: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
              farm: int = 0) -> tuple[str, bool]:
    """The node's link for `address`: the one whose own address is in `address`'s network
    (its WAN side), else the farm's public bridge (the VXLAN segment to the address's
    site). The flag says the second: the node has no address of its own there, so the
    address's traffic is routed to the pool's gateway by policy."""
    family = "-4" if address.version == 4 else "-6"
    out = resource._ip(None, "-j", family, "addr", "show", check=False)
    try:
        links = json.loads(out or "[]")
    except ValueError:
        links = []
    for link in links:
        for a in link.get("addr_info", []):
            if a.get("scope") != "global":
                continue
            try:
                own = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            except (KeyError, ValueError):
                continue
            if own.ip != address.ip and address.ip in own.network:
                return str(link["ifname"]), False
    bridge = vxlan.segment_bridge(farm) if farm else None
    if bridge is not None:
        return bridge, True
    raise ProvisionError(f"public address {address} is not on a link of this node, and the "
                         "node is on no VXLAN segment of its farm reaching its subnet")


def policy_table(node_key: str, wid: WorkloadID, version: int) -> int:
    """The node namespace's routing table of a public address held over the segment."""
    return route_table(node_key, wid) + (1_000_000 if version == 6 else 0)


def route_remote(version: int, table: int, bridge: str, gateway: str,
                 sources: list[str]) -> None:
    """Traffic from `sources` (the public address, the container behind it) leaves
    through the farm's segment to the pool's gateway."""
    family = "-6" if version == 6 else "-4"
    drop_remote(version, table, sources)
    resource._ip(None, family, "route", "replace", "default", "via", gateway, "dev", bridge,
                 "onlink", "table", str(table))
    for source in sources:
        resource._ip(None, family, "rule", "add", "from", source, "lookup", str(table),
                     "priority", "200")


def drop_remote(version: int, table: int, sources: list[str]) -> None:
    family = "-6" if version == 6 else "-4"
    for source in sources:
        for _ in range(8):
            out = subprocess.run(["ip", family, "rule", "delete", "from", source,
                                  "lookup", str(table), "priority", "200"],
                                 capture_output=True, timeout=TIMEOUT, check=False)
            if out.returncode != 0:
                break
    resource._ip(None, family, "route", "flush", "table", str(table), check=False)


def v6_names(node_key: str, wid: WorkloadID) -> tuple[str, str]:
    """The container's public IPv6 link: (node side, container side before renaming)."""
    digest = _digest(node_key, wid)
    return f"zgq{digest}", f"zgq{digest}c"


V6_LINK = "pub6"  # the link's name in the container
V6_GATEWAY = "fe80::1"  # the node side's address on it: the container's default route


def v6_rules(table: str, public: str, link: str, wan: str) -> str:
    """The node's filter of a container's public IPv6 link (pure): the container sends
    from its address only and only to the WAN; it reaches the node itself only with
    neighbour discovery and replies; two counters for billing."""
    return f"""table ip6 {table}
delete table ip6 {table}
table ip6 {table} {{
  counter in {{
  }}
  counter out {{
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{link}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept
    iifname "{link}" ct state established,related accept
    iifname "{link}" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{link}" ip6 saddr != {public} drop
    iifname "{link}" oifname != "{wan}" drop
    oifname "{link}" ip6 daddr {public} counter name "in"
    iifname "{link}" counter name "out"
  }}
}}
"""


def v6_table(node_key: str, wid: WorkloadID) -> str:
    return f"zgq{_digest(node_key, wid)}"


class PublicIpProvisioner(Provisioner):
    def _key(self) -> str:
        return self.node.identity.public_hex

    def _farm(self) -> int:
        farm = self.node.extra.get("farm", 0)
        return farm if type(farm) is int else 0

    def _address(self, wid: WorkloadID, deployment: Deployment,
                 version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """The k-th address of `version` the ledger gave the contract, for the k-th
        public_ip workload asking for that version (by name)."""
        held = (self.node.extra.get("contract_ips") or {}).get(wid.contract)
        if held is None:
            raise ProvisionError("the node does not know the contract's public addresses yet")
        mine_v = [ipaddress.ip_interface(a) for a in held]
        mine_v = [a for a in mine_v if a.version == version]
        names = sorted(w.name for w in deployment.workloads if isinstance(w, PublicIPWorkload)
                       and (w.v4 if version == 4 else w.v6))
        k = names.index(wid.name)
        if k >= len(mine_v):
            raise ProvisionError(f"the ledger gave this contract no public IPv{version} "
                                 f"address for {wid.name} (it holds {held})")
        return mine_v[k]

    def _pool_gateway(self, address: str) -> str:
        for entry in self.node.extra.get("farm_pool") or []:
            if isinstance(entry, dict) and str(entry.get("ip", "")).split("/")[0] == address:
                return str(entry.get("gateway", ""))
        raise ProvisionError(f"{address} is not in the farm's pool on the ledger")

    def _container(self, wid: WorkloadID,
                   deployment: Deployment) -> tuple[ContainerWorkload, NetworkWorkload] | None:
        users = [w for w in deployment.workloads if isinstance(w, ContainerWorkload)
                 and w.network is not None and w.network.public_ip == wid.name]
        if len(users) > 1:
            raise ProvisionError(f"containers {', '.join(w.name for w in users)} all ask for "
                                 f"public address {wid.name}: one container per address")
        if not users:
            return None
        assert users[0].network is not None
        net = deployment.workload(users[0].network.network)
        if not isinstance(net, NetworkWorkload):
            raise ProvisionError(f"container {users[0].name} is on no network here")
        return users[0], net

    def _record(self, wid: WorkloadID) -> Path:
        return self.node.data_dir / "gateway" / "public_ip" / f"{wid.key}.json"

    def _read(self, wid: WorkloadID) -> dict[str, str]:
        try:
            with open(self._record(wid), "rb") as f:
                data = json.loads(f.read(4096))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write(self, wid: WorkloadID, made: dict[str, str]) -> None:
        folder = private_dir(self.node.data_dir / "gateway" / "public_ip")
        tmp = folder / f".{wid.key}.tmp"
        tmp.unlink(missing_ok=True)
        fd = create_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, json.dumps(made).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self._record(wid))

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        if not isinstance(spec, PublicIPWorkload):
            raise ProvisionError(f"{wid}: not a public_ip workload")
        if not spec.v4 and not spec.v6:
            raise ProvisionError("a public_ip workload asks for v4, v6 or both")
        used = self._container(wid, deployment)
        address4 = self._address(wid, deployment, 4) if spec.v4 else None
        address6 = self._address(wid, deployment, 6) if spec.v6 else None
        # everything this workload may have made is recorded before it is made
        made = self._read(wid)
        if address4 is not None:
            link, remote = _wan_link(address4, self._farm())
            made.update(address=str(address4.ip), link=link, remote="1" if remote else "")
        if address6 is not None:
            link6, remote6 = _wan_link(address6, self._farm())
            made.update(address6=str(address6.ip), link6=link6, remote6="1" if remote6 else "")
        if used is not None:
            made.update(container=used[0].name)
        self._write(wid, made)
        data: dict[str, str] = {}
        if address4 is not None:
            self._provision_v4(wid, address4, made, used, deployment)
            data["ipv4"] = str(address4)
        if address6 is not None:
            self._provision_v6(wid, address6, made, used)
            data["ipv6"] = str(address6)
        if used is not None:
            data["container"] = used[0].name
        return Provisioned(data=data)

    def _provision_v4(self, wid: WorkloadID,
                      address: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                      made: dict[str, str],
                      used: tuple[ContainerWorkload, NetworkWorkload] | None,
                      deployment: Deployment) -> None:
        public, link = str(address.ip), made["link"]
        sources = [public]
        if used is not None:
            container, net = used
            netprov = self.node.extra.get("container_network")
            if netprov is None:
                raise ProvisionError("this node runs no user networks")
            res = netprov._plan(WorkloadID(wid.contract, net.name), net)
            with netprov._lock:
                private = netprov._assign(res.names, net, deployment)[container.name]
            made.update(namespace=res.names.namespace, private=private)
            self._write(wid, made)
            join.ensure_join(res)
            route_out(res.names, str(route_table(self._key(), wid)), private,
                      join.join_address(res.subnet))
            join.route_to(res, private)
            _nft("-f", "-", stdin=ruleset(table_name(self._key(), wid), public, private,
                                          join.join_names(res.names).inner))
            sources.append(private)
        resource._ip(None, "addr", "replace", f"{public}/32", "dev", link)
        if made.get("remote"):
            route_remote(4, policy_table(self._key(), wid, 4), link,
                         self._pool_gateway(public), sources)
        else:  # held over the segment before, perhaps
            drop_remote(4, policy_table(self._key(), wid, 4), sources)
        _announce(link, public)

    def _provision_v6(self, wid: WorkloadID,
                      address: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                      made: dict[str, str],
                      used: tuple[ContainerWorkload, NetworkWorkload] | None) -> None:
        public, link = str(address.ip), made["link6"]
        if used is None:  # the node itself answers on the address
            resource._ip(None, "-6", "addr", "replace", f"{public}/128", "dev", link, "nodad")
        else:
            ns = container_link_names(self._key(), WorkloadID(wid.contract, used[0].name)
                                      ).namespace
            if not resource.namespace_exists(ns):
                raise ProvisionError(f"container {used[0].name} has no network namespace yet")
            outer, inner = v6_names(self._key(), wid)
            made.update(veth6=outer, namespace6=ns)
            self._write(wid, made)
            if outer not in resource._links(None) or V6_LINK not in resource._links(ns):
                resource._ip(None, "link", "delete", outer, check=False)
                resource._ip(ns, "link", "delete", V6_LINK, check=False)
                resource._ip(None, "link", "add", outer, "type", "veth", "peer", "name", inner,
                             "netns", ns)
                resource._ip(ns, "link", "set", inner, "name", V6_LINK)
            _nft("-f", "-", stdin=v6_rules(v6_table(self._key(), wid), public, outer, link))
            resource._run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
            resource._run(["sysctl", "-qw", f"net.ipv6.conf.{link}.proxy_ndp=1"])
            resource._ip(None, "link", "set", outer, "up")
            resource._ip(None, "-6", "addr", "replace", f"{V6_GATEWAY}/64", "dev", outer,
                         "nodad")
            resource._ip(ns, "link", "set", V6_LINK, "up")
            resource._ip(ns, "-6", "addr", "replace", f"{public}/128", "dev", V6_LINK, "nodad")
            resource._ip(ns, "-6", "route", "replace", "default", "via", V6_GATEWAY, "dev",
                         V6_LINK)
            resource._ip(None, "-6", "route", "replace", f"{public}/128", "dev", outer)
            resource._ip(None, "-6", "neigh", "replace", "proxy", public, "dev", link)
        if made.get("remote6"):
            route_remote(6, policy_table(self._key(), wid, 6), link,
                         self._pool_gateway(public), [public])
        else:
            drop_remote(6, policy_table(self._key(), wid, 6), [public])
        _announce(link, public)

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        made = self._read(wid)
        key = self._key()
        _nft("delete", "table", "ip", table_name(key, wid), check=False)
        _nft("delete", "table", "ip6", v6_table(key, wid), check=False)
        if made.get("address") and made.get("link"):
            resource._ip(None, "addr", "delete", f"{made['address']}/32", "dev",
                         made["link"], check=False)
            drop_remote(4, policy_table(key, wid, 4),
                        [made["address"], *([made["private"]] if made.get("private") else [])])
        if made.get("address6") and made.get("link6"):
            public, link = made["address6"], made["link6"]
            resource._ip(None, "-6", "addr", "delete", f"{public}/128", "dev", link,
                         check=False)
            resource._ip(None, "-6", "neigh", "delete", "proxy", public, "dev", link,
                         check=False)
            drop_remote(6, policy_table(key, wid, 6), [public])
        if made.get("veth6"):
            resource._ip(None, "link", "delete", made["veth6"], check=False)
            ns6 = made.get("namespace6", "")
            if ns6 and resource.namespace_exists(ns6):
                resource._ip(ns6, "link", "delete", V6_LINK, check=False)
        ns = made.get("namespace", "")
        if ns and made.get("private") and resource.namespace_exists(ns):
            drop_rules(ns, str(route_table(key, wid)), made["private"])
        if ns.startswith(f"{PREFIX}-") and made.get("private"):
            join.unroute(ResourceNames(ns[len(PREFIX) + 1:]), made["private"])
        self._record(wid).unlink(missing_ok=True)

    def traffic(self, wid: WorkloadID, spec: Workload) -> dict[str, tuple[int, int]] | None:
        """Bytes (in, out) to and from the container through the public addresses, from
        the tables' counters; nothing while no container uses an address."""
        made = self._read(wid)
        got: dict[str, tuple[int, int]] = {}
        if made.get("private"):
            v4 = read_counters(table_name(self._key(), wid))
            if v4 is not None:
                got["nat"] = v4
        if made.get("veth6"):
            v6 = read_counters(v6_table(self._key(), wid), "ip6")
            if v6 is not None:
                got["v6"] = v6
        return got

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        made = self._read(wid)
        if not made or not isinstance(spec, PublicIPWorkload):
            return False
        key = self._key()
        if spec.v4:
            if not made.get("address") or not _still(made["address"], 32, made.get("link", ""), self._farm()):
                return False
            if made.get("private") and not _nft("list", "table", "ip", table_name(key, wid),
                                                 check=False):
                return False
            out = resource._ip(None, "-o", "-4", "addr", "show", "dev", made["link"],
                               check=False)
            if f" {made['address']}/32 " not in out:
                return False
        if spec.v6:
            public = made.get("address6", "")
            if not public or not _still(public, 128, made.get("link6", ""), self._farm()):
                return False
            if made.get("veth6"):
                ns6 = made.get("namespace6", "")
                if (made["veth6"] not in resource._links(None) or not ns6
                        or not resource.namespace_exists(ns6)
                        or V6_LINK not in resource._links(ns6)):
                    return False
                proxies = resource._ip(None, "-6", "neigh", "show", "proxy", "dev",
                                       made["link6"], check=False)
                if public not in proxies.split():
                    return False
            else:
                out = resource._ip(None, "-o", "-6", "addr", "show", "dev", made["link6"],
                                   check=False)
                if f" {public}/128 " not in out:
                    return False
        return True


def _still(address: str, prefix: int, link: str, farm: int) -> bool:
    """Whether `link` is still the node's link for `address` (a VXLAN segment made or
    removed since moves it: the workload is provisioned again on the new link)."""
    try:
        want, _ = _wan_link(ipaddress.ip_interface(f"{address}/{prefix}"), farm)
    except ProvisionError:
        return False
    return want == link


def _announce(link: str, address: str) -> None:
    """Tell the link's neighbours (across the segment too) where the address is now."""
    try:
        announce.announce(link, address)
    except ProvisionError as exc:
        log.warning("event=announce_failed address=%s error=%r", address, str(exc))
