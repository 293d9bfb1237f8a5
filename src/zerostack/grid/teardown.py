"""Stop what node agents left under a grid folder (containers and their supervisors,
mounts, cgroups, the hosts' network namespaces and links) and delete such a folder
without ever reaching through a mount point.

Only what provably belongs to the folder is touched: container runtimes whose state lives
under it, mounts whose mount point is below it, the namespaces its nodes' network
resources recorded (`networks/<tag>/namespaces`), and the namespaces and links named in
its grid record (`grid.json`). Nothing is picked by a name pattern.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zerostack.grid.errors import GridError
from zerostack.grid.hosts import release_record
from zerostack.node.hostfs import LOOP_FREE_WAIT, loop_devices
from zerostack.node.runtime import ContainerError, ContainerRuntime, cgroup_dirs

log = logging.getLogger("zerostack.grid.teardown")

STOP_WAIT = 15.0  # per container: its own stop timeout, then it is killed
BUSY_WAIT = 5.0  # a mount or cgroup its last processes are still leaving
UMOUNT_NOFOLLOW = 8
_OCTAL = re.compile(rb"\\([0-7]{3})")
NODE_NAMESPACES = "namespaces"
_NODE_NS = re.compile(r"z[nc]-[0-9a-f]{10}")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_points() -> list[Path]:
    """Every mount point of this mount namespace, as /proc/self/mountinfo names them."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    # The kernel writes space, tab, newline and backslash in a path as \ooo.
    return [Path(os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]),
                                        line.split(b" ")[4])))
            for line in lines if line.count(b" ") >= 4]


def mounts_under(folder: Path) -> list[Path]:
    """Mount points strictly below `folder` (symlinks in it resolved), deepest first."""
    prefix = os.path.realpath(folder).rstrip("/") + "/"
    found = {p for p in mount_points() if str(p).startswith(prefix)}
    return sorted(found, key=lambda p: (-len(p.parts), str(p)))


def _unmount(point: Path) -> str:
    """'' once nothing is mounted at `point` any more, else why something stays."""
    deadline = time.monotonic() + BUSY_WAIT
    while point in mount_points():
        if _libc.umount2(os.fsencode(point), UMOUNT_NOFOLLOW) == 0:
            log.info("event=unmounted path=%s", point)
            continue
        err = ctypes.get_errno()
        if err != errno.EBUSY or time.monotonic() > deadline:
            return os.strerror(err) + (" (a process still uses it)" if err == errno.EBUSY else "")
        time.sleep(0.1)
    return ""


def loop_devices_under(folder: Path) -> list[str]:
    """Loop devices whose backing file is below `folder` (a volume or layer image)."""
    return loop_devices(folder, below=True)


def _detach(device: str, folder: Path) -> str:
    """Detach loop `device` (it backs a file below `folder`) and wait until it is gone.
    The device of a `-o loop` mount just unmounted is being freed by the kernel,
    asynchronously: until then it still names its file and refuses a detach (ENXIO), or
    takes it as a request to free it once closed. So it is asked again until it is gone."""
    deadline = time.monotonic() + LOOP_FREE_WAIT
    why = ""
    while device in loop_devices_under(folder):
        if time.monotonic() > deadline:
            return f"loop device {device} stays attached" + (f": {why}" if why else "")
        try:
            out = subprocess.run(["losetup", "-d", device], capture_output=True, text=True,
                                 timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"loop device {device} stays attached: {exc}"
        why = out.stderr.strip()[:200] if out.returncode != 0 else ""
        time.sleep(0.1)
    log.info("event=loop_detached device=%s", device)
    return ""


def _runtimes(top: Path, mounts: set[str]) -> list[ContainerRuntime]:
    """Container runtimes whose state is under `top`: a directory holding runc's state
    (`runc/`) or a supervised container's files (`containers/<id>/shim.json`)."""
    found = []
    for dirpath, dirnames, _ in os.walk(top):
        # Never walk into a mount (a container's rootfs, a volume): not ours to read.
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in mounts]
        here = Path(dirpath)
        if "runc" in dirnames or ("containers" in dirnames
                                  and any((here / "containers").glob("*/shim.json"))):
            found.append(ContainerRuntime(here))
            dirnames[:] = []  # everything below belongs to that runtime
    return found


def node_namespaces(top: Path) -> list[str]:
    """The network namespaces the node agents whose data is `top` or `top/<node>`
    recorded as theirs (network resources and their containers'), each name checked."""
    found = []
    for record in [*top.glob(f"networks/*/{NODE_NAMESPACES}"),
                   *top.glob(f"*/networks/*/{NODE_NAMESPACES}")]:
        if record.is_symlink() or not record.is_file():
            continue
        try:
            with open(record, "rb") as f:
                names = f.read(1 << 16).decode(errors="replace").split()
        except OSError:
            continue
        found += [n for n in names if _NODE_NS.fullmatch(n)]
    return found


