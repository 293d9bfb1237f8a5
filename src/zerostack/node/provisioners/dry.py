"""A provisioner that only records what it was asked to do: for simulations of many nodes."""

from __future__ import annotations

from zerostack.node.provisioners.base import NodeContext, Provisioned, Provisioner, WorkloadID
from zerostack.workloads import Deployment, Workload


class DryProvisioner(Provisioner):
    """Touches nothing on the machine; `log` keeps (action, workload, type) in call order."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self.log: list[tuple[str, str, str]] = []

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        self.log.append(("provision", str(wid), spec.type))
        return Provisioned(data={"dry": True, "id": wid.key})

    def update(
        self, wid: WorkloadID, old: Workload, new: Workload, deployment: Deployment
    ) -> Provisioned:
        self.log.append(("update", str(wid), new.type))
        return Provisioned(data={"dry": True, "id": wid.key})

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        self.log.append(("deprovision", str(wid), spec.type))
