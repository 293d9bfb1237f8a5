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
import os
import subprocess
from pathlib import Path

from zerostack.node.hostfs import create_private, private_dir
from zerostack.node.network import join, resource
from zerostack.node.network.plan import PREFIX, ResourceNames
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


def read_counters(table: str) -> tuple[int, int] | None:
    """Bytes (in, out) the table's counters hold (they restart from 0 when the table is
    made again); None when the table is not there."""
    out = _nft("-j", "list", "counters", "table", "ip", table, check=False)
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


def _wan_link(address: ipaddress.IPv4Interface) -> str:
    """The node's link whose own address is in `address`'s network (its WAN side)."""
    out = resource._ip(None, "-j", "-4", "addr", "show", check=False)
    try:
        links = json.loads(out or "[]")
    except ValueError:
        links = []
    for link in links:
        for a in link.get("addr_info", []):
            try:
                own = ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
            except (KeyError, ValueError):
                continue
            if own.ip != address.ip and address.ip in own.network:
                return str(link["ifname"])
    raise ProvisionError(f"public address {address} is not on a link of this node (its "
                         "subnet is another site's: it needs the farm's VXLAN, not done yet)")


class PublicIpProvisioner(Provisioner):
    def _key(self) -> str:
        return self.node.identity.public_hex

    def _address(self, wid: WorkloadID, spec: PublicIPWorkload,
                 deployment: Deployment) -> ipaddress.IPv4Interface:
        """The k-th IPv4 address the ledger gave the contract, for the k-th public_ip
        workload asking for IPv4 (by name)."""
        held = (self.node.extra.get("contract_ips") or {}).get(wid.contract)
        if held is None:
            raise ProvisionError("the node does not know the contract's public addresses yet")
        v4 = [ipaddress.IPv4Interface(a) for a in held if ":" not in a]
        mine = sorted(w.name for w in deployment.workloads
                      if isinstance(w, PublicIPWorkload) and w.v4)
        k = mine.index(wid.name)
        if k >= len(v4):
            raise ProvisionError("the ledger gave this contract no public IPv4 address for "
                                 f"{wid.name} (it holds {held})")
        return v4[k]

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
        if spec.v6:
            raise ProvisionError("public IPv6 addresses for containers need IPv6 on user "
                                 "networks, which Zero-Net does not have yet")
        if not spec.v4:
            raise ProvisionError("a public_ip workload asks for v4 (v6 is not supported)")
        address = self._address(wid, spec, deployment)
        link = _wan_link(address)
        made = {"address": str(address.ip), "link": link}
        used = self._container(wid, deployment)
        if used is not None:
            container, net = used
            netprov = self.node.extra.get("container_network")
            if netprov is None:
                raise ProvisionError("this node runs no user networks")
            res = netprov._plan(WorkloadID(wid.contract, net.name), net)
            with netprov._lock:
                private = netprov._assign(res.names, net, deployment)[container.name]
            made.update(namespace=res.names.namespace, private=private,
                        container=container.name)
            self._write(wid, made)  # before anything is made: a removal finds it all
            join.ensure_join(res)
            route_out(res.names, str(route_table(self._key(), wid)), private,
                      join.join_address(res.subnet))
            join.route_to(res, private)
            _nft("-f", "-", stdin=ruleset(table_name(self._key(), wid), str(address.ip),
                                          private, join.join_names(res.names).inner))
        else:
            self._write(wid, made)
        resource._ip(None, "addr", "replace", f"{address.ip}/32", "dev", link)
        return Provisioned(data={"ipv4": str(address), **(
            {"container": made["container"]} if "container" in made else {})})

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        made = self._read(wid)
        _nft("delete", "table", "ip", table_name(self._key(), wid), check=False)
        if made.get("address") and made.get("link"):
            resource._ip(None, "addr", "delete", f"{made['address']}/32", "dev",
                         made["link"], check=False)
        ns = made.get("namespace", "")
        if ns and made.get("private") and resource.namespace_exists(ns):
            drop_rules(ns, str(route_table(self._key(), wid)), made["private"])
        if ns.startswith(f"{PREFIX}-") and made.get("private"):
            join.unroute(ResourceNames(ns[len(PREFIX) + 1:]), made["private"])
        self._record(wid).unlink(missing_ok=True)

    def traffic(self, wid: WorkloadID, spec: Workload) -> dict[str, tuple[int, int]] | None:
        """Bytes (in, out) to and from the container through the public address, from
        the table's counters; nothing while no container uses the address."""
        if not self._read(wid).get("private"):
            return {}
        got = read_counters(table_name(self._key(), wid))
        return {"nat": got} if got is not None else {}

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        made = self._read(wid)
        if not made:
            return False
        if made.get("private") and not _nft("list", "table", "ip",
                                            table_name(self._key(), wid), check=False):
            return False
        out = resource._ip(None, "-o", "-4", "addr", "show", "dev", made.get("link", "lo"),
                           check=False)
        return f" {made.get('address')}/32 " in out