def _delete_namespace(name: str) -> str:
    if not Path("/run/netns", name).exists():
        return ""
    out = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return f"namespace {name} stays: {out.stderr.strip()[:200]}"
    log.info("event=netns_deleted name=%s", name)
    return ""


def _remove_cgroups(container_id: str) -> str:
    deadline = time.monotonic() + BUSY_WAIT
    for path in cgroup_dirs(container_id):
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return f"cgroup {path} stays: {exc.strerror}"
                time.sleep(0.05)
    return ""


def _stop_container(runtime: ContainerRuntime, container_id: str) -> str:
    """Supervisor, processes, runc state, rootfs mount and cgroups of one container; the
    container's files (logs) stay. '' when done, else what stays."""
    try:
        runtime.stop(container_id, timeout=STOP_WAIT)
    except ContainerError as exc:
        return f"container {container_id}: {exc}"
    log.info("event=container_stopped id=%s", container_id)
    return _remove_cgroups(container_id)


def release(folder: Path) -> list[str]:
    """Stop every container whose state is under `folder` (all at once), unmount
    everything mounted below it, deepest first, detach the loop devices of images below
    it, then remove the network namespaces and links its grid record names (after the
    containers, which may live in them). Returns what stays (empty: all done)."""
    if not folder.is_dir():
        return []
    top = Path(os.path.realpath(folder))
    problems: list[str] = []
    jobs: list[tuple[ContainerRuntime, str]] = []
    for runtime in _runtimes(top, {str(p) for p in mounts_under(top)}):
        try:
            known = set(runtime.runc.list())
        except ContainerError as exc:  # no runc here: then nothing of it can run either
            log.warning("event=runc_unavailable root=%s error=%r", runtime.root, str(exc))
            known = set()
        jobs += [(runtime, cid) for cid in sorted(known | set(runtime.ids()))]
    if jobs:
        with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
            problems += [p for p in pool.map(lambda job: _stop_container(*job), jobs) if p]
    for point in mounts_under(top):
        why = _unmount(point)
        if why:
            problems.append(f"{point} stays mounted: {why}")
    # A mount made with `-o loop` frees its device on unmount; one attached otherwise
    # would keep the image (and its data) in use.
    problems += [p for p in (_detach(d, top) for d in loop_devices_under(top)) if p]
    # the nodes' network namespaces (their containers are stopped): deleting a resource's
    # takes its links, and so its WireGuard interface, with it
    problems += [p for p in map(_delete_namespace, node_namespaces(top)) if p]
    problems += release_record(top)
    return problems


def _check_one_filesystem(top: Path, dev: int) -> None:
    for dirpath, _, _ in os.walk(top):
        if os.lstat(dirpath).st_dev != dev:
            raise GridError(f"not deleting {top}: {dirpath} is on another filesystem "
                            "(a mount point?)")


def _delete_within(top: Path) -> None:
    """Delete `top` and everything in it that is on `top`'s own filesystem; refuse, before
    deleting anything, when a directory below is on another one."""
    dev = os.lstat(top).st_dev
    _check_one_filesystem(top, dev)
    dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        if os.lstat(dirpath).st_dev != dev:  # appeared since the check
            raise GridError(f"stopped deleting {top}: {dirpath} is on another filesystem")
        dirs.append(dirpath)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if stat.S_ISLNK(os.lstat(path).st_mode):
                os.unlink(path)  # a link to a directory: remove the link, not its target
        dirnames[:] = [d for d in dirnames if os.path.lexists(os.path.join(dirpath, d))]
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
    keep_top = top in mount_points()  # a folder that is itself a mount point is emptied
    for d in reversed(dirs):
        if d != str(top) or not keep_top:
            os.rmdir(d)


def remove_tree(folder: Path) -> None:
    """Release `folder` (see `release`), then delete it. Refuses with GridError, deleting
    nothing, when anything under it still runs or stays mounted."""
    if folder.is_symlink():
        raise GridError(f"not deleting {folder}: it is a symbolic link")
    if not folder.exists():
        return
    problems = release(folder)
    problems += [f"{p} is still mounted" for p in mounts_under(folder)
                 if not any(str(p) in q for q in problems)]
    if problems:
        raise GridError(f"not deleting {folder}: " + "; ".join(problems))
    _delete_within(Path(os.path.realpath(folder)))
