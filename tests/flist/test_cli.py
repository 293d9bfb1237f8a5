"""`zerostack flist` end to end: build, import, push, inspect, verify against a real hub."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import redis

from tests.conftest import ProcessGroup, zerostack_cmd
from tests.flist.hub import start_hub
from tests.flist.image import busybox_layers, busybox_rootfs, docker_save_tarball


def _zs(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZEROSTACK_HOME": str(home), "COLUMNS": "300"}
    proc = subprocess.run([*zerostack_cmd(), *args], capture_output=True, text=True, env=env,
                          timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_flist_cli(tmp_path: Path, procs: ProcessGroup) -> None:
    hub = start_hub(procs, tmp_path)
    home = tmp_path / "home"
    _zs(home, "id", "new", "pub")
    root = busybox_rootfs(tmp_path / "root")
    out = json.loads(_zs(home, "flist", "build", str(root), "-o", str(tmp_path / "bb.flist"),
                         "--identity", "pub", "--entrypoint", "/bin/sh", "--env", "A=1",
                         "--json").stdout)
    assert out["signature_valid"] and out["config"]["env"] == ["A=1"]
    pushed = json.loads(_zs(home, "flist", "push", str(tmp_path / "bb.flist"), "--hub", hub,
                            "--json").stdout)
    assert pushed["chunks_sent"] == pushed["chunks"] == out["chunks"]
    info = json.loads(_zs(home, "flist", "inspect", out["hash"], "--hub", hub, "--files",
                          "--json").stdout)
    assert info["hash"] == out["hash"] and any(p["path"] == "bin/busybox" for p in info["paths"])
    pub = json.loads(_zs(home, "id", "show", "pub", "--json").stdout)["public"]
    _zs(home, "flist", "verify", str(tmp_path / "bb.flist"), "--hub", hub, "--publisher", pub)

    bad = _zs(home, "flist", "verify", out["hash"], "--hub", hub, "--publisher", "00" * 32, ok=False)
    assert bad.returncode != 0 and "not among the publishers" in bad.stderr
    host, port = hub.split(":")
    manifest = json.loads((tmp_path / "bb.flist").read_text())["manifest"]
    chunk = next(e for e in manifest["entries"] if e["path"] == "bin/busybox")["chunks"][0]
    redis.Redis(host=host, port=int(port)).set(bytes.fromhex(chunk), b"evil")
    bad = _zs(home, "flist", "verify", str(tmp_path / "bb.flist"), "--hub", hub, ok=False)
    assert bad.returncode != 0 and "does not match its hash" in bad.stderr

    tarball = docker_save_tarball(tmp_path / "img.tar", {"Cmd": ["/app/run.sh"]}, busybox_layers())
    imp = json.loads(_zs(home, "flist", "import", str(tarball), "--identity", "pub",
                         "-o", str(tmp_path / "img.flist"), "--hub", hub, "--json").stdout)
    assert imp["layers"] == 2 and imp["name"] == "test/busybox:1" and imp["pushed"]["chunks_sent"] > 0
