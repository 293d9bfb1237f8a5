"""LocalGrid: start a ledger server and node agents as child processes on loopback.

Every part is the real program (`zerostack ledger serve`, `zerostack node run`, each node
with its own Zero-DB); the grid only starts them, waits until they answer, and stops
them. Used by `zerostack demo` and by anyone who wants a grid to try contracts on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zerostack.crypto import Identity, load_identity, save_identity
from zerostack.ledger import LedgerClient


class GridError(Exception):
    """A grid process that did not start or answer, with the tail of its log."""


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "zerostack"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zerostack.cli.main"]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


@dataclass
class GridNode:
    name: str
    data: Path
    zdb_port: int
    proc: subprocess.Popen[bytes]
    node_id: int = 0


@dataclass
class LocalGrid:
    """A ledger on `ledger_port` and nodes whose Zero-DBs listen from `zdb_base_port` up.

    Identities live under `<home>/identities` as ordinary key files, so the `zerostack`
    CLI works against the grid with ZEROSTACK_HOME=<home> and ZEROSTACK_LEDGER=<url>.
    """

    root: Path
    ledger_port: int = 7700
    zdb_base_port: int = 9901
    nodes: list[GridNode] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    farm: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ledger_port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen([*_cli(), *args], stdout=log, stderr=log,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _wait(self, what: str, name: str, proc: subprocess.Popen[bytes], ready: object,
              timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GridError(f"{what} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if callable(ready) and ready():
                return
            time.sleep(0.05)
        raise GridError(f"{what} did not come up in {timeout:.0f}s:\n{self.log_tail(name)}")

    def identity(self, name: str) -> Identity:
        """The grid's identity NAME, created (mode 0600) on first use."""
        path = self.home / "identities" / f"{name}.key"
        if path.exists():
            return load_identity(path)
        ident = Identity.generate()
        save_identity(ident, path, name)
        return ident

    def start_ledger(self) -> LedgerClient:
        if _port_open(self.ledger_port):
            raise GridError(f"port {self.ledger_port} is taken: is another grid running?")
        self.root.mkdir(parents=True, exist_ok=True)
        proc = self._start("ledger", ["ledger", "serve", "--db", str(self.root / "ledger.db"),
                                      "--listen", f"127.0.0.1:{self.ledger_port}"])
        self._wait("the ledger", "ledger", proc, lambda: _port_open(self.ledger_port))
        client = LedgerClient(self.url)
        farmer = self.identity("farmer")
        client.register_twin(farmer)
        self.farm = client.create_farm(farmer, "demo-farm")
        return client

    def start_node(self, client: LedgerClient, name: str, *extra: str) -> GridNode:
        port = self.zdb_base_port + len(self.nodes)
        if _port_open(port):
            raise GridError(f"port {port} for {name}'s Zero-DB is taken")
        data = self.root / name
        proc = self._start(name, ["node", "run", "--ledger", self.url, "--farm", str(self.farm),
                                  "--data", str(data), "--zdb-port", str(port),
                                  "--heartbeat", "5", "--resync", "5", *extra])
        node = GridNode(name, data, port, proc)

        def registered() -> bool:
            key = data / "identity.key"
            if not key.exists():
                return False
            twin = client.twin_by_key(load_identity(key).public_hex)
            found = client.nodes(twin=twin["id"]) if twin else []
            if found:
                node.node_id = int(found[0]["id"])
            return bool(found)

        self._wait(f"node {name}", name, proc, registered)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after a grace period)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for log in self._logs:
            log.close()
        self._procs.clear()
        self._logs.clear()
