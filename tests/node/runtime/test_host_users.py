"""Another user on the node's host (`nobody`) reads nothing of a real node: not its key,
state, a container's bundle or logs, a volume image or a cached image, also after an
upgrade from a version that left them readable."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup, free_port, require_tool, wait_for_port
from tests.node.harness import Grid
from tests.node.runtime.conftest import Env
from tests.node.runtime.test_provisioner import _unmount_under
from zerostack.node.runtime import ContainerRuntime


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every host user can reach (pytest's own temp dirs are 0700, which would
    hide the node from `nobody` whatever its modes)."""
    require_tool("runuser")
    base = Path(tempfile.mkdtemp(prefix="zs-hostusers-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4].startswith(str(base)) for line in f)
    if not mounted:  # never delete through a mount a failed cleanup left
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True,
                          text=True, timeout=30)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class Layout:
    """The node's files that hold keys, secrets or tenant data."""

    def __init__(self, data: Path, container: str, contract: int, image: str) -> None:
        cdir = data / "containers" / "containers" / container
        self.data = data
        self.secret_files = {
            "identity key": data / "identity.key",
            "state": data / "state.db",
            "state WAL": data / "state.db-wal",
            "state shm": data / "state.db-shm",
            "zdb admin password": data / "zdb-admin.secret",
            "bundle config": cdir / "bundle" / "config.json",
            "container state": cdir / "shim.json",
            "container log": cdir / "logs" / "container.log",
            "volume image": data / "pools" / "ssd" / "volumes" / f"c{contract}-vol.img",
            "writable layer image": cdir / "layer.img",
            "cached image seal": data / "images" / "images" / image / "seal.json",
        }
        self.dirs = {
            "data dir": data,
            "runtime": data / "containers",
            "containers": data / "containers" / "containers",
            "container": cdir,
            "bundle": cdir / "bundle",
            "writable layer": cdir / "layer",
            "logs": cdir / "logs",
            "image cache": data / "images",
            "images": data / "images" / "images",
            "image": data / "images" / "images" / image,
            "volume images": data / "pools" / "ssd" / "volumes",
            "volume mounts": data / "volumes",
            "zdb data": data / "pools" / "hdd" / "zdb",
        }
        self.binary = data / "images" / "images" / image / "rootfs" / "bin" / "busybox"

    def assert_closed(self) -> None:
        """`nobody` tries, then the modes of each file and directory on its own."""
        self.assert_nobody_reads_nothing()
        assert mode(self.data) == 0o700
        for what in ("identity key", "state", "state WAL", "state shm"):
            assert mode(self.secret_files[what]) == 0o600, what
        for what, path in self.secret_files.items():
            assert mode(path) & 0o077 == 0, (what, oct(mode(path)))
        for what, path in self.dirs.items():
            assert mode(path) & 0o077 == 0, (what, oct(mode(path)))
        for tree in ("zdb data", "logs"):
            for inner in self.dirs[tree].rglob("*"):
                assert mode(inner) & 0o077 == 0, (inner, oct(mode(inner)))
        # A data dir opened by mistake still hides everything: each layer holds alone.
        os.chmod(self.data, 0o711)
        try:
            self.assert_nobody_reads_nothing(listing=False)
        finally:
            os.chmod(self.data, 0o700)

    def assert_nobody_reads_nothing(self, listing: bool = True) -> None:
        for what, path in self.secret_files.items():
            got = as_nobody("cat", str(path))
            assert got.returncode != 0 and got.stdout == "", what
            assert "Permission denied" in got.stderr, (what, got.stderr)
        for what, path in self.dirs.items():
            if path == self.data and not listing:
                continue
            got = as_nobody("ls", str(path))
            assert got.returncode != 0 and got.stdout == "", what
        ran = as_nobody(str(self.binary), "true")
        assert ran.returncode != 0


def test_another_host_user_reads_nothing_of_the_node(env: Env, open_base: Path) -> None:
    control = open_base / "control"
    control.write_text("readable\n")
    control.chmod(0o644)
    assert as_nobody("cat", str(control)).stdout == "readable\n"  # the check itself works

    procs = ProcessGroup()
    grid = Grid(procs, open_base)
    port = free_port()
    proc, zport, data = grid.start_node("hnode", "--status-port", str(port), "--cpu", "8")
    runtime = ContainerRuntime(data / "containers")
    token = uuid.uuid4().hex
    try:
        node = grid.node_id(data, proc)
        owner, twin = grid.user()
        cid, _ = grid.deploy(owner, twin, [
            {"type": "volume", "name": "vol", "size": "20M"},
            {"type": "container", "name": "app", "flist": f"{env.hub}/{env.image.hash}",
             "publishers": [env.publisher.public_hex], "memory": "32M",
             "secret_env": {"TOKEN": token},
             "mounts": [{"volume": "vol", "mountpoint": "/data"}],
             "args": ["echo \"tenant-file $TOKEN\" > /data/private; chmod 600 /data/private; "
                      "echo app-line; trap 'exit 0' TERM; sleep 100000 & wait"]},
        ], node)
        c = grid.wait_contract(cid, {"deployed", "error"}, timeout=90)
        assert c["state"] == "deployed", c["report"]
        app = next(w for w in c["report"]["workloads"] if w["name"] == "app")
        layout = Layout(data, app["data"]["container"], cid, env.image.hash)
        deadline = time.monotonic() + 30
        while not any(line.endswith("app-line") for line in runtime.logs(app["data"]["container"])):
            assert time.monotonic() < deadline, "the container never logged"
            time.sleep(0.1)
        assert token in layout.secret_files["bundle config"].read_text()
        layout.assert_closed()

        # An older node left all of it open: the data dir and directories 0755, files 0644.
        proc.kill()
        proc.wait()
        for path in layout.dirs.values():
            os.chmod(path, 0o755)
        for path in layout.secret_files.values():
            os.chmod(path, 0o644)
        assert as_nobody("cat", str(layout.secret_files["state"])).returncode == 0
        leaked = as_nobody("cat", str(layout.secret_files["bundle config"])).stdout
        assert token in leaked  # what the upgrade must close
        proc, _, _ = grid.start_node("hnode", "--status-port", str(port), "--cpu", "8",
                                     zdb_port=zport)
        wait_for_port(port, proc=proc, timeout=60)
        layout.assert_closed()
    finally:
        procs.stop_all()
        for left in runtime.ids():
            runtime.delete(left)
        _unmount_under(data)
