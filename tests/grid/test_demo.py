"""`zerostack demo`: a real ledger and node agents take one contract through its life."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import free_port, zerostack_cmd


def test_demo_walks_a_contract_to_deployed_and_stops_cleanly(tmp_path: Path) -> None:
    zdb = free_port()
    out = subprocess.run(
        [*zerostack_cmd(), "demo", "--once", "--dir", str(tmp_path / "grid"),
         "--ledger-port", str(free_port()), "--zdb-port", str(zdb), "--nodes", "1"],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert "the contract is created: the node provisions nothing" in text
    assert "deployed (signed report from node" in text
    assert "b'hello from the grid'" in text
    # every process the grid started is gone
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "grid")], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_demo_refuses_a_directory_that_is_not_a_grid(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    out = subprocess.run([*zerostack_cmd(), "demo", "--once", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "holds no demo grid" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
