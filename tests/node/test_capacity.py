"""What a node offers: pools, configured limits, the system reserve, fitting a deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from zerostack.node.capacity import node_capacity, pool_size, system_reserve
from zerostack.node.provisioners import Pool, ProvisionError
from zerostack.workloads import Resources


def test_pool_parse() -> None:
    assert Pool.parse("fast:/mnt/a:ssd") == Pool("fast", Path("/mnt/a"), "ssd")
    for bad in ("fast:/mnt/a", "fast:/mnt/a:nvme", ":/a:ssd", "a::hdd"):
        with pytest.raises(ProvisionError, match="NAME:PATH:ssd"):
            Pool.parse(bad)


def test_capacity_limits_and_reserve(tmp_path: Path) -> None:
    pools = [Pool("s", tmp_path / "s", "ssd"), Pool("h", tmp_path / "h", "hdd")]
    cap = node_capacity(pools, cpu=3, memory=4 << 30)
    assert cap.cru == 3 and cap.mru == 4 << 30
    assert cap.sru == cap.hru == pool_size(pools[0]) > 0
    reserve = system_reserve(cap)
    assert reserve.mru == (4 << 30) // 10 and reserve.hru == cap.hru // 20
    assert system_reserve(Resources(mru=1 << 30)).mru == 256 << 20  # a floor for small nodes
    free = cap - reserve
    assert Resources(hru=free.hru).fits_in(free) is None
    assert Resources(hru=free.hru + 1).fits_in(free) == f"hru: needs {free.hru + 1}, {free.hru} free"
    assert node_capacity([]).cru >= 1 and node_capacity([]).sru == 0
