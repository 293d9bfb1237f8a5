"""Thin, typed calls to the runc CLI and the host mounts a container bundle needs."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from zerostack.node.runtime.spec import ContainerError

RUNC = "/usr/sbin/runc"
MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Runc:
    """runc with its own state directory (`--root`), so nodes and tests never collide."""

    def __init__(self, state_root: Path, binary: str = RUNC) -> None:
        self.root = state_root
        self.binary = binary

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def _run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise ContainerError(f"{self.binary} is not installed on this node") from None
        except subprocess.TimeoutExpired:
            raise ContainerError(f"runc {args[0]} timed out") from None
        if check and proc.returncode != 0:
            raise ContainerError(f"runc {args[0]} failed: {proc.stderr.strip()[:300]}")
        return proc

    def state(self, container_id: str) -> dict[str, Any] | None:
        """runc's state of the container (status, pid…), or None when runc does not know it."""
        proc = self._run("state", container_id, check=False)
        if proc.returncode != 0:
            return None
        try:
            data: dict[str, Any] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return None
        return data

    def kill(self, container_id: str, signal: str = "TERM") -> None:
        self._run("kill", container_id, signal, check=False)

    def delete(self, container_id: str) -> None:
        """Force-delete (kills what still runs, removes cgroups and state); absent is fine."""
        self._run("delete", "--force", container_id, check=False)

    def list(self) -> list[str]:
        proc = self._run("list", "--format", "json", check=False)
        try:
            return [c["id"] for c in json.loads(proc.stdout or "[]") or []]
        except (json.JSONDecodeError, TypeError, KeyError):
            return []


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def unmount(target: Path) -> None:
    """Unmount `target` (lazily if busy); nothing mounted is fine."""
    while is_mounted(target):
        if (_libc.umount2(str(target).encode(), 0) != 0
                and _libc.umount2(str(target).encode(), MNT_DETACH) != 0):
            err = ctypes.get_errno()
            raise ContainerError(f"unmounting {target} failed: {os.strerror(err)}")
