"""Containers: fetch and verify the flist into the node's image cache, then run it under runc.

`flist` in the workload is the hub location: `host:port[/namespace]` with `flist_hash`, or
`host:port[/namespace]/<hash>`. The image must be signed by one of the workload's
`publishers` (or the node's configured `flist_publishers`); anything else is refused and
nothing runs. Volumes of the same deployment are bind-mounted from the node's volume dir.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zerostack.flist import FlistError, Hub, HubAddress, ImageCache
from zerostack.node.provisioners.base import (
    NodeContext,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.node.runtime import (
    ContainerError,
    ContainerRuntime,
    ContainerSpec,
    ContainerStatus,
    HealthProbe,
    LogRequest,
    VolumeBind,
    answer_log_request,
    decode_request,
)
from zerostack.node.runtime.runc import is_mounted
from zerostack.node.runtime.statusfile import read_status
from zerostack.workloads import ContainerWorkload, Deployment, Workload

_HASH = re.compile(r"^[0-9a-f]{64}$")
HEALTH_WAIT = 30.0  # how long provisioning waits for a first passing health check
SETTLE_WAIT = 10.0  # ... and for a container without one to get past (re)starting


def parse_flist_ref(flist: str, flist_hash: str, default_hub: str = "") -> tuple[HubAddress, str]:
    """(hub, manifest hash) from a workload's `flist` and `flist_hash` fields."""
    ref = flist.removeprefix("zdb://").removeprefix("hub://")
    if not flist_hash:
        head, _, tail = ref.rpartition("/")
        if _HASH.match(ref):
            ref, flist_hash = default_hub, ref
        elif _HASH.match(tail):
            ref, flist_hash = head, tail
    if not flist_hash:
        raise ProvisionError(f"flist {flist!r}: give flist_hash, or flist as HUB/HASH")
    if not ref:
        raise ProvisionError(f"flist {flist!r}: no hub given and this node has no default hub")
    try:
        return HubAddress.parse(ref), flist_hash
    except FlistError as exc:
        raise ProvisionError(str(exc)) from None


def check_mountpoint(target: str) -> str:
    """A volume's place in the container: an absolute path of plain components (runc
    resolves it inside the container's root, but nothing odd is passed on at all)."""
    parts = target.split("/")[1:]
    if (not target.startswith("/") or len(target) > 1024 or "\x00" in target
            or not all(p and p not in (".", "..") for p in parts)):
        raise ProvisionError(f"mount point {target[:80]!r} must be an absolute path "
                             "without '.', '..' or empty components")
    return target


