"""A dry node (records actions, touches nothing) against a real ledger: the contract loop,
heartbeats and the read-only status endpoint."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import ProcessGroup, free_port, wait_for_port
from tests.node.harness import Grid


def test_dry_node_follows_contract_lifecycle(procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    status_port = free_port()
    proc, _, data = grid.start_node("dry", "--dry", "--status-port", str(status_port))
    node = grid.node_id(data, proc)
    user, twin = grid.user()
    cid, _ = grid.deploy(user, twin, [{"type": "zdb", "name": "db", "size": "1M"},
                                      {"type": "volume", "name": "vol", "size": "16M"}], node)
    c = grid.wait_contract(cid, {"deployed", "error"})
    assert c["state"] == "deployed", grid.log_tail("dry")
    assert [(w["name"], w["state"]) for w in c["report"]["workloads"]] == [
        ("db", "ok"), ("vol", "ok")]

    wait_for_port(status_port)
    snap = httpx.get(f"http://127.0.0.1:{status_port}/").json()
    assert snap["node"] == node
    assert {(w["name"], w["state"]) for w in snap["workloads"]} == {("db", "ok"), ("vol", "ok")}
    # read-only: nothing but GET is served
    assert httpx.post(f"http://127.0.0.1:{status_port}/", json={}).status_code == 405
    assert httpx.delete(f"http://127.0.0.1:{status_port}/").status_code == 405

    grid.client.cancel(user, cid)
    c = grid.wait_contract(cid, {"deleted"})
    assert c["report"]["workloads"][0]["state"] == "deleted"

    deadline = time.monotonic() + 10
    while (grid.client.node(node) or {}).get("last_heartbeat", 0) == 0:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.1)

    # restarted with other settings: the same node, updated on the ledger
    proc.kill()
    proc.wait()
    proc2, _, _ = grid.start_node("dry", "--dry", "--cpu", "1", "--country", "NL")
    deadline = time.monotonic() + 20
    while (grid.client.node(node) or {}).get("capacity", {}).get("cru") != 1:
        assert proc2.poll() is None and time.monotonic() < deadline, grid.log_tail("dry")
        time.sleep(0.1)
    info = grid.client.node(node)
    assert info["location"]["country"] == "NL" and len(grid.client.nodes()) == 1
