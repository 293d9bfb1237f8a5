"""What the runtime needs to run one container: plain values, already verified upstream."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RestartPolicy = Literal["always", "on-failure", "never"]
_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


class ContainerError(Exception):
    """A container that cannot be configured, started, inspected or removed."""


@dataclass(frozen=True)
class VolumeBind:
    """A host directory bind-mounted into the container."""

    source: Path
    target: str
    readonly: bool = False


@dataclass(frozen=True)
class HealthProbe:
    """A TCP connect (no `http_path`) or an HTTP GET, run inside the container's netns."""

    port: int
    http_path: str = ""
    interval: float = 5.0
    timeout: float = 1.0
    # Failures tolerated after start before the container counts as unhealthy.
    grace: float = 30.0


@dataclass(frozen=True)
class ContainerSpec:
    """One container. `id` names it in runc and in cgroups, so it must be unique per machine."""

    id: str
    image_hash: str
    entrypoint: tuple[str, ...] = ()  # overrides the image's entrypoint (and drops its cmd)
    args: tuple[str, ...] = ()  # overrides the image's cmd
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    workdir: str = ""
    user: str = ""
    hostname: str = ""
    cpu_millis: int = 1000
    memory: int = 256 << 20
    pids: int = 1024
    disk: int = 1 << 30  # size of the writable layer (bytes)
    volumes: tuple[VolumeBind, ...] = ()
    restart: RestartPolicy = "on-failure"
    health: HealthProbe | None = None
    netns: str = ""  # join this network namespace (a path); default: own netns, loopback only
    hosts: str = ""  # the container's /etc/hosts (names of its deployment); "": the image's
    stop_timeout: float = 10.0  # seconds between TERM and KILL on stop
    log_max_bytes: int = 4 << 20
    log_keep: int = 3
    # Containers of one group share a host id range (and so can share volumes); "" = its own.
    idmap_group: str = ""

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ContainerError(f"container id {self.id!r} must match {_ID.pattern}")
        if self.memory < 4 << 20:
            raise ContainerError("a container needs at least 4 MiB of memory")
        if self.disk < 16 << 20:
            raise ContainerError("a container's writable layer needs at least 16 MiB (disk)")
        if self.idmap_group and not _ID.match(self.idmap_group):
            raise ContainerError(f"id map group {self.idmap_group!r} must match {_ID.pattern}")
        if self.cpu_millis < 10 or self.pids < 1:
            raise ContainerError("cpu must be at least 10 millicores and pids at least 1")
        for v in self.volumes:
            if not v.target.startswith("/") or ".." in v.target.split("/"):
                raise ContainerError(f"volume target {v.target!r} must be an absolute path")
        if self.restart not in ("always", "on-failure", "never"):
            raise ContainerError(f"restart policy {self.restart!r} is not always|on-failure|never")

    def public_dict(self) -> dict[str, Any]:
        """The spec without secrets, as the runtime records it next to the container."""
        d = asdict(self)
        d["secret_env"] = sorted(self.secret_env)
        d["volumes"] = [{"source": str(v.source), "target": v.target, "readonly": v.readonly}
                        for v in self.volumes]
        return d