class ContainerProvisioner(Provisioner):
    """Runs container workloads; `status` gives the live init/ok/error for reports."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self.images = ImageCache(Path(node.extra.get("image_cache", node.data_dir / "images")))
        self.runtime = ContainerRuntime(node.data_dir / "containers")
        # Images, bundles (secret env) and logs are tenant data: no other host user may
        # read them, also where an older version of the node left them open.
        self.images.make_private()
        self.runtime.make_private()

    def container_id(self, wid: WorkloadID) -> str:
        # Unique per machine: several nodes may share one machine (and its cgroups).
        return f"zs-{self.node.identity.public_hex[:10]}-{wid.key}"

    def _spec(self, wid: WorkloadID, spec: ContainerWorkload, image_hash: str,
              deployment: Deployment) -> ContainerSpec:
        volumes = []
        for m in spec.mounts:
            try:
                check_mountpoint(m.mountpoint)
            except ProvisionError as exc:
                raise ProvisionError(f"container {wid.name}: {exc}") from None
            source = self.node.volume_mountpoint(WorkloadID(wid.contract, m.volume))
            if not source.is_dir() or not is_mounted(source):
                raise ProvisionError(f"container {wid.name}: volume {m.volume!r} is not "
                                     "provisioned on this node")
            volumes.append(VolumeBind(source, m.mountpoint))
        netns = hosts = ""
        if spec.network is not None:
            networks = self.node.extra.get("container_network")
            if networks is None:
                raise ProvisionError(f"container {wid.name}: this node cannot attach containers "
                                     f"to network {spec.network.network!r}")
            attached = networks.attach(wid, spec.network, deployment)
            netns, hosts = attached.netns, attached.hosts
        health = None
        if spec.healthcheck is not None:
            hc = spec.healthcheck
            port = hc.http_port or hc.tcp_port
            if port is None:
                raise ProvisionError(f"container {wid.name}: healthcheck needs tcp_port or http_port")
            health = HealthProbe(port=port, http_path=(hc.http_path or "") if hc.http_port else "",
                                 interval=float(hc.interval))
        try:
            return ContainerSpec(
                id=self.container_id(wid), image_hash=image_hash,
                entrypoint=tuple(spec.entrypoint), args=tuple(spec.args), env=dict(spec.env),
                secret_env=dict(spec.secret_env), workdir=spec.workdir, user=spec.user,
                hostname=spec.hostname or wid.name, cpu_millis=spec.cpu * 1000,
                memory=spec.memory, pids=spec.pids, disk=spec.disk, volumes=tuple(volumes),
                restart=spec.restart, health=health, netns=netns, hosts=hosts,
                # One host id range per deployment: its containers may share volumes.
                idmap_group=f"zs-{self.node.identity.public_hex[:10]}-c{wid.contract}",
            )
        except ContainerError as exc:
            raise ProvisionError(f"container {wid.name}: {exc}") from None

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        if not isinstance(spec, ContainerWorkload):
            raise ProvisionError(f"{wid}: not a container workload")
        hub, image_hash = parse_flist_ref(spec.flist, spec.flist_hash,
                                          str(self.node.extra.get("hub", "")))
        allowed = list(spec.publishers) or list(self.node.extra.get("flist_publishers", []))
        if not allowed:
            raise ProvisionError(f"container {wid.name}: no allowed flist publishers "
                                 "(set publishers in the workload)")
        try:
            with Hub(hub, self.node.extra.get("hub_password")) as h:
                image = self.images.fetch(h, image_hash, allowed)
        except FlistError as exc:
            raise ProvisionError(f"container {wid.name}: {exc}") from None
        cspec = self._spec(wid, spec, image_hash, deployment)
        try:
            status = self.runtime.start(cspec, image)
            # Give a container that crashes once on start, or is not healthy yet, a
            # moment; what it does afterwards is its live state, not a provisioning error.
            deadline = time.monotonic() + (HEALTH_WAIT if cspec.health else SETTLE_WAIT)
            while status.settling and time.monotonic() < deadline:
                time.sleep(0.1)
                status = self.runtime.status(cspec.id)
        except ContainerError as exc:
            raise ProvisionError(f"container {wid.name}: {exc}") from None
        data = {"container": cspec.id, "image": image_hash, "state": status.state,
                "message": status.message}
        if spec.network is not None:
            data["ip"] = self._address(cspec, wid.name)
        return Provisioned(data=data)

    def update(self, wid: WorkloadID, old: Workload, new: Workload,
               deployment: Deployment) -> Provisioned:
        # The runtime replaces a running container whose spec changed (volumes survive).
        return self.provision(wid, new, deployment)

    @staticmethod
    def _address(cspec: ContainerSpec, name: str) -> str:
        """The container's own address: the /etc/hosts line naming its workload."""
        for line in cspec.hosts.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[1] == name:
                return parts[0]
        return ""

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        try:
            self.runtime.delete(self.container_id(wid))
        except ContainerError as exc:
            raise ProvisionError(f"container {wid.name}: {exc}") from None
        networks = self.node.extra.get("container_network")
        if isinstance(spec, ContainerWorkload) and spec.network is not None and networks:
            networks.detach(wid, spec.network)

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        """Supervised, or finished as its restart policy wants; otherwise provision again
        (which re-verifies the image and restarts it)."""
        cid = self.container_id(wid)
        if self.runtime.supervised(cid):
            return True
        return read_status(self.runtime.dir(cid)).get("state") == "exited"

    def live_state(self, wid: WorkloadID, spec: Workload) -> tuple[str, str] | None:
        """The container's init / ok / error right now (restarts, health), for reports."""
        st = self.status(wid)
        detail = st.message + (f" (restarts: {st.restarts})" if st.restarts else "")
        return st.state, detail

    def pause(self, wid: WorkloadID, spec: Workload) -> str | None:
        """Freeze the container's processes (cgroup v2 freezer)."""
        cid = self.container_id(wid)
        try:
            self.runtime.freeze(cid, True)
        except ContainerError as exc:
            raise ProvisionError(f"container {wid.name}: {exc}") from None
        return "paused: every process frozen (cgroup freezer) while the contract is in grace"

    def resume(self, wid: WorkloadID, spec: Workload) -> None:
        try:
            self.runtime.freeze(self.container_id(wid), False)
        except ContainerError as exc:
            raise ProvisionError(f"container {wid.name}: {exc}") from None

    def prune_images(self) -> list[str]:
        """Drop cached images no container on this node uses (e.g. under disk pressure;
        never done implicitly, since a warm cache makes redeploys fast)."""
        in_use = set()
        for cid in self.runtime.ids():
            spec = self.runtime.dir(cid) / "spec.json"
            try:
                in_use.add(json.loads(spec.read_text())["image_hash"])
            except (OSError, ValueError, KeyError):
                continue
        return self.images.prune(in_use)

    def status(self, wid: WorkloadID) -> ContainerStatus:
        """Live state for the node's report: init (starting / not yet healthy), ok, error."""
        return self.runtime.status(self.container_id(wid))

    def logs(self, wid: WorkloadID, tail: int = 200) -> list[str]:
        try:
            return self.runtime.logs(self.container_id(wid), tail)
        except ContainerError as exc:
            raise ProvisionError(str(exc)) from None

    def answer_logs(self, request: LogRequest, owner_key: str) -> dict[str, Any]:
        """Answer a `zerostack logs` request: only for the contract's owner, sealed to them.

        The workload name is checked against the workload pattern before any path is built
        from it, and the signature before anything is looked up on disk."""
        wid = WorkloadID(request.contract, request.workload)
        try:
            return answer_log_request(request, owner_key, self.runtime.root,
                                      ("containers", self.container_id(wid), "logs"))
        except FileNotFoundError:
            raise ProvisionError(f"no container {wid} on this node") from None
        except ContainerError as exc:
            raise ProvisionError(str(exc)) from None
        except OSError as exc:
            raise ProvisionError(f"cannot read the logs of {wid}: {exc.strerror}") from None

    def serve_logs_query(self, token: str,
                         owner_key_for: Callable[[int], str | None]) -> tuple[int, dict[str, Any]]:
        """`GET /logs?request=<token>` on the node: (HTTP status, JSON body).

        `owner_key_for(contract_id)` gives the public key of the contract's owner (or None
        when the node has no such contract)."""
        try:
            request = decode_request(token)
            WorkloadID(request.contract, request.workload)
        except (ContainerError, ProvisionError) as exc:
            return 400, {"error": str(exc)}
        owner = owner_key_for(request.contract)
        if owner is None:
            return 404, {"error": f"no contract {request.contract} on this node"}
        try:
            return 200, self.answer_logs(request, owner)
        except ProvisionError as exc:
            status = 404 if "no container" in str(exc) else 403
            return status, {"error": str(exc)}
