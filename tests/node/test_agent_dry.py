"""A dry node (records actions, touches nothing) against a real ledger: the contract loop."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ProcessGroup
from tests.node.harness import Grid


def test_dry_node_follows_contract_lifecycle(procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    proc, _, data = grid.start_node("dry", "--dry")
    node = grid.node_id(data, proc)
    user, twin = grid.user()
    cid, _ = grid.deploy(user, twin, [{"type": "zdb", "name": "db", "size": "1M"},
                                      {"type": "volume", "name": "vol", "size": "16M"}], node)
    c = grid.wait_contract(cid, {"deployed", "error"})
    assert c["state"] == "deployed", grid.log_tail("dry")
    assert [(w["name"], w["state"]) for w in c["report"]["workloads"]] == [
        ("db", "ok"), ("vol", "ok")]
    grid.client.cancel(user, cid)
    c = grid.wait_contract(cid, {"deleted"})
    assert c["report"]["workloads"][0]["state"] == "deleted"
