"""Provisioners: one per workload type, in ONE registry, installed in ONE declared order.

Adding a workload type = one module here and one line in `PROVISIONERS`.
"""

from __future__ import annotations

from zerostack.node.provisioners.base import (
    NodeContext,
    Pool,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
    check_workload_name,
)
from zerostack.node.provisioners.container import ContainerProvisioner
from zerostack.node.provisioners.dry import DryProvisioner
from zerostack.node.provisioners.gateway import FqdnProxyProvisioner, NameProxyProvisioner
from zerostack.node.provisioners.network import NetworkProvisioner
from zerostack.node.provisioners.port_forward import PortForwardProvisioner
from zerostack.node.provisioners.public_ip import PublicIpProvisioner
from zerostack.node.provisioners.volume import VolumeProvisioner
from zerostack.node.provisioners.zdb import ZdbProvisioner

# Storage before network before compute, then what exposes compute; removal runs reversed.
# A public address comes after its container: an IPv6 one is a link into the container's
# network namespace, which the container's attachment makes.
INSTALL_ORDER: tuple[str, ...] = (
    "volume",
    "zdb",
    "network",
    "container",
    "public_ip",
    "gateway_name_proxy",
    "gateway_fqdn_proxy",
    "port_forward",
)

PROVISIONERS: dict[str, type[Provisioner]] = {
    "volume": VolumeProvisioner,
    "zdb": ZdbProvisioner,
    "network": NetworkProvisioner,
    "container": ContainerProvisioner,
    "gateway_name_proxy": NameProxyProvisioner,
    "gateway_fqdn_proxy": FqdnProxyProvisioner,
    "port_forward": PortForwardProvisioner,
    "public_ip": PublicIpProvisioner,
}


def build_provisioners(node: NodeContext, dry: bool = False) -> dict[str, Provisioner]:
    """Instantiate the registry for a node; a dry node records every type and touches nothing."""
    if dry:
        shared = DryProvisioner(node)
        return {kind: shared for kind in INSTALL_ORDER}
    return {kind: cls(node) for kind, cls in PROVISIONERS.items()}


__all__ = [
    "INSTALL_ORDER",
    "PROVISIONERS",
    "DryProvisioner",
    "NodeContext",
    "Pool",
    "ProvisionError",
    "Provisioned",
    "Provisioner",
    "WorkloadID",
    "build_provisioners",
    "check_workload_name",
]
