"""The user's commands against a real ledger and node: deploy, approve, status, cancel."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import REPO, ProcessGroup, zerostack_cmd
from tests.node.harness import Grid
from zerostack.crypto import load_identity


def zs(home: Path, ledger: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZEROSTACK_HOME": str(home), "ZEROSTACK_LEDGER": ledger,
           "COLUMNS": "200"}
    proc = subprocess.run([*zerostack_cmd(), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_deploy_with_a_stakeholder_approve_status_cancel(procs: ProcessGroup,
                                                         tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    proc, zport, data = grid.start_node()
    node = grid.node_id(data, proc)
    home = tmp_path / "home"
    zs(home, grid.url, "id", "new", "alice")
    zs(home, grid.url, "id", "new", "bob")
    # bob's first use of the ledger registers his twin
    assert json.loads(zs(home, grid.url, "status", "-i", "bob", "--json").stdout) == []
    bob_key = load_identity(home / "identities" / "bob.key").public_hex
    bob_twin = grid.client.twin_by_key(bob_key)["id"]

    out = zs(home, grid.url, "deploy", str(REPO / "examples" / "zdb-namespace.yaml"),
             "--node", str(node), "--stakeholder", f"{bob_twin}:1:required",
             "-i", "alice").stdout
    assert "zerostack approve" in out and f"twin(s) {bob_twin}" in out
    cid = int(out.split("contract ")[1].split()[0])

    # without a terminal to confirm on, bob sees what he would sign and nothing is signed
    shown = zs(home, grid.url, "approve", str(cid), "-i", "bob", ok=False)
    assert shown.returncode != 0 and "--yes" in shown.stderr
    assert "zdb sessions" in shown.stdout and f"signer twin {bob_twin}" in shown.stdout
    assert grid.client.contract(cid)["state"] == "created"
    summary = json.loads(zs(home, grid.url, "approve", str(cid), "-i", "bob", "--json",
                            ok=False).stdout)
    assert summary["hash"] == grid.client.contract(cid)["deployment_hash"]
    assert [w["name"] for w in summary["workloads"]] == ["sessions"]
    out = zs(home, grid.url, "approve", str(cid), "-i", "bob", "--yes").stdout
    assert f"approved contract {cid}" in out
    grid.wait_contract(cid, {"deployed"})
    out = zs(home, grid.url, "status", str(cid), "-i", "alice").stdout
    assert f"redis-cli -h 127.0.0.1 -p {zport}" in out and f"SELECT c{cid}-sessions" in out
    status = json.loads(zs(home, grid.url, "status", str(cid), "-i", "alice", "--json").stdout)
    assert status["state"] == "deployed" and "instructions" not in status

    # only the owner cancels; then the node removes the namespace
    bad = zs(home, grid.url, "cancel", str(cid), "-i", "bob", ok=False)
    assert bad.returncode != 0 and "only the owner" in bad.stderr
    out = zs(home, grid.url, "cancel", str(cid), "-i", "alice").stdout
    assert f"contract {cid} is deleted" in out

    # a second deploy without stakeholders waits for the node and prints the result
    out = zs(home, grid.url, "deploy", str(REPO / "examples" / "zdb-namespace.yaml"),
             "--node", str(node), "-i", "alice").stdout
    assert "deployed" in out and "redis-cli" in out
