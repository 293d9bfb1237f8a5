"""The gateway's TLS front: HAProxy (Debian) in TCP mode on :443, run only while the node
serves at least one `tls_passthrough` host. It reads the SNI of each client's TLS hello
without terminating it: a passthrough host's connection goes untouched to that host's
backends (the gateway never holds their key), every other name to Caddy's HTTPS server on
loopback (`config.BEHIND_FRONT`). A connection that does not start with a TLS hello
naming a host is closed.

Caddy 2.6 (Debian) has no PROXY-protocol listener, so behind the front Caddy sees the
front (127.0.0.1) as the client of every HTTPS request; the front is therefore started
only when a passthrough host needs it.

`render` is pure (routes in, configuration text out). `Front` runs HAProxy in
master-worker mode; its only control channel is the master's unix socket (mode 0600 in
the gateway's 0700 folder), through which the agent asks for a reload: the new worker
takes the listening sockets over from the old one, which finishes the connections it
holds, so a reload drops nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from zerostack.gateway.caddy import Caddy
from zerostack.gateway.config import BEHIND_FRONT, HTTPS_PORT, PUBLIC_HTTPS, Route
from zerostack.gateway.errors import GatewayError
from zerostack.gateway.stale import stop_child, stop_stale
from zerostack.node.hostfs import create_private, private_dir

log = logging.getLogger("zerostack.gateway.front")

HELLO_WAIT = "5s"
"""How long the front waits for a client's TLS hello before closing the connection."""
MAX_CONNECTIONS = 4096
IDLE_TIMEOUT = "10m"
START_TIMEOUT = 10.0
CLI_TIMEOUT = 5.0
MAX_ANSWER = 1 << 16


def backend_name(route: Route) -> str:
    """HAProxy's name for a route's backend (route ids are not HAProxy identifiers)."""
    return "pt_" + hashlib.sha256(route.id.encode()).hexdigest()[:16]


