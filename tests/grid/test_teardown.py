"""A grid stops what it started: `zerostack demo` with a running container, stopped with
SIGINT or SIGTERM, or killed with SIGKILL and started again on the same folder; and a
grid folder is never deleted through a mount point."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_root, require_tool, zerostack_cmd
from tests.node.runtime.conftest import Env
from zerostack.bot import ThreeBot
from zerostack.crypto import load_identity
from zerostack.grid import GridError, LocalGrid, release, remove_tree, teardown
from zerostack.ledger import LedgerClient
from zerostack.node.runtime import ContainerSpec, cgroup_dirs


def mounts_containing(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if text in line]


def processes_naming(folder: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", str(folder)], capture_output=True, text=True)
    return out.stdout.splitlines()


def runc_ids(root: Path) -> list[str]:
    out = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True,
                         text=True)
    return out.stdout.split()


class Demo:
    """`zerostack demo` on `folder`, its output in a log, run in its own session."""

    def __init__(self, folder: Path, ledger_port: int, zdb_port: int) -> None:
        self.folder = folder
        self.ledger_port = ledger_port
        self.zdb_port = zdb_port
        self.url = f"http://127.0.0.1:{ledger_port}"
        self.log = folder.parent / f"{folder.name}-demo.log"

    def args(self, *extra: str) -> list[str]:
        return [*zerostack_cmd(), "demo", "--dir", str(self.folder), "--nodes", "1",
                "--ledger-port", str(self.ledger_port), "--zdb-port", str(self.zdb_port),
                *extra]

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 120
        while "The grid keeps running" not in self.output():
            assert proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)
        return proc

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def deploy_container(self, env: Env) -> dict[str, Any]:
        """Alice's container with a volume on the demo's node, once it runs: facts about it."""
        node = int(LedgerClient(self.url).nodes()[0]["id"])
        alice = load_identity(self.folder / "home" / "identities" / "alice.key")
        with ThreeBot(self.url, alice) as bot:
            dep = bot.build({"workloads": [
                {"type": "volume", "name": "vol", "size": "16M"},
                {"type": "container", "name": "app", "flist": f"{env.hub}/{env.image.hash}",
                 "publishers": [env.publisher.public_hex], "memory": "32M",
                 "args": ["trap 'exit 0' TERM; sleep 1000 & wait"],
                 "mounts": [{"volume": "vol", "mountpoint": "/data"}]}]},
                [], None)
            cid = bot.deploy(dep, node)
            c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                         and bool(c.get("report")), timeout=90)
        assert c["state"] == "deployed", c["report"]
        app = next(w for w in c["report"]["workloads"] if w["name"] == "app")
        container = app["data"]["container"]
        runc_root = self.folder / "node1" / "containers" / "runc"
        state = subprocess.run(["runc", "--root", str(runc_root), "state", container],
                               capture_output=True, text=True, check=True).stdout
        pid = int(json.loads(state)["pid"])
        assert len(mounts_containing(str(self.folder))) >= 2  # the rootfs and the volume
        return {"container": container, "pid": pid, "runc_root": runc_root}


def assert_nothing_left(folder: Path, facts: dict[str, Any]) -> None:
    assert mounts_containing(str(folder)) == []
    assert runc_ids(facts["runc_root"]) == []
    assert not Path(f"/proc/{facts['pid']}").exists()
    assert cgroup_dirs(facts["container"]) == []
    assert processes_naming(folder) == []


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A grid folder; whatever a failed test left in it is stopped at teardown."""
    require_root()
    require_tool("runc")
    path = tmp_path / "grid"
    try:
        yield path
    finally:
        LocalGrid(path).reclaim()
        # the demo process itself (not in grid.pids) when a test failed before stopping it:
        # its command line names this test's own folder
        for line in processes_naming(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_the_demo_stops_its_containers_mounts_and_processes(
        env: Env, folder: Path, sig: signal.Signals) -> None:
    demo = Demo(folder, free_port(), free_port())
    proc = demo.start()
    try:
        facts = demo.deploy_container(env)
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=90) == 0, demo.output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopping the grid" in demo.output()
    assert_nothing_left(folder, facts)
    assert (folder / "node1.log").exists()  # logs stay for the user to read


