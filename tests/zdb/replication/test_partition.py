"""The partition harness's short schedule (bench/zdb_partition.py runs it longer): real
servers in network namespaces, real cuts (nftables drops, links down), every acknowledged
write recorded and checked after each scenario heals."""

from __future__ import annotations

import subprocess

import pytest
from bench import zdb_partition

from tests.conftest import require_root, require_tool


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("mode", ["async", "min1", "majority"])
def test_partition_schedule(mode: str) -> None:
    require_root()
    scenarios = list(zdb_partition.SCENARIOS)
    results = zdb_partition.run_schedule([mode], scenarios, load=0.4)
    assert [r.scenario for r in results] == scenarios
    for r in results:
        # each scenario ended with every node's files byte-identical (run_schedule checks)
        assert r.acked > 0, r
        assert r.conflicting_keys == 0, f"a key was acknowledged with two values: {r}"
        if mode in zdb_partition.GUARANTEED:
            assert r.lost == 0, f"acknowledged writes lost under --min-replicas: {r}"
    if mode == "async":  # the old primary's writes while cut off are lost: documented
        assert sum(r.lost for r in results) > 0
    assert not any(results[0].token in n for n in namespaces()), "namespaces left behind"


LEASE_CI = ["primary-cut", "etcd-cut"]


def test_partition_schedule_etcd_lease() -> None:
    """--failover-etcd, async replication: nobody calls PROMOTE. The primary cut from its
    replicas and etcd (clients still reach it) goes on acknowledging writes until its
    lease could end, then stops; the primary cut from etcd alone stops likewise; each time
    a replica takes over by itself, and no two nodes ever acknowledged writes in
    overlapping periods. (With --min-replicas majority the kill -9 test checks that
    nothing acknowledged is lost.)"""
    require_root()
    require_tool("etcd")
    results = zdb_partition.run_schedule(["lease-async"], LEASE_CI, load=0.4)
    assert [r.scenario for r in results] == LEASE_CI
    for r in results:
        assert r.acked > 0, r
        assert r.conflicting_keys == 0, f"a key was acknowledged with two values: {r}"
        assert r.overlaps == 0, f"two nodes took writes at once: {r}"
        assert len(r.failover_seconds) == 1 and r.failover_seconds[0] < 8, r
    # the cut primary did take writes after the cut: the check above had something to see
    assert results[0].acked_after_cut > 0, results[0]
    assert not any(results[0].token in n for n in namespaces()), "namespaces left behind"
