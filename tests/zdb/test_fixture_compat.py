"""File compatibility with 0-db v2: serve the reference's data set, and round-trip our own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ProcessGroup
from tests.zdb.conftest import ZdbStarter, start_zdb


def run_tool(tool: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_serves_the_reference_data_set(shared_dir: Path, tmp_path: Path,
                                       zdb_start: ZdbStarter) -> None:
    fixture = shared_dir / "fixtures" / "zdb-reference-2.0.7"
    work = tmp_path / "ref"
    shutil.copytree(fixture, work)
    for path in work.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    work.chmod(0o755)
    server = zdb_start("--datasize", "1M", data=work / "data", index=work / "index")
    result = run_tool(shared_dir / "tools" / "zdb_fixture.py", "check", "127.0.0.1", server.port,
                      work / "expected.json")
    assert result.returncode == 0, result.stdout + result.stderr
    held = result.stdout.strip().splitlines()[-1]
    total = held.split("/")[1].split()[0]
    assert held == f"{total}/{total} checks hold", held


def test_written_data_set_survives_a_restart(shared_dir: Path, tmp_path: Path,
                                             procs: ProcessGroup) -> None:
    tool = shared_dir / "tools" / "zdb_fixture.py"
    root = tmp_path / "own"
    root.mkdir()
    server = start_zdb(procs, root, "--datasize", "1M")
    expected = tmp_path / "expected.json"
    result = run_tool(tool, "write", "127.0.0.1", server.port, 42, expected)
    assert result.returncode == 0, result.stdout + result.stderr
    server.proc.terminate()
    assert server.proc.wait(timeout=15) == 0
    assert len(list((server.data / "default").glob("d*"))) > 1  # files rotated at 1 MiB
    again = start_zdb(procs, root, "--datasize", "1M", data=server.data, index=server.index)
    result = run_tool(tool, "check", "127.0.0.1", again.port, expected)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks hold" in result.stdout