def _server(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render(routes: list[Route], stats_socket: str, user: str = "haproxy") -> str:
    """HAProxy's configuration for the passthrough routes among `routes` (hosts and
    addresses were validated by the workload types: names of `a-z 0-9 - .`, IPs)."""
    passthrough = sorted((r for r in routes if r.passthrough), key=lambda r: (r.host, r.id))
    lines = [
        "# the gateway's TLS front, written by the node agent from its contracts",
        "global",
        f"    maxconn {MAX_CONNECTIONS}",
        *([f"    user {user}", f"    group {user}"] if user else []),
        f"    stats socket {stats_socket} mode 600 level admin expose-fd listeners",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        f"    timeout client {IDLE_TIMEOUT}",
        f"    timeout server {IDLE_TIMEOUT}",
        "    timeout client-fin 10s",
        "    timeout server-fin 10s",
        "frontend tls",
        f"    bind :::{HTTPS_PORT} v4v6",
        f"    maxconn {MAX_CONNECTIONS}",
        f"    tcp-request inspect-delay {HELLO_WAIT}",
        # anything but a TLS client hello naming a host is closed, by itself alone
        "    tcp-request content reject unless { req.ssl_hello_type 1 }",
        "    tcp-request content reject unless { req.ssl_sni -m found }",
    ]
    for r in passthrough:
        if r.paused:  # its contract is in grace: nothing reaches the backends
            lines.append(f"    tcp-request content reject if {{ req.ssl_sni -i {r.host} }}")
    for r in passthrough:
        if not r.paused:
            lines.append(f"    use_backend {backend_name(r)} if {{ req.ssl_sni -i {r.host} }}")
    lines += ["    default_backend caddy",
              "backend caddy",
              f"    server caddy {BEHIND_FRONT}"]
    for r in passthrough:
        if r.paused:
            continue
        lines += [f"backend {backend_name(r)}",
                  f"    # {r.id}: {r.host}",
                  "    balance roundrobin",
                  "    option redispatch",
                  "    retries 2"]
        lines += [f"    server s{i} {_server(u.address, u.port)} check inter "
                  f"{r.health_interval}s fall 2 rise 1"
                  for i, u in enumerate(r.upstreams)]
    return "\n".join(lines) + "\n"


class Front:
    """HAProxy under `root` (`<node data>/gateway/front`), started on demand, reloaded
    through its master socket, started again when found dead, stopped with the agent or
    when the last passthrough route goes."""

    def __init__(self, root: Path, binary: str = "haproxy", user: str = "haproxy") -> None:
        self.root = root
        self.binary = binary
        self.user = user
        self._proc: subprocess.Popen[bytes] | None = None
        self._served: str = ""
        self._lock = threading.RLock()

    @property
    def config_file(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def master_socket(self) -> Path:
        return self.root / "master.sock"

    @property
    def stats_socket(self) -> Path:
        return self.root / "haproxy.sock"

    @property
    def _pidfile(self) -> Path:
        return self.root / "haproxy.pid"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def serves(self, route: Route) -> bool:
        """Whether the running front forwards `route`'s host (or rejects it, paused)."""
        with self._lock:
            return self.running() and f"{{ req.ssl_sni -i {route.host} }}" in self._served

    def _write(self, text: str) -> None:
        """Check `text` with HAProxy itself, then put it in place (mode 0600)."""
        private_dir(self.root)
        tmp = self.root / ".haproxy.cfg.tmp"
        tmp.unlink(missing_ok=True)
        with os.fdopen(create_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(text)
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(tmp)], capture_output=True,
                               text=True, timeout=30, check=False)
        if check.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise GatewayError(f"haproxy refused the front's configuration: "
                               f"{(check.stderr or check.stdout)[-400:]}")
        os.replace(tmp, self.config_file)

    def load(self, routes: list[Route]) -> None:
        """Make the front forward exactly the passthrough routes of `routes`: started if it
        is not running, reloaded (without dropping a connection) if it changed."""
        text = render(routes, str(self.stats_socket), self.user)
        with self._lock:
            if self.running() and text == self._served:
                return
            self._write(text)
            if self.running():
                self._reload()
            else:
                self._start()
            self._served = text

    def _start(self) -> None:
        if self._proc is not None:
            log.warning("event=front_died code=%s", self._proc.returncode)
            self._proc = None
        stop_stale(self._pidfile, str(self.config_file))
        for sock in (self.master_socket, self.stats_socket):
            sock.unlink(missing_ok=True)
        with os.fdopen(create_private(self.root / "haproxy.log"), "ab") as out:
            try:
                self._proc = subprocess.Popen(
                    [self.binary, "-W", "-f", str(self.config_file),
                     "-S", f"{self.master_socket},mode,600"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.root,
                    env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")})
            except OSError as exc:
                raise GatewayError(f"cannot start haproxy: {exc}") from None
        with os.fdopen(create_private(self._pidfile, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(f"{self._proc.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while self._workers() < 1:
            if self._proc.poll() is not None:
                raise GatewayError(f"haproxy exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise GatewayError(f"haproxy did not start in {START_TIMEOUT:.0f}s: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        log.info("event=front_started pid=%s", self._proc.pid)

    def cli(self, command: str) -> str:
        """One command on the master's unix socket; its answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(CLI_TIMEOUT)
                s.connect(str(self.master_socket))
                s.sendall(command.encode() + b"\n")
                s.shutdown(socket.SHUT_WR)
                out = b""
                while len(out) < MAX_ANSWER:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out += chunk
        except OSError as exc:
            raise GatewayError(f"haproxy's master socket: {exc}") from None
        return out.decode(errors="replace")

    def _proc_table(self) -> tuple[int, int]:
        """(reloads, current workers) from the master's `show proc`; (-1, 0) if it does not
        answer yet."""
        try:
            lines = self.cli("show proc").splitlines()
        except GatewayError:
            return -1, 0
        reloads, workers = -1, 0
        for line in lines:
            words = line.split()
            if len(words) >= 3 and words[1] == "master" and words[2].isdigit():
                reloads = int(words[2])
            elif len(words) >= 3 and words[1] == "worker" and words[2] == "0":
                workers += 1  # a worker of the current generation (0 reloads old)
        return reloads, workers

    def _workers(self) -> int:
        return self._proc_table()[1]

    def _reload(self) -> None:
        before, _ = self._proc_table()
        self.cli("reload")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            reloads, workers = self._proc_table()
            if reloads > before and workers >= 1:
                break
            if self._proc is None or self._proc.poll() is not None:
                raise GatewayError(f"haproxy exited while reloading: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise GatewayError(f"haproxy did not reload in {START_TIMEOUT:.0f}s: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        log.info("event=front_reloaded reloads=%d", reloads)

    def stop(self) -> None:
        """Stop taking connections; those open are finished by the old worker (SIGUSR1,
        soft stop), which is killed only if still there after 5 s."""
        with self._lock:
            stop_child(self._proc, signal.SIGUSR1)
            self._proc = None
            self._served = ""
            stop_stale(self._pidfile, str(self.config_file))

    def log_tail(self, size: int = 600) -> str:
        try:
            with open(self.root / "haproxy.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def serve(caddy: Caddy, front: Front, routes: list[Route]) -> None:
    """Make Caddy and the TLS front serve `routes`. The front runs only while a
    passthrough route needs it, Caddy's HTTPS server then on loopback behind it. Both bind
    :443 with SO_REUSEPORT, so while one takes over from the other Caddy listens on both
    addresses and no client meets a closed port. GatewayError when either refuses."""
    both = (*PUBLIC_HTTPS, BEHIND_FRONT)
    if any(r.passthrough for r in routes):
        if not front.running():
            caddy.load(routes, both)
        front.load(routes)
        caddy.load(routes, (BEHIND_FRONT,))
    else:
        if front.running():
            caddy.load(routes, both)
        front.stop()  # also one an agent killed with -9 left running
        caddy.load(routes, PUBLIC_HTTPS)
