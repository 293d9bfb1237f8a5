"""The generic reconcile engine: a pure `plan(desired, actual)` and an executor that runs it.

`plan` only decides (as data); `Executor` does, through one provisioner per workload
type, recording each step in the node's state before and after it happens.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from zerostack.crypto import canonical_json, seal_to
from zerostack.node.provisioners import INSTALL_ORDER, Provisioner, ProvisionError, WorkloadID
from zerostack.node.state import NodeState, WorkloadRecord
from zerostack.workloads import Deployment, Workload

log = logging.getLogger("zerostack.node.engine")
_WORKLOAD = TypeAdapter(Workload)
# A removal that failed is tried again after this many seconds, doubling up to the cap:
# a broken removal must not cost every pass its full timeout, nor be forgotten.
REMOVAL_RETRY_FIRST = 1.0
REMOVAL_RETRY_MAX = 300.0


@dataclass(frozen=True)
class Desired:
    """A workload the ledger says this node must run."""

    wid: WorkloadID
    spec: Workload
    spec_hash: str
    deployment: Deployment
    owner_key: str = ""

    @property
    def type(self) -> str:
        return self.spec.type


@dataclass(frozen=True)
class Actual:
    """A workload as the node has it. `present` is False when it vanished behind our back."""

    wid: WorkloadID
    type: str
    spec_hash: str
    state: str  # init | ok | error
    spec: dict[str, Any] = field(default_factory=dict, compare=False)
    present: bool = True


@dataclass(frozen=True)
class Provision:
    wid: WorkloadID
    desired: Desired
    kind: str = "provision"


@dataclass(frozen=True)
class Update:
    wid: WorkloadID
    desired: Desired
    old_spec: dict[str, Any]
    kind: str = "update"


@dataclass(frozen=True)
class Deprovision:
    wid: WorkloadID
    type: str
    spec: dict[str, Any]
    kind: str = "deprovision"


Action = Provision | Update | Deprovision


def _rank(order: Sequence[str], kind: str) -> int:
    return order.index(kind) if kind in order else len(order)


def plan(
    desired: Mapping[WorkloadID, Desired],
    actual: Mapping[WorkloadID, Actual],
    order: Sequence[str] = INSTALL_ORDER,
) -> list[Action]:
    """What to do so that `actual` becomes `desired`; empty when they already agree.

    Removals come first (freeing capacity) in reverse install order, then installs and
    updates in install order. A workload that failed with the same spec is left alone
    (its error is reported; retrying a deterministic failure forever helps nobody).
    """
    removals: list[Deprovision] = []
    installs: list[Provision | Update] = []
    for wid, a in actual.items():
        d = desired.get(wid)
        if d is None or d.type != a.type:
            removals.append(Deprovision(wid, a.type, a.spec))
    for wid, d in desired.items():
        cur = actual.get(wid)
        if cur is None or cur.type != d.type:
            installs.append(Provision(wid, d))
        elif cur.spec_hash == d.spec_hash:
            if cur.state == "init" or (cur.state == "ok" and not cur.present):
                installs.append(Provision(wid, d))  # crashed mid-way, or vanished: converge
        elif cur.state == "ok":
            installs.append(Update(wid, d, cur.spec))
        else:
            installs.append(Provision(wid, d))  # a new spec after a failed or partial one
    removals.sort(key=lambda x: (-_rank(order, x.type), x.wid))
    installs.sort(key=lambda x: (_rank(order, x.desired.type), x.wid))
    return [*removals, *installs]


def missing_provisioners(workloads: Iterable[Workload],
                         provisioners: Mapping[str, Provisioner]) -> list[str]:
    """The workload types among `workloads` that this node has no provisioner for, sorted."""
    return sorted({w.type for w in workloads} - set(provisioners))


@dataclass(frozen=True)
class Outcome:
    """What happened to one workload: state `ok`, `error` or `deleted`, with the result."""

    wid: WorkloadID
    type: str
    state: str
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def observe(records: Sequence[WorkloadRecord],
            provisioners: Mapping[str, Provisioner]) -> dict[WorkloadID, Actual]:
    """Actual state: the local record, checked against the machine for healthy workloads."""
    out: dict[WorkloadID, Actual] = {}
    for r in records:
        present = True
        prov = provisioners.get(r.type)
        if r.state == "ok" and prov is not None:
            try:
                present = prov.exists(r.wid, _WORKLOAD.validate_python(r.spec))
            except (ProvisionError, ValidationError) as exc:
                log.warning("event=observe_failed workload=%s error=%s", r.wid, exc)
        out[r.wid] = Actual(r.wid, r.type, r.spec_hash, r.state, r.spec, present)
    return out


class Executor:
    """Runs actions through the provisioners, recording every step in the node state."""

    def __init__(self, provisioners: Mapping[str, Provisioner], state: NodeState,
                 on_step: Callable[[Outcome], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provisioners = provisioners
        self.state = state
        self.on_step = on_step
        self.clock = clock
        # Failed removals: workload -> (seconds to wait after the next failure, due at, why).
        self._retry: dict[WorkloadID, tuple[float, float, str]] = {}

    def _provisioner(self, kind: str) -> Provisioner:
        prov = self.provisioners.get(kind)
        if prov is None:
            raise ProvisionError(f"this node has no provisioner for {kind} workloads")
        return prov

    def execute(self, actions: Sequence[Action]) -> list[Outcome]:
        outcomes = []
        for action in actions:
            outcome = self._one(action)
            log.info("event=%s workload=%s type=%s state=%s%s", action.kind, outcome.wid,
                     outcome.type, outcome.state,
                     f" error={outcome.message!r}" if outcome.message else "")
            outcomes.append(outcome)
            if self.on_step is not None:
                self.on_step(outcome)
        return outcomes

    def _remove(self, action: Deprovision) -> Outcome:
        wid = action.wid
        if action.type not in self.provisioners:
            # Nothing of a type without a provisioner was ever made on this node (its
            # provisioning fails before touching anything), so there is nothing to undo;
            # keeping the record would make the contract's cancellation wait forever.
            log.warning("event=anomaly workload=%s type=%s what=%r", wid, action.type,
                        "no provisioner for this type: dropped from local state")
            self.state.delete_workload(wid)
            self._retry.pop(wid, None)
            return Outcome(wid, action.type, "deleted")
        wait, due, why = self._retry.get(wid, (REMOVAL_RETRY_FIRST, 0.0, ""))
        now = self.clock()
        if now < due:
            return Outcome(wid, action.type, "error",
                           f"{why} (next try in {due - now:.0f}s)")
        try:
            spec = _WORKLOAD.validate_python(action.spec)
            self.provisioners[action.type].deprovision(wid, spec)
        except (ProvisionError, ValidationError, OSError) as exc:
            why = f"removal failed: {exc}"
            self._retry[wid] = (min(wait * 2, REMOVAL_RETRY_MAX), now + wait, why)
            return Outcome(wid, action.type, "error", why)
        self._retry.pop(wid, None)
        self.state.delete_workload(wid)
        return Outcome(wid, action.type, "deleted")

    def _one(self, action: Action) -> Outcome:
        if isinstance(action, Deprovision):
            return self._remove(action)
        d = action.desired
        spec_json = d.spec.model_dump(mode="json")
        # Recorded before acting: after a crash, `init` tells the next plan to converge.
        self.state.put_workload(WorkloadRecord(
            d.wid, d.type, spec_json, d.spec_hash, "init", "", {}))
        try:
            prov = self._provisioner(d.type)
            if isinstance(action, Update):
                old = _WORKLOAD.validate_python(action.old_spec)
                done = prov.update(d.wid, old, d.spec, d.deployment)
            else:
                done = prov.provision(d.wid, d.spec, d.deployment)
        except (ProvisionError, ValidationError, OSError) as exc:
            self.state.put_workload(WorkloadRecord(
                d.wid, d.type, spec_json, d.spec_hash, "error", str(exc), {}))
            return Outcome(d.wid, d.type, "error", str(exc))
        result = dict(done.data)
        if done.secret:
            if not d.owner_key:
                raise ProvisionError(f"{d.wid}: a secret result needs the owner's key")
            box = seal_to(d.owner_key, canonical_json(done.secret))
            result["sealed"] = base64.b64encode(box).decode()
        self.state.put_workload(WorkloadRecord(
            d.wid, d.type, spec_json, d.spec_hash, "ok", "", result))
        return Outcome(d.wid, d.type, "ok", "", result)
