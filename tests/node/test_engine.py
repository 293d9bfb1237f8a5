"""The reconcile engine: plan ordering and idempotence (property tests), and the executor."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostack.crypto import Identity
from zerostack.node.engine import (
    Actual,
    Deprovision,
    Desired,
    Executor,
    Provision,
    Update,
    missing_provisioners,
    observe,
    plan,
)
from zerostack.node.provisioners import (
    INSTALL_ORDER,
    DryProvisioner,
    NodeContext,
    Provisioned,
    ProvisionError,
    WorkloadID,
    build_provisioners,
)
from zerostack.node.state import NodeState, WorkloadRecord
from zerostack.workloads import Deployment, workload_hash

SPECS = {
    "volume": {"type": "volume", "size": 1 << 20},
    "zdb": {"type": "zdb", "size": 1 << 20},
    "network": {"type": "network", "ip_range": "10.1.0.0/16", "subnet": "10.1.1.0/24"},
    "public_ip": {"type": "public_ip"},
    "container": {"type": "container", "flist": "hub://x"},
    "gateway_name_proxy": {"type": "gateway_name_proxy", "domain_name": "a",
                           "backends": ["http://10.1.1.2"]},
}


def desired_of(items: list[tuple[int, str, str, int]]) -> dict[WorkloadID, Desired]:
    """(contract, name, type, size-variant) -> desired workloads, one deployment per contract."""
    by_contract: dict[int, list[dict[str, object]]] = {}
    for contract, name, kind, variant in items:
        spec = dict(SPECS[kind], name=name, description=f"v{variant}")
        by_contract.setdefault(contract, []).append(spec)
    out: dict[WorkloadID, Desired] = {}
    for contract, specs in by_contract.items():
        dep = Deployment.parse({"twin_id": 1, "contract_id": contract, "workloads": specs,
                                "signature_requirement": {"requests": [{"twin": 1, "key": "ab" * 32, "required": True}],
                                                          "weight_required": 1}})
        for w in dep.workloads:
            wid = WorkloadID(contract, w.name)
            out[wid] = Desired(wid, w, workload_hash(w), dep)
    return out


items = st.lists(
    st.tuples(st.integers(1, 3), st.sampled_from(["a", "b", "c", "d"]),
              st.sampled_from(sorted(SPECS)), st.integers(0, 1)),
    max_size=10, unique_by=lambda t: (t[0], t[1]),
)
actual_states = st.sampled_from(["init", "ok", "error"])


def simulate(actions: list, actual: dict[WorkloadID, Actual]) -> dict[WorkloadID, Actual]:
    """Apply a plan as a perfect executor would."""
    out = dict(actual)
    for a in actions:
        if isinstance(a, Deprovision):
            out.pop(a.wid)
        else:
            d = a.desired
            out[a.wid] = Actual(a.wid, d.type, d.spec_hash, "ok",
                                d.spec.model_dump(mode="json"))
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[WorkloadID, Desired], dict[WorkloadID, Actual]]:
    desired = desired_of(draw(items))
    previous = desired_of(draw(items))
    actual = {}
    for wid, d in previous.items():
        actual[wid] = Actual(wid, d.type, d.spec_hash, draw(actual_states),
                             d.spec.model_dump(mode="json"), draw(st.booleans()))
    return desired, actual


@given(scenarios())
@settings(max_examples=150, deadline=None)
def test_plan_then_replan_is_empty(scenario: tuple[dict, dict]) -> None:
    desired, actual = scenario
    actions = plan(desired, actual)
    after = simulate(actions, actual)
    assert plan(desired, after) == []
    # every desired workload exists afterwards; nothing undesired survives
    assert set(after) >= set(desired)
    assert set(after) - set(desired) == set()


@given(scenarios())
@settings(max_examples=100, deadline=None)
def test_plan_orders_removal_first_and_by_type(scenario: tuple[dict, dict]) -> None:
    desired, actual = scenario
    actions = plan(desired, actual)
    kinds = [a.kind for a in actions]
    n_rm = kinds.count("deprovision")
    assert all(k == "deprovision" for k in kinds[:n_rm])
    rm_ranks = [INSTALL_ORDER.index(a.type) for a in actions[:n_rm]]
    assert rm_ranks == sorted(rm_ranks, reverse=True)
    in_ranks = [INSTALL_ORDER.index(a.desired.type) for a in actions[n_rm:]]
    assert in_ranks == sorted(in_ranks)


def test_plan_cases() -> None:
    desired = desired_of([(1, "a", "zdb", 0)])
    wid = WorkloadID(1, "a")
    d = desired[wid]
    spec = d.spec.model_dump(mode="json")
    assert plan(desired, {}) == [Provision(wid, d)]
    ok = Actual(wid, "zdb", d.spec_hash, "ok", spec)
    assert plan(desired, {wid: ok}) == []
    assert plan(desired, {wid: Actual(wid, "zdb", d.spec_hash, "ok", spec, False)}) == [
        Provision(wid, d)]
    assert plan(desired, {wid: Actual(wid, "zdb", d.spec_hash, "init", spec)}) == [
        Provision(wid, d)]
    assert plan(desired, {wid: Actual(wid, "zdb", d.spec_hash, "error", spec)}) == []
    assert plan(desired, {wid: Actual(wid, "zdb", "old", "ok", spec)}) == [Update(wid, d, spec)]
    assert plan({}, {wid: ok}) == [Deprovision(wid, "zdb", spec)]


def test_executor_records_and_replans_nothing(tmp_path: Path) -> None:
    node = NodeContext(tmp_path, Identity.generate())
    provs = build_provisioners(node, dry=True)
    state = NodeState(tmp_path / "state.db")
    desired = desired_of([(1, "v", "volume", 0), (1, "c", "container", 0), (2, "z", "zdb", 0)])
    ex = Executor(provs, state)
    outcomes = ex.execute(plan(desired, observe(state.workloads(), provs)))
    assert [o.state for o in outcomes] == ["ok", "ok", "ok"]
    dry = provs["zdb"]
    assert isinstance(dry, DryProvisioner)
    assert [t for _, _, t in dry.log] == ["volume", "zdb", "container"]
    assert plan(desired, observe(state.workloads(), provs)) == []
    outcomes = ex.execute(plan({}, observe(state.workloads(), provs)))
    assert [(o.type, o.state) for o in outcomes] == [
        ("container", "deleted"), ("zdb", "deleted"), ("volume", "deleted")]
    assert state.workloads() == []
    state.close()


def test_executor_reports_missing_provisioner(tmp_path: Path) -> None:
    state = NodeState(tmp_path / "state.db")
    ex = Executor({}, state)
    desired = desired_of([(1, "a", "public_ip", 0)])
    [out] = ex.execute(plan(desired, {}))
    assert out.state == "error" and "no provisioner for public_ip" in out.message
    assert state.workloads()[0].state == "error"
    state.close()


def test_missing_provisioners_lists_each_type_once() -> None:
    desired = desired_of([(1, "a", "network", 0), (1, "b", "zdb", 0), (1, "c", "network", 1),
                          (1, "d", "public_ip", 0)])
    workloads = [d.spec for d in desired.values()]
    assert missing_provisioners(workloads, {"zdb": DryProvisioner(
        NodeContext(Path("/nonexistent"), Identity.generate()))}) == ["network", "public_ip"]


def test_removal_of_a_type_without_provisioner_drops_it(tmp_path: Path) -> None:
    # A record of a type this node cannot handle (left by an older version that accepted
    # it) must not make its contract's cancellation wait forever.
    state = NodeState(tmp_path / "state.db")
    spec = dict(SPECS["network"], name="net", description="")
    wid = WorkloadID(1, "net")
    state.put_workload(WorkloadRecord(wid, "network", spec, "h", "error", "failed", {}))
    [out] = Executor({}, state).execute(plan({}, observe(state.workloads(), {})))
    assert (out.wid, out.state) == (wid, "deleted")
    assert state.workloads() == []
    state.close()


class BrokenRemoval(DryProvisioner):
    """Provisions, but its removal fails until `fixed`."""

    fixed = False
    calls = 0

    def deprovision(self, wid: WorkloadID, spec: Any) -> None:
        self.calls += 1
        if not self.fixed:
            raise ProvisionError("device busy")
        super().deprovision(wid, spec)


def test_failed_removal_is_retried_with_backoff_and_blocks_nothing(tmp_path: Path) -> None:
    node = NodeContext(tmp_path, Identity.generate())
    state = NodeState(tmp_path / "state.db")
    broken = BrokenRemoval(node)
    now = [100.0]
    ex = Executor({"zdb": broken, "volume": DryProvisioner(node)}, state, clock=lambda: now[0])
    desired = desired_of([(1, "z", "zdb", 0), (1, "v", "volume", 0), (2, "w", "volume", 0)])
    ex.execute(plan(desired, {}))

    def remove_all() -> dict[str, str]:
        outs = ex.execute(plan({}, observe(state.workloads(), ex.provisioners)))
        return {o.wid.name: o.state for o in outs}

    # the zdb's removal fails; every other removal still happens in the same pass
    assert remove_all() == {"z": "error", "v": "deleted", "w": "deleted"}
    assert broken.calls == 1
    # not tried again before its delay (1s), then the delay doubles
    assert remove_all() == {"z": "error"} and broken.calls == 1
    for step, expected_calls in ((1.0, 2), (1.5, 2), (0.5, 3), (3.9, 3), (0.1, 4)):
        now[0] += step
        remove_all()
        assert broken.calls == expected_calls, (step, broken.calls)
    broken.fixed = True
    now[0] += 8.0
    assert remove_all() == {"z": "deleted"}
    assert state.workloads() == []
    state.close()


class SecretProvisioner(DryProvisioner):
    """Returns a secret with its result, as e.g. a generated credential would be."""

    def provision(self, wid: WorkloadID, spec: Any, deployment: Deployment) -> Provisioned:
        return Provisioned(data={"id": wid.key}, secret={"token": "t0p"})


def test_secret_results_are_sealed_to_the_owner(tmp_path: Path) -> None:
    owner = Identity.generate()
    node = NodeContext(tmp_path, Identity.generate())
    state = NodeState(tmp_path / "state.db")
    desired = desired_of([(1, "a", "zdb", 0)])
    wid = WorkloadID(1, "a")
    d = desired[wid]
    desired[wid] = Desired(wid, d.spec, d.spec_hash, d.deployment, owner.public_hex)
    [out] = Executor({"zdb": SecretProvisioner(node)}, state).execute(plan(desired, {}))
    assert out.state == "ok" and "token" not in str(out.result)
    opened = owner.open_sealed(base64.b64decode(out.result["sealed"]))
    assert orjson.loads(opened) == {"token": "t0p"}
    assert state.workloads()[0].result["sealed"] == out.result["sealed"]
    state.close()
