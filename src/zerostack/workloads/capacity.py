"""Resource units a workload consumes: cores (cru), memory (mru), SSD (sru), HDD (hru) bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from zerostack.workloads.types import (
    ContainerWorkload,
    GatewayNameProxyWorkload,
    PublicIPWorkload,
    VolumeWorkload,
    Workload,
    ZdbWorkload,
)


@dataclass(frozen=True)
class Resources:
    cru: int = 0
    mru: int = 0
    sru: int = 0
    hru: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cru + other.cru, self.mru + other.mru, self.sru + other.sru, self.hru + other.hru
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cru - other.cru, self.mru - other.mru, self.sru - other.sru, self.hru - other.hru
        )

    def fits_in(self, free: Resources) -> str | None:
        """None when every unit fits in `free`, else which one does not."""
        for unit in ("cru", "mru", "sru", "hru"):
            need, have = getattr(self, unit), getattr(free, unit)
            if need > have:
                return f"{unit}: needs {need}, {max(have, 0)} free"
        return None

    def to_dict(self) -> dict[str, int]:
        return {"cru": self.cru, "mru": self.mru, "sru": self.sru, "hru": self.hru}


def workload_resources(w: Workload) -> Resources:
    if isinstance(w, ContainerWorkload):
        return Resources(cru=w.cpu, mru=w.memory, sru=w.disk)
    if isinstance(w, VolumeWorkload):
        return Resources(sru=w.size)
    if isinstance(w, ZdbWorkload):
        return Resources(sru=w.size) if w.disk_type == "ssd" else Resources(hru=w.size)
    return Resources()


def priced_units(workloads: Iterable[Workload]) -> dict[str, int]:
    """What a deployment reserves that is priced by the unit, beside cru/mru/sru/hru:
    public IPv4 addresses and gateway names."""
    ws = list(workloads)
    return {
        "ipv4": sum(1 for w in ws if isinstance(w, PublicIPWorkload) and w.v4),
        "names": sum(1 for w in ws if isinstance(w, GatewayNameProxyWorkload)),
    }


def total_resources(workloads: Iterable[Workload]) -> Resources:
    total = Resources()
    for w in workloads:
        total = total + workload_resources(w)
    return total


def reserved_units(workloads: Iterable[Workload]) -> dict[str, int]:
    """Everything a deployment reserves, as the ledger prices it: cru, mru, sru, hru
    (bytes for memory and disks), ipv4 and names."""
    ws = list(workloads)
    return {**total_resources(ws).to_dict(), **priced_units(ws)}
