"""The network workload: this node's network resource of a user network, and the
attachment of the deployment's containers to it (address, veth on its bridge, /etc/hosts).

What it keeps on disk, under `<data>/networks/<tag>/` (root only): the WireGuard key the
node made for a network that brought none, the addresses it gave containers, and the
namespaces it made (`namespaces`, written before each is made: whoever cleans up after
the node, like a local grid's teardown, removes exactly those).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from zerostack.node.hostfs import create_private, private_dir
from zerostack.node.network import resource
from zerostack.node.network.plan import (
    NetworkResource,
    ResourceNames,
    allocate_ip,
    container_link_names,
    plan,
    resource_names,
)
from zerostack.node.provisioners.base import (
    NodeContext,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.workloads import (
    ContainerNetwork,
    ContainerWorkload,
    Deployment,
    NetworkWorkload,
    Workload,
)

MAX_STATE = 1 << 16
NAMESPACES = "namespaces"


@dataclass(frozen=True)
class Attachment:
    """Where a container joins its network: the namespace (a path) it runs in, its
    address and the /etc/hosts naming its deployment's containers."""

    netns: str
    ip: str
    hosts: str


def _wg(*args: str, stdin: str) -> str:
    out = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True,
                         timeout=10, check=False)
    if out.returncode != 0:
        raise ProvisionError(f"wg {args[0]}: {out.stderr.strip()[:200]}")
    return out.stdout.strip()


def _write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = create_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class NetworkProvisioner(Provisioner):
    """One network resource per network workload; containers attach through
    `node.extra["container_network"]` (this object)."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self._lock = threading.Lock()
        node.extra["container_network"] = self

    @property
    def _node_key(self) -> str:
        return self.node.identity.public_hex

    def _names(self, wid: WorkloadID) -> ResourceNames:
        return resource_names(self._node_key, wid)

    def _dir(self, names: ResourceNames) -> Path:
        return private_dir(self.node.data_dir / "networks" / names.tag)

    def _own_key(self, names: ResourceNames) -> str:
        """The node's own WireGuard key for a network without one: made once, kept."""
        path = self._dir(names) / "key"
        if path.is_file() and not path.is_symlink():
            return path.read_text()[:64].strip()
        key = _wg("genkey", stdin="")
        _write(path, key + "\n")
        return key

    def _namespaces(self, names: ResourceNames, add: str = "", drop: str = "") -> None:
        path = self._dir(names) / NAMESPACES
        try:
            with open(path, "rb") as f:
                known = f.read(MAX_STATE).decode(errors="replace").split()
        except FileNotFoundError:
            known = []
        new = [n for n in known if n != drop] + ([add] if add and add not in known else [])
        if new != known:
            _write(path, "".join(f"{n}\n" for n in new))

    def _plan(self, wid: WorkloadID, spec: NetworkWorkload) -> NetworkResource:
        names = self._names(wid)
        own = "" if spec.wireguard_private_key else self._own_key(names)
        return plan(self._node_key, wid, spec, own)

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        if not isinstance(spec, NetworkWorkload):
            raise ProvisionError(f"{wid}: not a network workload")
        res = self._plan(wid, spec)
        with self._lock:
            self._namespaces(res.names, add=res.names.namespace)
        resource.ensure(res)
        return Provisioned(data={
            "namespace": res.names.namespace, "subnet": res.subnet,
            "gateway": res.bridge_address.split("/")[0],
            "wireguard_interface": res.names.wireguard,
            "wireguard_implementation": resource.implementation(res.names),
            "wireguard_public_key": _wg("pubkey", stdin=res.private_key),
            "wireguard_listen_port": spec.wireguard_listen_port,
            "peers": len(res.peers)})

    def update(self, wid: WorkloadID, old: Workload, new: Workload,
               deployment: Deployment) -> Provisioned:
        # ensure changes what differs only: peers kept keep their tunnels, containers stay
        return self.provision(wid, new, deployment)

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        names = self._names(wid)
        resource.remove(names)
        shutil.rmtree(self.node.data_dir / "networks" / names.tag, ignore_errors=True)

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        return resource.exists(self._names(wid))

    def traffic(self, wid: WorkloadID, spec: Workload) -> dict[str, tuple[int, int]] | None:
        """Bytes (in, out) of the resource's two ways out: its WireGuard interface (to the
        network's other nodes and its users' laptops) and its egress veth (to the
        internet), seen from the resource. The bridge inside is not counted: traffic
        between the deployment's own containers is free."""
        names = self._names(wid)
        return resource.counters(names)

    # ---- containers ------------------------------------------------------------------

    def _addresses(self, names: ResourceNames) -> dict[str, str]:
        path = self._dir(names) / "addresses.json"
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(MAX_STATE))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ProvisionError(f"{path} is unreadable: {exc}") from None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _assign(self, names: ResourceNames, net: NetworkWorkload,
                deployment: Deployment) -> dict[str, str]:
        """Every container of `deployment` on `net` with its address: the one it asks
        for, else the one given before, else the lowest free one (recorded)."""
        members = [w for w in deployment.workloads if isinstance(w, ContainerWorkload)
                   and w.network is not None and w.network.network == net.name]
        asked = {w.name: w.network.ip for w in members if w.network and w.network.ip}
        given = self._addresses(names)
        out = dict(asked)
        taken = set(asked.values())
        for w in sorted(members, key=lambda w: w.name):
            if w.name in out:
                continue
            prev = given.get(w.name)
            ip = prev if prev and prev not in taken else allocate_ip(net.subnet, taken)
            out[w.name] = ip
            taken.add(ip)
        if {k: v for k, v in out.items() if k not in asked} != given:
            _write(self._dir(names) / "addresses.json",
                   json.dumps({k: v for k, v in out.items() if k not in asked}))
        return out

    def attach(self, wid: WorkloadID, attachment: ContainerNetwork,
               deployment: Deployment) -> Attachment:
        """Join container `wid` to its network on this node (before it starts)."""
        net = deployment.workload(attachment.network)
        if not isinstance(net, NetworkWorkload):
            raise ProvisionError(f"container {wid.name}: {attachment.network!r} is not a "
                                 "network of its deployment")
        net_wid = WorkloadID(wid.contract, net.name)
        names = self._names(net_wid)
        if not resource.namespace_exists(names.namespace):
            raise ProvisionError(f"container {wid.name}: network {net.name!r} is not "
                                 "provisioned on this node")
        links = container_link_names(self._node_key, wid)
        with self._lock:
            addresses = self._assign(names, net, deployment)
            self._namespaces(names, add=links.namespace)
        res = self._plan(net_wid, net)
        ip = addresses[wid.name]
        resource.attach_container(names, res.bridge_address, links.namespace, links.outer,
                                  links.inner, ip)
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
        hosts += [f"{a}\t{n}" for n, a in sorted(addresses.items(), key=lambda x: x[1])]
        return Attachment(str(resource.NETNS_DIR / links.namespace), ip, "\n".join(hosts) + "\n")

    def detach(self, wid: WorkloadID, attachment: ContainerNetwork) -> None:
        """Remove container `wid`'s namespace and give its address back."""
        netns = container_link_names(self._node_key, wid).namespace
        resource.detach_container(netns)
        names = self._names(WorkloadID(wid.contract, attachment.network))
        folder = self.node.data_dir / "networks" / names.tag
        if not folder.is_dir():
            return
        with self._lock:
            given = self._addresses(names)
            if given.pop(wid.name, None) is not None:
                _write(folder / "addresses.json", json.dumps(given))
            self._namespaces(names, drop=netns)
