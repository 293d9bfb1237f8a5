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
from zerostack.crypto import Identity, save_identity


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "ZEROSTACK_HOME": str(home), "COLUMNS": "300"}


def _zs(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*zerostack_cmd(), *args], capture_output=True, text=True,
                          env=_env(home), timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _zs_together(home: Path, *commands: list[str]) -> list[tuple[int, str, str]]:
    """Independent commands at once: the CLI's start-up dominates each one."""
    running = [subprocess.Popen([*zerostack_cmd(), *c], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(home))
               for c in commands]
    out = []
    for p in running:
        stdout, stderr = p.communicate(timeout=120)
        out.append((p.returncode, stdout, stderr))
    return out


def test_flist_cli(tmp_path: Path, procs: ProcessGroup) -> None:
    hub = start_hub(procs, tmp_path)
    home = tmp_path / "home"
    pub = Identity.generate()
    save_identity(pub, home / "identities" / "pub.key", "pub")
    root = busybox_rootfs(tmp_path / "root")
    out = json.loads(_zs(home, "flist", "build", str(root), "-o", str(tmp_path / "bb.flist"),
                         "--identity", "pub", "--entrypoint", "/bin/sh", "--env", "A=1",
                         "--json").stdout)
    assert out["signature_valid"] and out["config"]["env"] == ["A=1"]
    pushed = json.loads(_zs(home, "flist", "push", str(tmp_path / "bb.flist"), "--hub", hub,
                            "--json").stdout)
    assert pushed["chunks_sent"] == pushed["chunks"] == out["chunks"]

    tarball = docker_save_tarball(tmp_path / "img.tar", {"Cmd": ["/app/run.sh"]}, busybox_layers())
    inspect, good, bad, imp = _zs_together(
        home,
        ["flist", "inspect", out["hash"], "--hub", hub, "--files", "--json"],
        ["flist", "verify", str(tmp_path / "bb.flist"), "--hub", hub, "--publisher", pub.public_hex],
        ["flist", "verify", out["hash"], "--hub", hub, "--publisher", "00" * 32],
        ["flist", "import", str(tarball), "--identity", "pub", "-o", str(tmp_path / "img.flist"),
         "--hub", hub, "--json"],
    )
    assert inspect[0] == 0 and good[0] == 0 and imp[0] == 0, (inspect[2], good[2], imp[2])
    info = json.loads(inspect[1])
    assert info["hash"] == out["hash"] and any(p["path"] == "bin/busybox" for p in info["paths"])
    assert bad[0] != 0 and "not among the publishers" in bad[2]
    imported = json.loads(imp[1])
    assert imported["layers"] == 2 and imported["name"] == "test/busybox:1"
    assert imported["pushed"]["chunks_sent"] > 0

    host, port = hub.split(":")
    manifest = json.loads((tmp_path / "bb.flist").read_text())["manifest"]
    chunk = next(e for e in manifest["entries"] if e["path"] == "bin/busybox")["chunks"][0]
    redis.Redis(host=host, port=int(port)).set(bytes.fromhex(chunk), b"evil")
    tampered = _zs(home, "flist", "verify", str(tmp_path / "bb.flist"), "--hub", hub, ok=False)
    assert tampered.returncode != 0 and "does not match its hash" in tampered.stderr
