"""The per-container supervisor: runs `runc run`, keeps its logs, applies the restart policy.

Started detached (`python -m zerostack.node.runtime.shim DIR`), it outlives the node agent,
so an agent restart neither kills nor duplicates containers. It holds an exclusive lock on
`DIR/shim.lock` for its whole life: a second shim for the same container exits at once, and
the agent knows a container is supervised by trying that lock. Its state is `DIR/status.json`.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from zerostack.node.hostfs import create_private
from zerostack.node.runtime.logs import RotatingLog
from zerostack.node.runtime.oom import OomWatch
from zerostack.node.runtime.rootfs import Layout, mount_rootfs, unmount_rootfs
from zerostack.node.runtime.runc import Runc
from zerostack.node.runtime.statusfile import write_status

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a run this long resets the back-off


class Shim:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cfg: dict[str, Any] = json.loads((directory / "shim.json").read_text())
        self.id: str = self.cfg["id"]
        self.runc = Runc(Path(self.cfg["runc_root"]), self.cfg["runc"])
        self.stop = threading.Event()
        self.restarts = 0
        self.last_exit: int | None = None
        self.oom_killed = False
        self.started_at = 0.0

    def status(self, state: str, message: str = "", **extra: Any) -> None:
        write_status(self.dir, state=state, message=message, restarts=self.restarts,
                     last_exit=self.last_exit, oom_killed=self.oom_killed,
                     started_at=self.started_at, **extra)

    def check_image(self) -> str:
        """'' when the image cache still matches its manifest, else why not."""
        from zerostack.flist import FlistError, ImageCache  # only restarts pay for the import

        try:
            ImageCache(Path(self.cfg["image_cache"])).check(self.cfg["image_hash"])
        except FlistError as exc:
            return str(exc)
        return ""

    def run_once(self, log: RotatingLog) -> int:
        bundle = Path(self.cfg["bundle"])
        mount_rootfs(Layout.from_dict(self.cfg["layout"]), Path(self.cfg["lower"]),
                     list(self.cfg.get("volumes", [])), str(self.cfg.get("netns", "")))
        self.started_at = time.time()
        self.status("starting")
        oom = OomWatch(self.cfg.get("cgroup", "")).start() if self.cfg.get("cgroup") else None
        proc = subprocess.Popen(
            self.runc.argv("run", "--bundle", str(bundle), self.id),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [threading.Thread(target=log.pump, args=(name, pipe), daemon=True)
                 for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for t in pumps:
            t.start()
        announced = False
        term_sent = 0.0
        grace = float(self.cfg.get("stop_timeout", 10.0))
        while True:
            try:
                code = proc.wait(timeout=0.05 if not announced else 0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if oom is not None:
                oom.poll()
            if not announced:
                state = self.runc.state(self.id)
                if state and state.get("status") == "running":
                    announced = True
                    self.status("running", pid=state.get("pid"))
            if self.stop.is_set():
                now = time.time()
                if not term_sent:
                    self.runc.kill(self.id, "TERM")
                    term_sent = now
                elif now - term_sent > grace:
                    self.runc.kill(self.id, "KILL")
        for t in pumps:
            t.join(timeout=2)
        # runc removes an exited container itself; a killed runc leaves it behind.
        self.runc.delete(self.id)
        self.oom_killed = oom.stop(code) if oom is not None else False
        return code

    def main(self) -> int:
        lock = os.fdopen(create_private(self.dir / "shim.lock"), "a")  # held for life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another shim supervises this container
        pid_fd = create_private(self.dir / "shim.pid", os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(pid_fd, "w") as f:
            f.write(str(os.getpid()))
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        # A container left running by a shim that was killed: remove it, so one runs.
        self.runc.delete(self.id)
        log = RotatingLog(self.dir / "logs", int(self.cfg.get("log_max_bytes", 4 << 20)),
                          int(self.cfg.get("log_keep", 3)))
        policy = self.cfg.get("restart", "on-failure")
        backoff = BACKOFF_START
        try:
            while not self.stop.is_set():
                if self.restarts or self.cfg.get("check_first", False):
                    problem = self.check_image()
                    if problem:
                        self.status("error", f"image refused before start: {problem}")
                        return 1
                try:
                    code = self.run_once(log)
                except Exception as exc:  # a failed mount or runc spawn: report, don't loop
                    self.status("error", f"start failed: {exc}")
                    return 1
                self.last_exit = code
                ran = time.time() - self.started_at
                how = f"exited with {code}" + (" (out of memory)" if self.oom_killed else "")
                log.write("shim", f"container {how} after {ran:.1f}s".encode())
                if self.stop.is_set():
                    break
                if policy == "never" or (policy == "on-failure" and code == 0):
                    self.status("exited", how)
                    return 0
                if ran > STABLE_AFTER:
                    backoff = BACKOFF_START
                self.status("backoff", f"{how}; restarting in {backoff:.1f}s",
                            retry_at=time.time() + backoff)
                if self.stop.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
                self.restarts += 1
            self.status("stopped", "stopped on request")
            return 0
        finally:
            log.close()
            try:
                unmount_rootfs(Layout.from_dict(self.cfg["layout"]))
            except Exception as exc:
                self.status("error", f"cleanup failed: {exc}")


def main() -> None:
    directory = Path(sys.argv[1])
    # Detach: the agent that started us returns at once and never has to reap us.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    sys.exit(Shim(directory).main())


if __name__ == "__main__":
    main()
