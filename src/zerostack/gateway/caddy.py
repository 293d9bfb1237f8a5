"""One Caddy process per gateway node, run in the node's own network namespace, and its
admin API, reached on a unix socket only (mode 0600 in a 0700 folder): never a network
address. The whole configuration is pushed at once (`POST /load`) from the routes the
node serves, so a new Caddy after a crash holds exactly what the contracts say."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from zerostack.gateway.config import PUBLIC_HTTPS, Route, render
from zerostack.gateway.errors import GatewayError
from zerostack.gateway.stale import stop_child, stop_stale
from zerostack.node.hostfs import create_private, private_dir

log = logging.getLogger("zerostack.gateway")

START_TIMEOUT = 15.0
ADMIN_TIMEOUT = 10.0
MAX_ANSWER = 1 << 20
GOGC = "400"
"""Go's collector target for Caddy (default 100): collect when the heap has grown 4x past
what was live, not 1x. Measured in docs/benchmarks.md (Zero-GW gateways)."""


class Caddy:
    """The node's Caddy under `root` (`<node data>/gateway`): started on demand, started
    again when found dead, stopped with the agent."""

    def __init__(self, root: Path, acme_email: str = "", binary: str = "caddy") -> None:
        self.root = root
        self.acme_email = acme_email
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self.https_listen: tuple[str, ...] = PUBLIC_HTTPS
        """Where the HTTPS server listens (the last `load` says; a restart keeps it)."""

    # ---- paths ------------------------------------------------------------------------

    @property
    def admin_socket(self) -> Path:
        return self.root / "caddy-admin.sock"

    @property
    def storage(self) -> Path:
        """Certificates, keys and the internal CA."""
        return self.root / "caddy"

    @property
    def root_certificate(self) -> Path:
        """The internal CA's root: what clients of a test grid trust."""
        return self.storage / "pki" / "authorities" / "local" / "root.crt"

    @property
    def _pidfile(self) -> Path:
        return self.root / "caddy.pid"

    @property
    def _bootstrap(self) -> Path:
        return self.root / "caddy.json"

    # ---- process ----------------------------------------------------------------------

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _stop_stale(self) -> None:
        """A Caddy left by an agent killed with -9 still holds its ports: stop it."""
        stop_stale(self._pidfile, str(self._bootstrap))

    def ensure_running(self, routes: list[Route]) -> bool:
        """Start Caddy with `routes` unless it runs; True when it was (re)started."""
        with self._lock:
            if self.running():
                return False
            if self._proc is not None:
                log.warning("event=caddy_died code=%s", self._proc.returncode)
                self._proc = None
            private_dir(self.root)
            private_dir(self.storage)  # TLS keys and the internal CA
            self._stop_stale()
            self.admin_socket.unlink(missing_ok=True)
            with os.fdopen(create_private(self._bootstrap, os.O_WRONLY | os.O_TRUNC), "w") as f:
                f.write(json.dumps(self.render(routes)))
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "HOME": str(self.root), "XDG_DATA_HOME": str(self.storage),
                   "XDG_CONFIG_HOME": str(self.root / "config"),
                   # a proxy's live heap is small and its garbage per request large: fewer
                   # collections cost about a tenth of Caddy's CPU per request less
                   "GOGC": GOGC}
            with os.fdopen(create_private(self.root / "caddy.log"), "ab") as out:
                try:
                    self._proc = subprocess.Popen(
                        [self.binary, "run", "--config", str(self._bootstrap)],
                        stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                        cwd=self.root)
                except OSError as exc:
                    raise GatewayError(f"cannot start caddy: {exc}") from None
            with os.fdopen(create_private(self._pidfile, os.O_WRONLY | os.O_TRUNC), "w") as f:
                f.write(f"{self._proc.pid}\n")
            deadline = time.monotonic() + START_TIMEOUT
            while not self._answers():
                if self._proc.poll() is not None:
                    raise GatewayError(f"caddy exited with {self._proc.returncode}: "
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise GatewayError(f"caddy's admin socket did not answer in "
                                       f"{START_TIMEOUT:.0f}s: {self.log_tail()}")
                time.sleep(0.05)
            os.chmod(self.admin_socket, 0o600)
            log.info("event=caddy_started pid=%s routes=%d", self._proc.pid, len(routes))
            return True

    def stop(self) -> None:
        with self._lock:
            stop_child(self._proc)
            self._proc = None

    def log_tail(self, size: int = 600) -> str:
        try:
            with open(self.root / "caddy.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # ---- admin API --------------------------------------------------------------------

    def render(self, routes: list[Route]) -> dict[str, Any]:
        return render(routes, str(self.admin_socket), str(self.storage), self.acme_email,
                      self.https_listen)

    def _client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.admin_socket)),
                            base_url="http://localhost", timeout=ADMIN_TIMEOUT)

    def _answers(self) -> bool:
        if not self.admin_socket.exists():
            return False
        try:
            with self._client() as c:
                return c.get("/config/").status_code == 200
        except httpx.HTTPError:
            return False

    def load(self, routes: list[Route], https_listen: tuple[str, ...] | None = None) -> None:
        """Make Caddy serve exactly `routes` (starting it first if it is not running), its
        HTTPS server on `https_listen` (unchanged when None)."""
        with self._lock:
            if https_listen is not None:
                self.https_listen = https_listen
            if self.ensure_running(routes):
                return
            try:
                with self._client() as c:
                    r = c.post("/load", json=self.render(routes))
            except httpx.HTTPError as exc:
                raise GatewayError(f"caddy's admin API: {exc}") from None
            if r.status_code != 200:
                raise GatewayError(f"caddy refused the configuration: "
                                   f"{r.text[:400]}")

    def has_route(self, route_id: str) -> bool:
        """Whether the running Caddy serves the route `route_id`."""
        with self._lock:
            if not self.running():
                return False
            try:
                with self._client() as c:
                    return c.get(f"/id/{route_id}").status_code == 200
            except httpx.HTTPError:
                return False

    def config(self) -> dict[str, Any]:
        """The running configuration (for tests and `node status`)."""
        try:
            with self._client() as c:
                r = c.get("/config/")
        except httpx.HTTPError as exc:
            raise GatewayError(f"caddy's admin API: {exc}") from None
        if len(r.content) > MAX_ANSWER:
            raise GatewayError("caddy's configuration is too large to read")
        data = r.json()
        return data if isinstance(data, dict) else {}
