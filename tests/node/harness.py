"""A small grid for node tests: a real ledger server, a farm, users, and node agents."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd
from zerostack.bot import ThreeBot
from zerostack.crypto import Identity
from zerostack.ledger import LedgerClient


class Grid:
    """Ledger + farm; start node agents and users on it. Processes die with `procs`."""

    def __init__(self, procs: ProcessGroup, tmp: Path, *ledger_args: str) -> None:
        self.procs = procs
        self.tmp = tmp
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.ledger_log = open(tmp / "ledger.log", "wb")  # noqa: SIM115 - closed by the OS
        proc = procs.start([*zerostack_cmd(), "ledger", "serve", "--db", str(tmp / "ledger.db"),
                            "--listen", f"127.0.0.1:{port}", *ledger_args],
                           stdout=self.ledger_log, stderr=self.ledger_log)
        wait_for_port(port, proc=proc)
        self.client = LedgerClient(self.url)
        self.farmer = Identity.generate()
        self.client.register_twin(self.farmer)
        self.farm = self.client.create_farm(self.farmer, f"farm{port}")

    def user(self) -> tuple[Identity, int]:
        ident = Identity.generate()
        return ident, self.client.register_twin(ident)

    def start_node(self, name: str = "node", *extra: str, zdb_port: int | None = None,
                   ledger: str | None = None) -> tuple[Any, int, Path]:
        """Start an agent; returns (process, zdb port, data dir) once it is registered."""
        data = self.tmp / name
        zdb_port = zdb_port or free_port()
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = self.procs.start(
            [*zerostack_cmd(), "node", "run", "--ledger", ledger or self.url,
             "--farm", str(self.farm),
             "--data", str(data), "--zdb-port", str(zdb_port), "--resync", "1",
             "--heartbeat", "2", *extra],
            stdout=log, stderr=log)
        return proc, zdb_port, data

    def ready_node(self, name: str = "node", *extra: str) -> tuple[Any, int, Path, int]:
        """start_node() and wait for its registration: (process, zdb port, data, node id)."""
        proc, zdb_port, data = self.start_node(name, *extra)
        return proc, zdb_port, data, self.node_id(data, proc)

    def node_id(self, data: Path, proc: Any, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"node agent exited with {proc.returncode}: "
                                   f"{self.log_tail(data.name)}")
            key = data / "identity.key"
            if key.exists():
                twin = self.client.twin_by_key(json.loads(key.read_text())["public"])
                if twin is not None:
                    nodes = self.client.nodes(twin=twin["id"])
                    if nodes:
                        return int(nodes[0]["id"])
            time.sleep(0.05)
        raise TimeoutError(f"node did not register: {self.log_tail(data.name)}")

    def log_tail(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-3000:]

    def bot(self, ident: Identity) -> ThreeBot:
        return ThreeBot(self.url, ident)

    def deploy(self, ident: Identity, twin: int, workloads: list[dict[str, Any]], node: int,
               stakeholders: list[str] = (), weight: int | None = None) -> tuple[int, Any]:
        with self.bot(ident) as bot:
            dep = bot.build({"workloads": workloads}, list(stakeholders), weight)
            return bot.deploy(dep, node), dep

    def wait_contract(self, cid: int, states: set[str], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        c: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            c = self.client.contract(cid)
            if c is not None and c["state"] in states and (
                    c["state"] in ("deleted", "cancelled", "created") or c.get("report")):
                return c
            time.sleep(0.05)
        raise TimeoutError(f"contract {cid} is not in {states}: {c}")
