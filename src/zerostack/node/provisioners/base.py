"""The interface every workload provisioner implements, and what it is given to work with.

A provisioner turns one workload spec into something real on this node and back. It must
be idempotent: the engine calls `provision` again after a crash, and whenever `exists`
says the thing went missing, and expects convergence, never a duplicate.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from zerostack.crypto import Identity
from zerostack.workloads import Deployment, Workload
from zerostack.workloads.types import NAME_PATTERN

MAX_CONTRACT_ID = (1 << 63) - 1
_NAME = re.compile(NAME_PATTERN)


class ProvisionError(Exception):
    """A workload could not be provisioned, updated or removed; the message goes in the report."""


def check_workload_name(name: object) -> str:
    """`name` if it is a workload name (the deployment's pattern: lowercase letters, digits,
    `-` and `_`, 1 to 63 characters); ProvisionError otherwise. Node file, directory,
    container and namespace names are built from it, so nothing else may pass."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name[:64] if isinstance(name, str) else name)
        raise ProvisionError(f"invalid workload name {shown}: a workload name is 1 to 63 of "
                             "a-z, 0-9, '-' and '_', starting with a letter or digit")
    return name


def check_contract_id(contract: object) -> int:
    """`contract` if it is a contract id (an integer from 0 to 2^63-1); ProvisionError
    otherwise."""
    if type(contract) is not int or not 0 <= contract <= MAX_CONTRACT_ID:
        raise ProvisionError(f"invalid contract id {str(contract)[:30]!r}")
    return contract


@dataclass(frozen=True, order=True)
class WorkloadID:
    """A workload on this node: the contract it belongs to and its name in the deployment.

    Both are checked on construction: every path and name a provisioner builds comes
    from `key`."""

    contract: int
    name: str

    def __post_init__(self) -> None:
        check_contract_id(self.contract)
        check_workload_name(self.name)

    @property
    def key(self) -> str:
        """Stable, filesystem- and namespace-safe name: what a provisioner names things by."""
        return f"c{self.contract}-{self.name}"

    def __str__(self) -> str:
        return f"{self.contract}/{self.name}"


@dataclass(frozen=True)
class Pool:
    """A storage pool: a directory on one disk of a kind."""

    name: str
    path: Path
    kind: Literal["ssd", "hdd"]

    @classmethod
    def parse(cls, text: str) -> Pool:
        """`NAME:PATH:ssd|hdd`, as given on the command line."""
        parts = text.split(":")
        if len(parts) != 3 or parts[2] not in ("ssd", "hdd") or not parts[0] or not parts[1]:
            raise ProvisionError(f"pool {text!r} must be NAME:PATH:ssd or NAME:PATH:hdd")
        return cls(parts[0], Path(parts[1]), parts[2])  # type: ignore[arg-type]


@dataclass
class NodeContext:
    """What provisioners may use: the node's dirs, identity, pools and its Zero-DB server."""

    data_dir: Path
    identity: Identity
    pools: list[Pool] = field(default_factory=list)
    public_host: str = "127.0.0.1"
    zdb_host: str = "127.0.0.1"
    zdb_port: int = 9900
    zdb_admin: str = ""
    # Free-form settings for provisioners added later (runtime dirs, hub address...).
    extra: dict[str, Any] = field(default_factory=dict)

    def volume_mountpoint(self, wid: WorkloadID) -> Path:
        """Where a volume workload is mounted; a container provisioner bind-mounts from here."""
        return self.data_dir / "volumes" / wid.key


@dataclass(frozen=True)
class Provisioned:
    """A provisioning result: `data` is public in the report, `secret` is sealed to the owner."""

    data: dict[str, Any] = field(default_factory=dict)
    secret: dict[str, Any] = field(default_factory=dict)


class Provisioner(ABC):
    """One per workload type, built once per node with the node's context."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node

    @abstractmethod
    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        """Make `spec` real, converging from whatever partial state a crash left behind."""

    @abstractmethod
    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        """Remove everything `provision` made; succeed when it is already gone."""

    def update(
        self, wid: WorkloadID, old: Workload, new: Workload, deployment: Deployment
    ) -> Provisioned:
        """Move a running workload from `old` to `new`. Default: refuse."""
        raise ProvisionError(f"{new.type} workloads cannot be updated in place")

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        """Whether the workload is still really there (self-healing asks this)."""
        return True

    def live_state(self, wid: WorkloadID, spec: Workload) -> tuple[str, str] | None:
        """(state, message) of a provisioned workload right now, for the report
        (a container that crashed is `error` although it was provisioned `ok`).
        None: nothing changes after provisioning, report the recorded state."""
        return None

    def pause(self, wid: WorkloadID, spec: Workload) -> str | None:
        """Stop serving the workload without losing anything: its contract is in grace
        (its owner has not paid). Returns what the report says about it (`paused: …`),
        or None when this type has nothing to pause (a volume: the container using it is
        frozen; a network: it carries no one's service by itself). Idempotent.

        Gateway names implement this by answering 503 for the name until `resume`."""
        return None

    def resume(self, wid: WorkloadID, spec: Workload) -> None:  # noqa: B027 - optional hook
        """Undo `pause`; a no-op when the workload is not paused. Idempotent."""

    def traffic(self, wid: WorkloadID, spec: Workload) -> dict[str, tuple[int, int]] | None:
        """Byte counters (in, out) of the interfaces through which the workload exchanges
        traffic with the outside, by a stable interface key, as the kernel counts them
        (they may restart from 0); None when the type carries no billed traffic. The
        network resource and public IPs implement it; the node bills the increase."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most provisioners hold nothing
        """Release connections at agent shutdown."""
