"""The node's container runtime: bundles, shims, state, health, logs and cleanup.

Layout under `root`: `runc/` (runc's state) and `containers/<id>/` holding `bundle/`
(config.json, mode 0600 as it carries secret env), `layer.img` (the writable layer, an ext4
image of the spec's `disk` size, mounted at `layer/`), `idmap.json` (the container's host id
range), `logs/`, and the shim's files. The mounts runc uses live under the staging root (see
`rootfs.py`). Every directory is 0700 and every file 0600: other host users see none of it.
Every call is idempotent and safe to repeat after a crash of the caller.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zerostack.flist import CachedImage, FlistError, ImageCache
from zerostack.node.hostfs import create_private, private_dir, restrict, restrict_tree
from zerostack.node.runtime.health import probe
from zerostack.node.runtime.idmap import IdRegistry
from zerostack.node.runtime.logs import read_logs
from zerostack.node.runtime.oci import HostPaths, cgroups_path, oci_config
from zerostack.node.runtime.rootfs import (
    STAGE_ROOT,
    Layout,
    check_layer_size,
    prepare_layer,
    unmount_rootfs,
)
from zerostack.node.runtime.runc import RUNC, Runc, is_mounted, unmount
from zerostack.node.runtime.spec import ContainerError, ContainerSpec
from zerostack.node.runtime.statusfile import read_status

State = Literal["init", "ok", "error"]
CGROUP_ROOT = Path("/sys/fs/cgroup")
# What a container's directory may be called: one plain path component.
_DIR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
# The runtime's own files in a container's directory (the rest is the container's).
_OWN_FILES = ("spec.json", "shim.json", "fingerprint", "status.json", "shim.log", "shim.pid",
              "shim.lock", "bundle/config.json")


@dataclass(frozen=True)
class ContainerStatus:
    """What the node reports for a container: `init`, `ok` or `error`, and why."""

    state: State
    message: str
    restarts: int = 0
    last_exit: int | None = None
    pid: int | None = None
    oom_killed: bool = False  # the last run was ended by the OOM killer
    # The supervisor's own phase: starting, running, backoff (waiting to restart),
    # exited, stopped, error, or gone (no supervisor).
    phase: str = ""

    @property
    def settling(self) -> bool:
        """Still on its way to a verdict: starting, restarting, or not yet healthy."""
        return self.phase in ("", "starting", "backoff") or (
            self.phase == "running" and self.state == "init")


class ContainerRuntime:
    """Runs containers under runc on this node, each supervised by its own shim process."""

    def __init__(self, root: Path, runc: str = RUNC, python: str = sys.executable,
                 stage: Path = STAGE_ROOT, idmap: IdRegistry | None = None) -> None:
        self.root = root
        self.runc = Runc(root / "runc", runc)
        self.python = python
        self.stage = stage
        self.idmap = idmap or IdRegistry()
        # Consecutive health-probe failures and whether a probe ever passed, per container.
        self._health: dict[str, tuple[float, bool, str, bool]] = {}

    def dir(self, container_id: str) -> Path:
        if _DIR_NAME.fullmatch(container_id) is None:
            raise ContainerError(f"invalid container id {container_id[:80]!r}")
        return self.root / "containers" / container_id

    def make_private(self) -> None:
        """Create the runtime's directories 0700, and take group and other access off
        whatever an older version left readable: bundles (config.json holds secret env),
        logs, state files, the writable layer's image. The files inside the writable layer
        keep their modes; their directory is closed instead."""
        private_dir(self.root)
        private_dir(self.root / "containers")
        private_dir(self.runc.root)
        for cid in self.ids():
            d = self.dir(cid)
            if d.is_symlink() or not d.is_dir():
                continue
            for sub in ("", "bundle", "logs", "layer"):
                restrict(d / sub)
            for name in (*_OWN_FILES, "idmap.json", "layer.img"):
                restrict(d / name)
            restrict_tree(d / "logs")

    def layout(self, container_id: str) -> Layout:
        """Where the container's filesystem lives, as its shim was told (base 0: unknown)."""
        cfg = _read_json(self.dir(container_id) / "shim.json")
        if "layout" in cfg:
            return Layout.from_dict(cfg["layout"])
        return Layout(self.dir(container_id), self.stage / container_id, 0)

    def _id_base(self, spec: ContainerSpec) -> int:
        """The container's host id range, claimed once and kept for its whole life (its
        writable layer and volumes hold files owned by it)."""
        d = self.dir(spec.id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        recorded = _read_json(d / "idmap.json")
        group = str(recorded.get("group") or spec.idmap_group or spec.id)
        if isinstance(recorded.get("base"), int):
            return int(recorded["base"])
        # Membership is on disk before the claim, so no other runtime takes the claim
        # back as abandoned in between.
        _write_private(d / "idmap.json", json.dumps({"group": group}).encode())
        base = self.idmap.claim(group, self.root / "containers")
        _write_private(d / "idmap.json", json.dumps({"group": group, "base": base}).encode())
        return base

    # -- lifecycle -------------------------------------------------------------------

    def supervised(self, container_id: str) -> bool:
        """True while a shim holds the container's lock."""
        lock = self.dir(container_id) / "shim.lock"
        if not lock.exists():
            return False
        with os.fdopen(create_private(lock), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    def start(self, spec: ContainerSpec, image: CachedImage, wait: float = 15.0) -> ContainerStatus:
        """Run `spec` from the verified `image` unless it already runs with the same spec.

        A different spec under the same id replaces the running container. Returns once
        the container runs (or failed to), at most after `wait` seconds.
        """
        if image.hash != spec.image_hash:
            raise ContainerError(f"container {spec.id}: image {image.hash[:16]} is not the "
                                 f"spec's image {spec.image_hash[:16]}")
        d = self.dir(spec.id)
        base = self._id_base(spec)
        layout = Layout(d, self.stage / spec.id, base)
        host = HostPaths(layout.rootfs, base, tuple(layout.volume(i) for i in range(len(spec.volumes))),
                         layout.sys if spec.netns else None, d / "hosts" if spec.hosts else None)
        config = oci_config(spec, image.manifest.config, image.rootfs, host)
        fingerprint = hashlib.blake2b(json.dumps({"spec": spec.public_dict(), "config": config},
                                                 sort_keys=True).encode(), digest_size=32).hexdigest()
        if self.supervised(spec.id):
            if (d / "fingerprint").exists() and (d / "fingerprint").read_text() == fingerprint:
                return self._settled(spec.id, wait)
            check_layer_size(layout, spec.disk)  # refused before the running one stops
            self.stop(spec.id)
        private_dir(self.root)
        private_dir(self.root / "containers")
        for sub in ("", "bundle", "logs"):
            private_dir(d / sub)
        # The image cache is checked now; the shim checks again before every restart.
        image_cache = image.cache_root
        try:
            ImageCache(image_cache).check(image.hash)
        except FlistError as exc:
            raise ContainerError(f"container {spec.id}: {exc}") from None
        prepare_layer(layout, spec.disk)
        _write_private(d / "bundle" / "config.json", json.dumps(config).encode())
        if spec.hosts:
            # names and addresses every process of the container may read, in a private dir
            _write_private(d / "hosts", spec.hosts.encode())
            os.chmod(d / "hosts", 0o644)
        _write_private(d / "spec.json", json.dumps(spec.public_dict()).encode())
        _write_private(d / "shim.json", json.dumps({
            "id": spec.id, "runc": self.runc.binary, "runc_root": str(self.runc.root),
            "bundle": str(d / "bundle"), "lower": str(image.rootfs),
            "layout": layout.to_dict(), "netns": spec.netns,
            "volumes": [{"source": str(v.source), "readonly": v.readonly} for v in spec.volumes],
            "restart": spec.restart, "stop_timeout": spec.stop_timeout,
            "log_max_bytes": spec.log_max_bytes, "log_keep": spec.log_keep,
            "image_cache": str(image_cache), "image_hash": image.hash,
            "cgroup": cgroups_path(spec.id),
        }).encode())
        _write_private(d / "fingerprint", fingerprint.encode())
        try:
            (d / "status.json").unlink()
        except FileNotFoundError:
            pass
        self._health.pop(spec.id, None)
        # The shim forks and detaches at once; this only waits for that first step.
        try:
            with os.fdopen(create_private(d / "shim.log"), "ab") as shim_log:
                subprocess.run([self.python, "-m", "zerostack.node.runtime.shim", str(d)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=shim_log, close_fds=True, check=True, timeout=30)
        except (subprocess.SubprocessError, OSError) as exc:
            tail = (d / "shim.log").read_text(errors="replace")[-300:]
            raise ContainerError(f"container {spec.id}: supervisor failed to start: {exc} {tail}"
                                 ) from None
        return self._settled(spec.id, wait)

    def _settled(self, container_id: str, wait: float) -> ContainerStatus:
        """The status once the shim has got past starting (or `wait` seconds passed)."""
        d = self.dir(container_id)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if read_status(d).get("state") in ("running", "exited", "error", "backoff", "stopped"):
                break
            time.sleep(0.01)
        return self.status(container_id)

    # -- the cgroup freezer ------------------------------------------------------------

    def freezer(self, container_id: str) -> tuple[Path, int] | None:
        """The container's freezer cgroup and its cgroup version: v2 (`cgroup.freeze`,
        `cgroup.events`) or the v1 freezer hierarchy (`freezer.state`); None without one."""
        self.dir(container_id)  # checks the id
        rel = cgroups_path(container_id).lstrip("/")
        if (CGROUP_ROOT / rel / "cgroup.freeze").exists():
            return CGROUP_ROOT / rel, 2
        if (CGROUP_ROOT / "freezer" / rel / "freezer.state").exists():
            return CGROUP_ROOT / "freezer" / rel, 1
        return None

    def frozen(self, container_id: str) -> bool:
        """Whether every process of the container is frozen: `frozen 1` in cgroup v2's
        `cgroup.events`, `FROZEN` in v1's `freezer.state` (not while still `FREEZING`)."""
        found = self.freezer(container_id)
        if found is None:
            return False
        path, version = found
        try:
            with open(path / ("cgroup.events" if version == 2 else "freezer.state"), "rb") as f:
                text = f.read(4096).decode(errors="replace")
        except OSError:
            return False
        return ("frozen 1" in text.splitlines()) if version == 2 else text.strip() == "FROZEN"

    def freeze(self, container_id: str, frozen: bool = True, wait: float = 10.0) -> None:
        """Freeze (or thaw) every process of the container with the cgroup freezer and
        wait until the kernel says it is done. Its memory, files and network state stay as
        they are: a thawed container carries on where it stopped."""
        found = self.freezer(container_id)
        if found is None:
            if not frozen:
                return  # no cgroup: nothing is frozen
            raise ContainerError(f"container {container_id} has no freezer cgroup")
        path, version = found
        control, value = ((path / "cgroup.freeze", b"1" if frozen else b"0") if version == 2
                          else (path / "freezer.state", b"FROZEN" if frozen else b"THAWED"))
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(control, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
            # v1 may stay FREEZING while a task is busy: writing again retries it
            for _ in range(20):
                if self.frozen(container_id) == frozen:
                    return
                time.sleep(0.01)
            if time.monotonic() > deadline:
                raise ContainerError(f"container {container_id} did not "
                                     f"{'freeze' if frozen else 'thaw'} in {wait:.0f}s")

    def stop(self, container_id: str, timeout: float = 30.0) -> None:
        """Stop the container and its shim (TERM, then KILL past the spec's stop timeout)."""
        d = self.dir(container_id)
        if self.frozen(container_id):  # a paused container is thawed to stop as usual
            self.freeze(container_id, False)
        pid = _read_int(d / "shim.pid")
        if pid and self.supervised(container_id):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.supervised(container_id) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.supervised(container_id):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while self.supervised(container_id):
                    time.sleep(0.02)
        self.runc.delete(container_id)
        unmount(d / "bundle" / "rootfs")  # where containers of earlier versions had it
        unmount_rootfs(self.layout(container_id))

    def delete(self, container_id: str) -> None:
        """Remove every trace: processes, runc state, mounts, cgroups, overlay, logs."""
        self.stop(container_id)
        _remove_cgroups(container_id)
        d = self.dir(container_id)
        layout = self.layout(container_id)
        group = _read_json(d / "idmap.json").get("group")
        if d.exists():
            for point in (d / "bundle" / "rootfs", layout.rootfs, layout.layer):
                if is_mounted(point):
                    raise ContainerError(f"container {container_id}: {point} is still mounted")
            shutil.rmtree(d)
        if group:
            self.idmap.release(str(group), self.root / "containers")
        self._health.pop(container_id, None)

    def ids(self) -> list[str]:
        base = self.root / "containers"
        if not base.exists():
            return []
        return sorted(p.name for p in base.iterdir() if _DIR_NAME.fullmatch(p.name))

    # -- state -----------------------------------------------------------------------

    def pid(self, container_id: str) -> int | None:
        st = self.runc.state(container_id)
        if st and st.get("status") == "running" and st.get("pid"):
            return int(st["pid"])
        return None

    def status(self, container_id: str) -> ContainerStatus:
        """init / ok / error for the node's report, probing health when the spec has one."""
        d = self.dir(container_id)
        if not d.exists():
            return ContainerStatus("error", "container does not exist")
        st = read_status(d)
        restarts = int(st.get("restarts", 0))
        last_exit = st.get("last_exit")
        state = st.get("state", "")
        msg = str(st.get("message", ""))
        alive = self.supervised(container_id)

        oom = bool(st.get("oom_killed", False))

        phase = state if alive or state in ("exited", "error") else "gone"

        def out(s: State, m: str, pid: int | None = None) -> ContainerStatus:
            return ContainerStatus(s, m, restarts, last_exit, pid, oom, phase)

        # "exited" and "error" are final: the shim may still be finishing its cleanup.
        if state == "exited" and last_exit == 0:
            return out("ok", "exited with 0")
        if state in ("exited", "error"):
            return out("error", msg or "container exited")
        if not alive:
            return out("error", "container is not running (its supervisor is gone)")
        if state in ("", "starting"):
            return out("init", "starting")
        if state == "backoff":
            return out("error", msg)
        if state != "running":
            return out("error", msg or state)
        pid = self.pid(container_id)
        if pid is None:
            return out("init", "starting")
        spec = _read_json(d / "spec.json")
        health = spec.get("health")
        if not health:
            return out("ok", "running", pid)
        return self._health_state(container_id, pid, health, float(st.get("started_at", 0)), out)

    def _health_state(self, container_id: str, pid: int, health: dict[str, Any],
                      started_at: float, out: Any) -> ContainerStatus:
        from zerostack.node.runtime.spec import HealthProbe

        check = HealthProbe(**health)
        last_at, ever_ok, detail, healthy = self._health.get(container_id, (0.0, False, "", False))
        now = time.time()
        if now - last_at >= check.interval or not healthy:
            healthy, detail = probe(pid, check)
            ever_ok = ever_ok or healthy
            self._health[container_id] = (now, ever_ok, detail, healthy)
        if healthy:
            result: ContainerStatus = out("ok", f"healthy ({detail})", pid)
        elif not ever_ok and now - started_at < check.grace:
            result = out("init", f"waiting for health check ({detail})", pid)
        else:
            result = out("error", f"health check failing: {detail}", pid)
        return result

    def logs(self, container_id: str, tail: int = 200) -> list[str]:
        """The container's last `tail` log lines (bounded in bytes; no link followed)."""
        self.dir(container_id)
        try:
            return read_logs(self.root, tail, beneath=("containers", container_id, "logs"))
        except FileNotFoundError:
            raise ContainerError(f"container {container_id} does not exist") from None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}


def cgroup_dirs(container_id: str) -> list[Path]:
    """The container's cgroup directory in every v1 hierarchy (or v2) that has one."""
    rel = cgroups_path(container_id).lstrip("/")
    if not CGROUP_ROOT.exists():
        return []
    out = [CGROUP_ROOT / rel] if (CGROUP_ROOT / "cgroup.controllers").exists() else []
    out += [h / rel for h in CGROUP_ROOT.iterdir() if h.is_dir() and (h / rel).exists()]
    return [p for p in out if p.exists()]


def _remove_cgroups(container_id: str) -> None:
    # runc removes them on delete; a runc killed mid-way may not have.
    for path in cgroup_dirs(container_id):
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise ContainerError(f"cannot remove cgroup {path}: {exc}") from None
                time.sleep(0.05)
