"""The node's local record of what it runs (actual state) and what it last reported, in SQLite.

Written before and after every provisioning step, so a restart after a crash knows
exactly which workloads were in flight. It holds opened deployments (secret env,
passwords): the database and its WAL files are 0600.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from zerostack.node.hostfs import restrict
from zerostack.node.provisioners.base import WorkloadID

SCHEMA = """
CREATE TABLE IF NOT EXISTS workloads (
    contract INTEGER NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    spec TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    updated REAL NOT NULL,
    PRIMARY KEY (contract, name)
);
CREATE TABLE IF NOT EXISTS contracts (
    id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0,
    hash TEXT NOT NULL DEFAULT '',
    deployment TEXT NOT NULL DEFAULT '{}',
    owner_key TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    reported TEXT NOT NULL DEFAULT '',
    refused TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (hash TEXT PRIMARY KEY, contract INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class WorkloadRecord:
    """One workload as the node last left it."""

    wid: WorkloadID
    type: str
    spec: dict[str, Any]
    spec_hash: str
    state: str  # init | ok | error
    message: str
    result: dict[str, Any]


@dataclass(frozen=True)
class ContractRecord:
    """A contract as the node last handled it: active, refused (with why), or removed."""

    id: int
    version: int
    hash: str
    deployment: dict[str, Any]
    owner_key: str
    status: str  # active | refused | cancelled
    message: str  # why the last version was refused, if it was
    reported: str  # hash of the last report posted
    refused: str = ""  # deployment hash of a version this node refused


class NodeState:
    """Thread-safe SQLite store (the executor runs in worker threads)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLite gives its -wal and -shm files the database file's mode: create it 0600,
        # and close the files an older version left readable.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm", f"{path.name}-journal"):
            restrict(path.with_name(name))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # workloads

    def put_workload(self, rec: WorkloadRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO workloads VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.wid.contract, rec.wid.name, rec.type, orjson.dumps(rec.spec).decode(),
                 rec.spec_hash, rec.state, rec.message, orjson.dumps(rec.result).decode(),
                 time.time()),
            )

    def delete_workload(self, wid: WorkloadID) -> None:
        with self._lock:
            self._db.execute("DELETE FROM workloads WHERE contract=? AND name=?",
                             (wid.contract, wid.name))

    def workloads(self, contract: int | None = None) -> list[WorkloadRecord]:
        q = "SELECT contract,name,type,spec,spec_hash,state,message,result FROM workloads"
        args: tuple[Any, ...] = ()
        if contract is not None:
            q, args = q + " WHERE contract=?", (contract,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY contract, name", args).fetchall()
        return [
            WorkloadRecord(WorkloadID(c, n), t, orjson.loads(s), h, st, m, orjson.loads(r))
            for c, n, t, s, h, st, m, r in rows
        ]

    # contracts

    def put_contract(self, rec: ContractRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO contracts VALUES (?,?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.version, rec.hash, orjson.dumps(rec.deployment).decode(),
                 rec.owner_key, rec.status, rec.message, rec.reported, rec.refused,
                 time.time()),
            )

    def contract(self, cid: int) -> ContractRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id,version,hash,deployment,owner_key,status,message,reported,refused "
                "FROM contracts WHERE id=?", (cid,)).fetchone()
        return None if row is None else self._contract(row)

    def contracts(self) -> list[ContractRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id,version,hash,deployment,owner_key,status,message,reported,refused "
                "FROM contracts ORDER BY id").fetchall()
        return [self._contract(r) for r in rows]

    @staticmethod
    def _contract(row: tuple[Any, ...]) -> ContractRecord:
        i, v, h, d, k, s, m, r, f = row
        return ContractRecord(i, v, h, orjson.loads(d), k, s, m, r, f)

    def set_reported(self, cid: int, digest: str) -> None:
        with self._lock:
            self._db.execute("UPDATE contracts SET reported=? WHERE id=?", (digest, cid))

    # every deployment hash this node ever accepted, and for which contract: a signed
    # deployment runs under one contract only, so a replay under another id is caught

    def record_run(self, deployment_hash: str, cid: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO runs VALUES (?,?)", (deployment_hash, cid))

    def ran_as(self, deployment_hash: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT contract FROM runs WHERE hash=?",
                                   (deployment_hash,)).fetchone()
        return None if row is None else int(row[0])

    # meta

    def get_meta(self, key: str, default: str = "") -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))
