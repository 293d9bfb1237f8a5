"""`zerostack up --ledger-replicas 3`: a local grid whose ledger is an etcd cluster and
three replicas; nodes and the CLI use every replica's URL; `down` leaves no process."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO, free_port, require_root, require_tool
from tests.grid.test_up import grid_processes, run


def test_up_with_three_ledger_replicas_deploys_and_down_stops_them(tmp_path: Path) -> None:
    require_root()
    require_tool("etcd")
    folder = tmp_path / "grid"
    pids: list[int] = []
    try:
        base = free_port()
        while any(_taken(base + i) for i in range(1, 3)):
            base = free_port()
        rec = json.loads(run(None, None, "up", "--dir", str(folder), "--nodes", "1",
                             "--ledger-replicas", "3", "--ledger-port", str(base),
                             "--zdb-port", str(free_port()), "--hub-port", str(free_port()),
                             "--json").stdout)
        urls = rec["url"].split(",")
        assert urls == [f"http://127.0.0.1:{base + i}" for i in range(3)]
        assert rec["netns"] is False and len(rec["etcd"]) == 3
        cluster = json.loads((folder / "ledger-cluster" / "cluster.json").read_text())
        pids = [r["pid"] for r in cluster["replicas"]] + [m["pid"] for m in cluster["etcd"]]
        # the node agent was given every replica
        assert any("node run --farm" in c and f"--ledger {rec['url']} " in c
                   for c in _cmdlines()), _cmdlines()

        status = json.loads(run(None, None, "ledger", "status", "--ledger", rec["url"],
                                "--json").stdout)
        assert status["problems"] == [] and len(status["replicas"]) == 3
        assert {r["state"] for r in status["replicas"]} == {"ok"}
        assert len(status["validators"]["validators"]) == 3

        home = Path(rec["home"])
        out = json.loads(run(home, rec["url"], "deploy",
                             str(REPO / "examples" / "zdb-namespace.yaml"), "-i", "alice",
                             "--json").stdout)
        assert out["state"] == "deployed", out
        shown = json.loads(run(None, None, "grid", "status", "--dir", str(folder),
                               "--json").stdout)
        assert shown["nodes"][0]["reserved"]["hru"] == 1 << 30
        # the replicas agree on the chain that carries it
        status = json.loads(run(None, None, "ledger", "status", "--ledger", rec["url"],
                                "--json").stdout)
        assert status["problems"] == [], status
        assert {r["state"] for r in status["replicas"]} == {"ok"}
        assert min(r["final"] for r in status["replicas"]) > 3
    finally:
        if folder.exists():
            run(None, None, "down", "--dir", str(folder), ok=False)
    assert not folder.exists()
    assert grid_processes(folder) == []
    assert pids
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid


def _cmdlines() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, UnicodeDecodeError):
            continue
    return found


def _taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


