"""What this node can offer: cores and memory from the machine (or configured limits),
storage per pool, minus a reserve kept for the system itself."""

from __future__ import annotations

import os
from collections.abc import Sequence

from zerostack.node.provisioners import Pool
from zerostack.workloads import Resources


def machine_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def pool_size(pool: Pool) -> int:
    pool.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.statvfs(pool.path)
    return st.f_blocks * st.f_frsize


def node_capacity(pools: Sequence[Pool], cpu: int | None = None,
                  memory: int | None = None) -> Resources:
    """Total resource units: configured limits win over what the machine has."""
    sru = sum(pool_size(p) for p in pools if p.kind == "ssd")
    hru = sum(pool_size(p) for p in pools if p.kind == "hdd")
    return Resources(cru=cpu or os.cpu_count() or 1, mru=memory or machine_memory(),
                     sru=sru, hru=hru)


def system_reserve(total: Resources) -> Resources:
    """Kept back for the agent, its Zero-DB and the OS: never handed to workloads."""
    return Resources(
        cru=0,
        mru=max(256 << 20, total.mru // 10),
        sru=total.sru // 20,
        hru=total.hru // 20,
    )
