"""Text from outside reaches the CLI's terminal as plain, visible characters: a node's
report, a contract's metadata, a node's location, file names and parse errors carrying
Rich markup or terminal escape sequences neither crash a command, nor lose their brackets,
nor put a raw control character on the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ProcessGroup, zerostack_cmd
from tests.flist.image import busybox_rootfs
from tests.node.harness import Grid
from zerostack.crypto import Identity
from zerostack.ledger import LedgerRejected

# A closing tag with no opening one (Rich raised MarkupError), a tag that Rich swallowed,
# a window-title OSC ended by BEL, and a clear-screen CSI.
CLOSE, BOLD, OSC, CSI = "500 [/x]", "[bold]loud[/bold]", "\x1b]0;evil\x07", "\x1b[2J"
HOSTILE = f"{CLOSE} {BOLD} {OSC} {CSI} \x9b31m"
# How the CLI shows HOSTILE: brackets kept, every control character spelt out.
SHOWN = f"{CLOSE} {BOLD} \\x1b]0;evil\\x07 \\x1b[2J \\x9b31m"


def _env(home: Path, ledger: str = "") -> dict[str, str]:
    return {**os.environ, "ZEROSTACK_HOME": str(home), "ZEROSTACK_LEDGER": ledger,
            "COLUMNS": "400"}


def zs(home: Path, ledger: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*zerostack_cmd(), *args], env=_env(home, ledger),
                          capture_output=True, text=True, timeout=120)


def assert_safe(proc: subprocess.CompletedProcess[str], *shown: str) -> str:
    """No crash, no raw control character; every text in `shown` appears as is."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "MarkupError" not in out, out
    raw = [c for c in out if (ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f]
    assert not raw, f"raw control characters {raw!r} in {out!r}"
    for text in shown:
        assert text in out, f"{text!r} not in {out!r}"
    return out


def test_hostile_report_metadata_and_location(procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    # A node whose operator writes hostile text into its reports: they are public on the
    # ledger, so every user's CLI shows them. (Its location cannot carry such text: the
    # ledger refuses control characters and markup in a city name.)
    node_key = Identity.generate()
    grid.client.register_twin(node_key)
    capacity = {"cru": 4, "mru": 8 << 30, "sru": 64 << 30, "hru": 64 << 30}
    with pytest.raises(LedgerRejected, match="city"):
        grid.client.register_node(node_key, grid.farm, capacity, "BE",
                                  city=f"city {HOSTILE}"[:64])
    node = grid.client.register_node(node_key, grid.farm, capacity, "BE", city="Gent")
    home = tmp_path / "home"
    assert zs(home, grid.url, "id", "new", "alice").returncode == 0
    spec = tmp_path / "dep.yaml"
    spec.write_text(yaml.safe_dump({
        "metadata": f"meta {HOSTILE}",
        "workloads": [{"type": "zdb", "name": "sessions", "size": "64M", "mode": "user",
                       "password": "pw", "public": False}]}))

    deploy = subprocess.Popen([*zerostack_cmd(), "deploy", str(spec), "--node", str(node),
                               "-i", "alice", "--wait", "60"], env=_env(home, grid.url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (found := grid.client.contracts(node=node)):
            assert time.monotonic() < deadline and deploy.poll() is None, deploy.communicate()
            time.sleep(0.1)
        cid = int(found[0]["id"])
        grid.client.report(node_key, cid, 1, [
            {"name": "web", "type": "container", "state": "error",
             "message": f"health check: {HOSTILE}",
             "data": {"host": HOSTILE, "port": 1, "namespace": BOLD}},
        ], error=f"node says {HOSTILE}")
        stdout, stderr = deploy.communicate(timeout=60)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    proc = subprocess.CompletedProcess(deploy.args, deploy.returncode, stdout, stderr)
    assert proc.returncode == 1  # the contract is in error: deploy says so by its exit code
    assert_safe(proc, f"node says {SHOWN}", f"health check: {SHOWN}", f"host={SHOWN}")

    one = zs(home, grid.url, "status", str(cid), "-i", "alice")
    assert one.returncode == 0
    assert_safe(one, f"node says {SHOWN}", f"health check: {SHOWN}", f"namespace={BOLD}")
    every = zs(home, grid.url, "status", "-i", "alice")
    assert every.returncode == 0
    assert_safe(every, "error")
    nodes = zs(home, grid.url, "ledger", "nodes")
    assert nodes.returncode == 0
    assert_safe(nodes, "Gent")
    shown = zs(home, grid.url, "ledger", "contract", str(cid))
    assert shown.returncode == 0
    assert_safe(shown)
    assert json.loads(shown.stdout)["report"]["error"] == f"node says {HOSTILE}"
    events = zs(home, grid.url, "ledger", "events")
    assert events.returncode == 0
    assert_safe(events, "contract.report")
    as_json = zs(home, grid.url, "ledger", "events", "--json")
    assert as_json.returncode == 0
    assert_safe(as_json)


def test_hostile_yaml_and_file_names(procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    home = tmp_path / "home"
    assert zs(home, grid.url, "id", "new", "alice").returncode == 0
    # A path with markup and escapes (`[/x]` across a directory and its file), holding
    # YAML that does not parse.
    (tmp_path / "dep 500 [").mkdir()
    bad = tmp_path / "dep 500 [" / f"x] [bold]loud {OSC}.yaml"
    bad.write_text(f"workloads: [{CLOSE}\n  - {BOLD}: {{\n")
    proc = zs(home, grid.url, "deploy", str(bad), "-i", "alice")
    assert proc.returncode == 1
    out = assert_safe(proc, "dep 500 [/x] [bold]loud \\x1b]0;evil\\x07.yaml is not valid YAML")
    assert len(proc.stderr.strip().splitlines()) > 0 and proc.stdout == ""
    assert "error:" in out

    missing = zs(home, grid.url, "deploy", str(tmp_path / f"gone {HOSTILE}.yaml"), "-i",
                 "alice")
    assert missing.returncode == 1
    assert_safe(missing, f"gone {SHOWN}.yaml")

    # File names inside an image: shown by `flist build` errors and `flist inspect --files`.
    root = busybox_rootfs(tmp_path / "root")
    (root / "f 500 [").mkdir()
    (root / "f 500 [" / f"x] [bold]loud {CSI}").write_bytes(b"x")
    zs(home, "", "id", "new", "pub")
    built = zs(home, "", "flist", "build", str(root), "-o", str(tmp_path / "x.flist"),
               "--identity", "pub", "--name", f"img {CLOSE}", "--env", f"A={OSC}")
    assert built.returncode == 0, built.stderr
    assert_safe(built)
    inspect = zs(home, "", "flist", "inspect", str(tmp_path / "x.flist"), "--files")
    assert inspect.returncode == 0, inspect.stderr
    assert_safe(inspect, "f 500 [/x] [bold]loud \\x1b[2J", f"img {CLOSE}", "A=\\x1b]0;evil\\x07")
    nowhere = zs(home, "", "flist", "build", str(tmp_path / f"no {HOSTILE}"), "-o",
                 str(tmp_path / "y.flist"), "--identity", "pub")
    assert nowhere.returncode != 0
    assert_safe(nowhere, f"no {SHOWN}")
