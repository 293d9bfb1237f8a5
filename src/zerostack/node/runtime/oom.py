"""Notice when the kernel's OOM killer strikes inside a container (cgroup v1 memory).

The shim creates the container's memory cgroup before runc joins it and registers an
eventfd on `memory.oom_control`, so a kill is seen even when it ends the container at
once (runc then removes the cgroup, and with it the counter). Standard library only.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def _oom_kills(cgroup: Path) -> int:
    try:
        for line in (cgroup / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


class OomWatch:
    """Watches one container run; `killed` turns True when the OOM killer acted in it."""

    def __init__(self, cgroup_rel: str) -> None:
        self.cgroup = MEMORY_ROOT / cgroup_rel.lstrip("/")
        self.killed = False
        self.oom_event = False
        self._efd = -1
        self._thread: threading.Thread | None = None

    def start(self) -> OomWatch:
        if not MEMORY_ROOT.is_dir():
            return self  # cgroup v2 or no memory controller: exit codes only
        try:
            self.cgroup.mkdir(parents=True, exist_ok=True)
            self._efd = os.eventfd(0, os.EFD_CLOEXEC)
            ctl = os.open(self.cgroup / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(self.cgroup / "cgroup.event_control", "w") as f:
                    f.write(f"{self._efd} {ctl}")
            finally:
                os.close(ctl)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._wait, daemon=True, name="oom-watch")
        self._thread.start()
        return self

    def _wait(self) -> None:
        # The eventfd fires when the cgroup hits OOM (just before the killer picks its
        # victim) and when the cgroup is removed. After an OOM event, watch the kill
        # counter until it moves or the cgroup goes away.
        try:
            while True:
                os.eventfd_read(self._efd)
                if not self.cgroup.exists():
                    return
                self.oom_event = True
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline and self.cgroup.exists():
                    if _oom_kills(self.cgroup) > 0:
                        self.killed = True
                        break
                    time.sleep(0.001)
        except OSError:
            return

    def poll(self) -> None:
        """Cheap extra check while the container runs (the eventfd is the main path)."""
        if _oom_kills(self.cgroup) > 0:
            self.killed = True

    def stop(self, exit_code: int) -> bool:
        """Whether the run that ended with `exit_code` was an OOM kill."""
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self._efd >= 0 and (self._thread is None or not self._thread.is_alive()):
            os.close(self._efd)
            self._efd = -1
        # An OOM event then a SIGKILL exit is the killer's work even if the counter
        # vanished with the cgroup before it could be read.
        return self.killed or (self.oom_event and exit_code == 137)
