"""The node's own Zero-DB server: started as a child process and restarted if it dies.

Its admin password is generated once and kept (mode 0600) in the node's data dir; only
the zdb provisioner uses it. Data goes on an HDD pool when the node has one, in a 0700
directory: it is tenant data.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
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


class NamespaceServer:
    """The Zero-DB server of one replicated namespace (`zdb` workload with `replication`).

    Replication in `zerostack zdb` follows a whole server, so a namespace that replicas
    follow gets a server of its own, holding nothing else; a replica is a server started
    with `--replica-of` the primary's. Each lives in `root` (0700): its data and index
    files, its admin password (0600), log and pid file. The replication password and the
    admin password go to the process in its environment, never in its argv.

    Synchronous: the zdb provisioner calls it from the agent's worker thread. The process
    is killed with the agent (as the node's own Zero-DB); the provisioner starts it again.
    """

    def __init__(self, root: Path, listen: str, port: int) -> None:
        self.root = root
        self.listen = listen
        self.port = port
        self.data, self.index = root / "data", root / "index"
        self.log_path = root / "zdb.log"
        self.pid_path = root / "zdb.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return connect_address(self.listen)

    def admin(self) -> str:
        return admin_password(self.root)

    def _pid(self) -> int | None:
        """The pid of this server's running process (from its pid file), if it runs."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # reaped
        try:
            pid = int(self.pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.data).encode() in cmdline.split(b"\0") else None

    def running(self) -> bool:
        return self._pid() is not None and _listening(self.address, self.port)

    def start(self, replication_password: str, replica_of: str = "",
              timeout: float = 15.0) -> None:
        """Start the server unless it runs already; wait until it listens."""
        if self.running():
            return
        self.stop()
        if _listening(self.address, self.port):
            raise RuntimeError(f"port {self.port} is taken on this node: deploy again "
                               "for another port")
        for d in (self.root, self.data, self.index):
            private_dir(d)
        args = [sys.executable, "-m", "zerostack.cli.main", "zdb", "--listen", self.listen,
                "--port", str(self.port), "--data", str(self.data), "--index", str(self.index),
                "--protect"]
        if replica_of:
            args += ["--replica-of", replica_of]
        env = {**os.environ, "ZEROSTACK_ZDB_ADMIN": self.admin(),
               "ZEROSTACK_ZDB_REPLICATION_PASSWORD": replication_password}
        env.pop("ZEROSTACK_ZDB_PRIMARY_AUTH", None)
        with os.fdopen(create_private(self.log_path), "ab") as logf:
            self._proc = subprocess.Popen(args, stdout=logf, stderr=logf,
                                          stdin=subprocess.DEVNULL, env=env,
                                          preexec_fn=_child_setup)
        with os.fdopen(create_private(self.pid_path, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(str(self._proc.pid))
        log.info("event=zdb_namespace_server_started pid=%s port=%s replica=%s",
                 self._proc.pid, self.port, bool(replica_of))
        deadline = time.monotonic() + timeout
        while not _listening(self.address, self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(f"its Zero-DB exited with {self._proc.returncode} "
                                   "(the node's log of it says why)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"its Zero-DB did not listen on port {self.port} in "
                                   f"{timeout:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the process (if it runs); the files stay."""
        pid = self._pid()
        if pid is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.pid == pid:
                    if self._proc.poll() is not None:
                        self._proc = None
                        return
                elif not Path(f"/proc/{pid}").exists():
                    return
                time.sleep(0.05)
        self._proc = None

    def remove(self) -> None:
        """Stop the process and delete every file of the namespace."""
        self.stop()
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.root)  # does not follow links below root
        else:
            self.root.unlink()


def endpoint_address(endpoint: str) -> str:
    """The IP address in a node's registered endpoint (`198.18.0.10`, `1.2.3.4:7000`,
    `[fd00::1]:7000`, `http://…`), or '' when it holds none."""
    host = endpoint.split("://", 1)[-1]
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return ""
