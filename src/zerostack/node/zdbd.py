"""The node's own Zero-DB server: started as a child process and restarted if it dies.

Its admin password is generated once and kept (mode 0600) in the node's data dir; only
the zdb provisioner uses it. Data goes on an HDD pool when the node has one, in a 0700
directory: it is tenant data.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

from zerostack.node.hostfs import create_private, private_dir, restrict, restrict_tree
from zerostack.node.provisioners import Pool

log = logging.getLogger("zerostack.node.zdbd")


def admin_password(data_dir: Path) -> str:
    path = data_dir / "zdb-admin.secret"
    if path.exists():
        restrict(path)
        return path.read_text().strip()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pwd = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pwd)
    return pwd


def zdb_dirs(data_dir: Path, pools: list[Pool]) -> tuple[Path, Path]:
    """(data, index) dirs: data on an HDD pool if any ("optimized for HD"), index beside it."""
    hdd = [p for p in pools if p.kind == "hdd"]
    base = (hdd[0].path if hdd else (pools[0].path if pools else data_dir)) / "zdb"
    return base / "data", base / "index"


def _child_setup() -> None:
    # Runs in the child before exec: if the agent is killed (even with -9), so is its zdb,
    # and the restarted agent starts a fresh one on the same files. Its files hold tenant
    # data: created without group or other access.
    os.umask(0o077)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def connect_address(listen: str) -> str:
    """Where to reach a server listening on `listen`: itself, or loopback for a wildcard."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen, listen)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


class ZdbServer:
    """Supervises `zerostack zdb` for this node."""

    def __init__(self, data_dir: Path, pools: list[Pool], port: int,
                 listen: str = "127.0.0.1") -> None:
        self.port = port
        self.listen = listen
        self.admin = admin_password(data_dir)
        self.data, self.index = zdb_dirs(data_dir, pools)
        self.log_path = data_dir / "zdb.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._modes_checked = False  # older files made private once per run

    def _args(self) -> list[str]:
        # The admin password goes in the environment, not argv: argv is world-readable.
        return [sys.executable, "-m", "zerostack.cli.main", "zdb", "--listen", self.listen,
                "--port", str(self.port), "--data", str(self.data), "--index", str(self.index)]

    async def _spawn(self) -> None:
        base = self.data.parent
        if base.is_dir() and not base.is_symlink() and not self._modes_checked:
            restrict_tree(base)  # files an older version left readable
        self._modes_checked = True
        for d in (base, self.data, self.index):
            private_dir(d)
        with os.fdopen(create_private(self.log_path), "ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                *self._args(), stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "ZEROSTACK_ZDB_ADMIN": self.admin},
                preexec_fn=_child_setup)
        with os.fdopen(create_private(self.log_path.with_name("zdb.pid"),
                                      os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(str(self.proc.pid))
        log.info("event=zdb_started pid=%s port=%s", self.proc.pid, self.port)

    async def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it accepts connections."""
        await self.spawn()
        await self.ready(timeout)

    async def spawn(self) -> None:
        """Start the process without waiting for it (the agent registers meanwhile)."""
        await self._reap_previous()
        deadline = time.monotonic() + 5
        while _listening(connect_address(self.listen), self.port):
            # The previous agent's server may still be dying (it gets SIGKILL when its
            # parent dies, asynchronously); anything else on the port is a real conflict.
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} is taken; choose another with --zdb-port")
            await asyncio.sleep(0.1)
        await self._spawn()

    async def _reap_previous(self) -> None:
        """Kill a Zero-DB a previous run of this agent left behind (same pid file and dirs)."""
        pid_path = self.log_path.with_name("zdb.pid")
        try:
            pid = int(pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"zdb" in cmdline and str(self.data).encode() in cmdline:
            log.warning("event=zdb_stale pid=%s action=kill", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    return
                await asyncio.sleep(0.1)

    async def ready(self, timeout: float = 15.0) -> None:
        """Wait until the server accepts connections, then supervise it."""
        deadline = time.monotonic() + timeout
        while not _listening(connect_address(self.listen), self.port):
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"Zero-DB exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Zero-DB did not listen on port {self.port} in {timeout}s")
            await asyncio.sleep(0.05)
        self._task = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        backoff = 0.2
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("event=zdb_exited code=%s restart_in=%.1fs", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
