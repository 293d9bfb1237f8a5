"""`zerostack up` / `grid status` / `down`: a standing grid with the example image, the
batch-job template run to completion on it by a user, and everything removed after."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO, free_port, free_ports, require_root, require_tool, zerostack_cmd
from zerostack.crypto import load_identity
from zerostack.node.network.plan import resource_names
from zerostack.node.provisioners import WorkloadID


def run(home: Path | None, url: str | None, *args: str,
        ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    if home is not None:
        env["ZEROSTACK_HOME"] = str(home)
    if url is not None:
        env["ZEROSTACK_LEDGER"] = url
    proc = subprocess.run([*zerostack_cmd(), *args], env=env, capture_output=True, text=True,
                          timeout=240)
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def grid_processes(folder: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(folder) in line]


def test_up_runs_a_batch_job_and_down_removes_everything(tmp_path: Path) -> None:
    require_root()
    for tool in ("runc", "busybox", "wireguard-go"):
        require_tool(tool)
    folder = tmp_path / "grid"
    try:
        rec = json.loads(run(None, None, "up", "--dir", str(folder), "--nodes", "2",
                             "--loopback", "--ledger-port", str(free_port()),
                             "--zdb-port", str(free_ports(2)), "--hub-port", str(free_port()),
                             "--json").stdout)
        home, url = Path(rec["home"]), rec["url"]
        assert sorted(rec["twins"]) == ["alice", "budget", "expert", "legal"]
        status = json.loads(run(None, None, "grid", "status", "--dir", str(folder),
                                "--json").stdout)
        assert sorted(n["location"]["country"] for n in status["nodes"]) == ["BE", "CH"]
        assert (folder / "up.json").stat().st_mode & 0o777 == 0o600

        run(home, url, "template", "publish",
            str(REPO / "examples" / "templates" / "batch-job.yaml"), "-i", "expert")
        st = json.loads(run(home, url, "deploy", "batch-job", "-p", f"image={rec['image']}",
                            "-p", "command=wc -c /etc/passwd", "-p", "country=CH",
                            "-i", "alice", "--json").stdout)
        (part,) = st["parts"]
        assert part["state"] == "deployed"
        ch = next(n["id"] for n in status["nodes"] if n["location"]["country"] == "CH")
        assert part["node"] == ch
        shown = run(None, None, "grid", "status", "--dir", str(folder)).stdout
        assert "batch-job 1.0" in shown
        # the job runs to completion, then its solution is cancelled: everything released
        done = json.loads(run(home, url, "solution", "wait", str(st["id"]), "--release",
                              "--timeout", "90", "--json", "-i", "alice").stdout)
        assert done["jobs"] == {"job": "exited with 0"}
        deadline = time.monotonic() + 60
        while json.loads(run(home, url, "status", str(part["contract"]), "--json",
                             "-i", "alice").stdout)["state"] != "deleted":
            assert time.monotonic() < deadline, "the job's contract was not removed"
            time.sleep(1)
        free = json.loads(run(None, None, "grid", "status", "--dir", str(folder),
                              "--json").stdout)
        node = next(n for n in free["nodes"] if n["id"] == ch)
        assert node["reserved"]["cru"] == 0 and node["reserved"]["hru"] == 0

        # webapp without gateways: its container, namespace and network, and its page
        # served on the user network
        run(home, url, "template", "publish",
            str(REPO / "examples" / "templates" / "webapp.yaml"), "-i", "expert")
        st = json.loads(run(home, url, "deploy", "webapp", "-p", f"image={rec['image']}",
                            "-p", "gateways=0", "-p", "name=shop", "-i", "alice",
                            "--json").stdout)
        (part,) = st["parts"]
        assert part["state"] == "deployed", part
        assert {w["name"]: w["state"] for w in part["workloads"]} == {
            "shop-web": "ok", "shop-data": "ok", "shop-net": "ok"}
        web = next(w for w in part["workloads"] if w["name"] == "shop-web")
        node_dir = folder / next(n["name"] for n in rec["nodes"] if n["node"] == part["node"])
        ns = resource_names(load_identity(node_dir / "identity.key").public_hex,
                            WorkloadID(int(part["contract"]), "shop-net")).namespace
        page = ""
        deadline = time.monotonic() + 30
        while "hello from shop" not in page and time.monotonic() < deadline:
            page = subprocess.run(["ip", "netns", "exec", ns, "busybox", "wget", "-q", "-O",
                                   "-", f"http://{web['data']['ip']}:8080/"],
                                  capture_output=True, text=True, timeout=30).stdout
        assert "hello from shop" in page
        # the user's machine can join the solution's network: its access configuration
        config = run(home, url, "network", "access", "shop-net", "-i", "alice").stdout
        assert "[Interface]" in config and "AllowedIPs = 10.60.0.0/16" in config
        run(home, url, "solution", "cancel", str(st["id"]), "-i", "alice")
    finally:
        if folder.exists():
            run(None, None, "down", "--dir", str(folder), ok=False)
    assert not folder.exists()
    assert grid_processes(folder) == []
