"""`port_forward`: a TCP or UDP port of the gateway's public IPv4 address forwarded to a
container's port on the owner's user network (which the node joins, as for proxies).

One nftables table per workload in the node's namespace (`zgfH`, H from the workload),
so removing it removes exactly its rules: DNAT of the public port to the target, and
masquerade of what goes to the target through the join, so replies come back through
this node (the target sees the gateway's address on its network, not the client's).
Over IPv6 (the gateway's public IPv6 address, when it has one) the port is relayed by
the agent itself (`gateway.relay`): user networks are IPv4 and nftables does no NAT64.
The relay lives in the agent's process: after an agent restart `exists` finds it gone
and the workload is provisioned again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess
import threading

from zerostack.gateway.config import HTTP_PORT, HTTPS_PORT
from zerostack.gateway.errors import GatewayError
from zerostack.gateway.relay import Relay, RelaySpec
from zerostack.node.network import join
from zerostack.node.network.plan import resource_names
from zerostack.node.provisioners.base import (
    NodeContext,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.node.provisioners.gateway import GatewayService
from zerostack.workloads import Deployment, NetworkWorkload, PortForwardWorkload, Workload
from zerostack.workloads.types import parse_endpoint

DNS_PORT = 53
TIMEOUT = 15.0


def table_name(node_key: str, wid: WorkloadID) -> str:
    digest = hashlib.blake2b(f"{node_key}/{wid.contract}/{wid.name}".encode(),
                             digest_size=5).hexdigest()
    return f"zgf{digest}"


def ruleset(table: str, public: str, spec: PortForwardWorkload, join_link: str) -> str:
    """The workload's table (pure): DNAT, and masquerade towards the target."""
    target, port = parse_endpoint(spec.target)
    p = spec.protocol
    return f"""table ip {table}
delete table ip {table}
table ip {table} {{
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    ip daddr {public} {p} dport {spec.port} dnat to {target}:{port}
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{join_link}" ip daddr {target} {p} dport {port} ct status dnat masquerade
  }}
}}
"""


def _nft(*args: str, stdin: str | None = None, check: bool = True) -> str:
    try:
        out = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                             timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"nft: {exc}") from None
    if check and out.returncode != 0:
        raise ProvisionError(f"nft {' '.join(args)[:80]} failed: {out.stderr.strip()[:300]}")
    return out.stdout if out.returncode == 0 else ""


def _listening(protocol: str, port: int) -> bool:
    """Whether a process of the node's namespace listens on `port` (its own services)."""
    out = subprocess.run(["ss", "-Hln", "-t" if protocol == "tcp" else "-u"],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False).stdout
    return any(line.split()[3].rsplit(":", 1)[-1] == str(port)
               for line in out.splitlines() if len(line.split()) > 3)


class PortForwardProvisioner(Provisioner):
    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self.service = GatewayService.of(node)
        self._lock = threading.Lock()
        self._ports: dict[tuple[str, int], str] = {}  # (protocol, port) -> table
        self._relays: dict[str, Relay] = {}  # table -> the port's IPv6 relay

    def _table(self, wid: WorkloadID) -> str:
        return table_name(self.node.identity.public_hex, wid)

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        if not isinstance(spec, PortForwardWorkload):
            raise ProvisionError(f"{wid}: not a port_forward workload")
        addresses = self.service.public_addresses()
        public, public6 = addresses.get("ipv4"), addresses.get("ipv6")
        if not public and not public6:
            raise ProvisionError("this gateway has no public address to forward from")
        table = self._table(wid)
        key = (spec.protocol, spec.port)
        with self._lock:
            holder = self._ports.get(key)
            if holder is not None and holder != table:
                raise ProvisionError(f"{spec.protocol} port {spec.port} is already forwarded "
                                     "on this gateway")
            if spec.protocol == "tcp" and spec.port in (HTTP_PORT, HTTPS_PORT):
                raise ProvisionError(f"tcp port {spec.port} is the gateway's HTTP(S) proxy")
            if spec.port == DNS_PORT:
                # the grid DNS starts only with the first proxy route: reserved before then
                raise ProvisionError(f"{spec.protocol} port 53 is the gateway's grid DNS")
            if holder is None and _listening(spec.protocol, spec.port):
                raise ProvisionError(f"{spec.protocol} port {spec.port} is in use by the "
                                     "gateway node itself")
            net = deployment.workload(spec.network)
            if not isinstance(net, NetworkWorkload):
                raise ProvisionError(f"{spec.network!r} is not a network of this deployment")
            target, _ = parse_endpoint(spec.target)
            if ipaddress.ip_address(target) not in ipaddress.ip_network(net.ip_range):
                raise ProvisionError(f"target {spec.target} is outside network "
                                     f"{net.name!r} ({net.ip_range})")
            netprov = self.node.extra.get("container_network")
            if netprov is None:
                raise ProvisionError("this node runs no user networks")
            res = netprov._plan(WorkloadID(wid.contract, net.name), net)
            if target in (join.join_address(res.subnet), res.bridge_address.split("/")[0]):
                raise ProvisionError(f"target {spec.target} is this gateway node itself")
            join.ensure_join(res)
            if public:
                _nft("-f", "-", stdin=ruleset(table, public, spec,
                                              join.join_names(res.names).inner))
            if public6:
                self._relay(table, RelaySpec(spec.protocol, public6, spec.port, target,
                                             parse_endpoint(spec.target)[1]))
            self._ports[key] = table
            with self.service.lock:
                self.service.joined[table] = res.names.tag
        data = {"protocol": spec.protocol, "target": spec.target}
        if public:
            data["public"] = f"{public}:{spec.port}"
        if public6:
            data["public6"] = f"[{public6}]:{spec.port}"
        return Provisioned(data=data)

    def _relay(self, table: str, want: RelaySpec) -> None:
        """The port's IPv6 relay, started (or restarted when it changed or died)."""
        relay = self._relays.get(table)
        if relay is not None and relay.spec == want and relay.alive():
            return
        if relay is not None:
            relay.stop()
            self._relays.pop(table, None)
        relay = Relay(want)
        try:
            relay.start()
        except GatewayError as exc:
            raise ProvisionError(str(exc)) from None
        self._relays[table] = relay

    def update(self, wid: WorkloadID, old: Workload, new: Workload,
               deployment: Deployment) -> Provisioned:
        self.deprovision(wid, old)
        return self.provision(wid, new, deployment)

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        table = self._table(wid)
        _nft("delete", "table", "ip", table, check=False)
        with self._lock:
            relay = self._relays.pop(table, None)
            if relay is not None:
                relay.stop()
            for k, v in list(self._ports.items()):
                if v == table:
                    del self._ports[k]
        with self.service.lock:
            self.service.joined.pop(table, None)
        if isinstance(spec, PortForwardWorkload):
            self.service.leave_unused(wid, spec.network)

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        table = self._table(wid)
        addresses = self.service.public_addresses()
        if addresses.get("ipv4") and not _nft("list", "table", "ip", table, check=False):
            return False
        if addresses.get("ipv6"):
            with self._lock:
                relay = self._relays.get(table)
                if relay is None or not relay.alive() or relay.spec.listen != addresses["ipv6"]:
                    return False
        if not addresses:
            return False
        if isinstance(spec, PortForwardWorkload):
            names = resource_names(self.node.identity.public_hex,
                                   WorkloadID(wid.contract, spec.network))
            if not join.joined(names):
                return False
            with self._lock:
                self._ports.setdefault((spec.protocol, spec.port), table)
            with self.service.lock:
                self.service.joined.setdefault(table, names.tag)
        return True