def test_a_killed_demo_is_cleaned_by_the_next_start_and_others_are_untouched(
        env: Env, folder: Path) -> None:
    # A container of another folder, running all along: must never be touched.
    other = env.new_id("other")
    env.runtime.start(ContainerSpec(id=other, image_hash=env.image.hash,
                                    args=("trap 'exit 0' TERM; sleep 1000 & wait",),
                                    stop_timeout=1), env.image)
    other_rootfs = env.runtime.layout(other).rootfs
    try:
        before = sorted(os.listdir(other_rootfs))
        assert "bin" in before
        demo = Demo(folder, free_port(), free_port())
        proc = demo.start()
        facts = demo.deploy_container(env)
        proc.kill()  # a crash: nothing of the demo's own cleanup runs
        proc.wait()
        # what the crash left: the agent, the ledger, the container and its mounts
        assert processes_naming(folder) != []
        assert runc_ids(facts["runc_root"]) == [facts["container"]]
        assert Path(f"/proc/{facts['pid']}").exists()
        again = subprocess.run(demo.args("--once"), capture_output=True, text=True,
                               timeout=180, env={**os.environ, "COLUMNS": "200"})
        assert again.returncode == 0, again.stdout + again.stderr
        assert "deployed (signed report from node" in " ".join(again.stdout.split())
        assert_nothing_left(folder, facts)
        assert env.runtime.status(other).state == "ok"
        assert sorted(os.listdir(other_rootfs)) == before
        assert (other_rootfs / "bin" / "busybox").stat().st_size > 0
    finally:
        env.runtime.delete(other)


def test_a_busy_mount_stops_the_deletion_before_anything_is_deleted(tmp_path: Path) -> None:
    require_root()
    top = tmp_path / "grid"
    point = top / "node1" / "with space"
    point.mkdir(parents=True)
    (top / "ledger.db").write_text("keep")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
    try:
        (point / "tenant-data").write_text("precious")
        assert teardown.mounts_under(top) == [point]
        holder = subprocess.Popen(["sleep", "60"], cwd=point)
        try:
            with pytest.raises(GridError, match=r"with space stays mounted: .*busy"):
                remove_tree(top)
            assert (point / "tenant-data").read_text() == "precious"
            assert (top / "ledger.db").read_text() == "keep"
        finally:
            holder.kill()
            holder.wait()
        # The one-filesystem guard on its own: it refuses before deleting anything.
        with pytest.raises(GridError, match="on another filesystem"):
            teardown._delete_within(top)
        assert (point / "tenant-data").exists() and (top / "ledger.db").exists()
        # Nothing holds the mount any more: unmounted, then deleted.
        remove_tree(top)
        assert not top.exists()
        assert mounts_containing(str(top)) == []
    finally:
        if mounts_containing(str(tmp_path)):
            subprocess.run(["umount", "-l", str(point)], check=False)


def test_release_detaches_the_loop_devices_of_images_in_the_folder(tmp_path: Path) -> None:
    require_root()
    require_tool("losetup")
    image = tmp_path / "grid" / "node1" / "layer.img"
    image.parent.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()
    try:
        assert teardown.loop_devices_under(tmp_path / "grid") == [device]
        assert release(tmp_path / "grid") == []
        assert teardown.loop_devices_under(tmp_path / "grid") == []
    finally:
        if teardown.loop_devices_under(tmp_path / "grid"):
            subprocess.run(["losetup", "-d", device], check=False)


def test_release_waits_for_the_kernel_to_free_the_loop_devices_it_unmounted(
        tmp_path: Path) -> None:
    # The kernel frees a `-o loop` mount's device a little after the unmount returns, and
    # refuses to detach it meanwhile: release waits for that instead of reporting it.
    require_root()
    require_tool("mkfs.ext4")
    top = tmp_path / "grid"
    image, point = top / "node1" / "vol.img", top / "node1" / "volumes" / "vol"
    point.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    try:
        for _ in range(20):  # the kernel is quick: one round alone rarely sees the race
            subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
            assert len(teardown.loop_devices_under(top)) == 1
            assert release(top) == []
            assert mounts_containing(str(top)) == []
            assert teardown.loop_devices_under(top) == []
    finally:
        if mounts_containing(str(top)):
            subprocess.run(["umount", "-l", str(point)], check=False)
        for device in teardown.loop_devices_under(top):
            subprocess.run(["losetup", "-d", device], check=False)


def test_release_of_a_folder_without_containers_or_mounts_does_nothing(tmp_path: Path) -> None:
    (tmp_path / "node1" / "containers" / "runc").mkdir(parents=True)
    (tmp_path / "node1" / "x.log").write_text("log")
    assert release(tmp_path) == []
    assert (tmp_path / "node1" / "x.log").read_text() == "log"


def test_the_demo_refuses_to_wipe_a_folder_with_a_busy_mount(tmp_path: Path) -> None:
    require_root()
    top = tmp_path / "grid"
    point = top / "node1" / "volumes" / "c1-vol"
    point.mkdir(parents=True)
    (top / "ledger.db").write_text("an earlier demo")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
    holder = subprocess.Popen(["sleep", "60"], cwd=point)
    try:
        (point / "tenant-data").write_text("precious")
        out = subprocess.run([*Demo(top, free_port(), free_port()).args("--once")],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "300"})
        assert out.returncode != 0
        assert "stays mounted" in out.stderr and "busy" in out.stderr, out.stderr
        assert (point / "tenant-data").read_text() == "precious"
        assert (top / "ledger.db").read_text() == "an earlier demo"
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["umount", "-l", str(point)], check=False)
