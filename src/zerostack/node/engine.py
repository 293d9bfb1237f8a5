"""The generic reconcile engine: a pure `plan(desired, actual)` and an executor that runs it.

`plan` only decides (as data); `Executor` does, through one provisioner per workload
type, recording each step in the node's state before and after it happens.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from zerostack.crypto import canonical_json, seal_to
from zerostack.node.provisioners import INSTALL_ORDER, Provisioner, ProvisionError, WorkloadID
from zerostack.node.state import NodeState, WorkloadRecord
from zerostack.workloads import Deployment, Workload

log = logging.getLogger("zerostack.node.engine")
_WORKLOAD = TypeAdapter(Workload)


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
                 on_step: Callable[[Outcome], None] | None = None) -> None:
        self.provisioners = provisioners
        self.state = state
        self.on_step = on_step

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

    def _one(self, action: Action) -> Outcome:
        if isinstance(action, Deprovision):
            try:
                spec = _WORKLOAD.validate_python(action.spec)
                self._provisioner(action.type).deprovision(action.wid, spec)
            except (ProvisionError, ValidationError, OSError) as exc:
                return Outcome(action.wid, action.type, "error", f"removal failed: {exc}")
            self.state.delete_workload(action.wid)
            return Outcome(action.wid, action.type, "deleted")
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
