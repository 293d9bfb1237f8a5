"""Where the ordered log of blocks is kept: the `BlockLog` interface and its SQLite default.

The log is the source of truth; the materialized state (`ledger.state.State`, held in
memory with its query indexes) is rebuilt from it by replay. Ordering and persistence sit
behind this interface so that a replicated log (etcd) can replace SQLite later.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from zerostack.ledger.block import GENESIS_HASH, Block, Checkpoint
from zerostack.ledger.errors import LedgerError
from zerostack.ledger.state import Receipt


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """One block as the log holds it: its claimed hash and its exact stored bytes."""

    height: int
    hash: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StoredTx:
    """One row of the transaction index: where a transaction sits and what it did."""

    hash: str
    height: int
    index: int
    data: bytes  # the wire transaction (JSON)
    receipt: bytes  # JSON


class BlockLog(Protocol):
    """An append-only sequence of blocks, plus an index of transactions by hash."""

    def head(self) -> tuple[int, str]:
        """(height, hash) of the last block; (0, GENESIS_HASH) when empty."""
        ...

    def append(self, block: Block, receipts: list[Receipt],
               checkpoint: Checkpoint | None = None) -> None:
        """Persist `block` (whose height is head + 1) atomically with its tx index rows
        and, when given, the new checkpoint; durable (on disk) when it returns."""
        ...

    def checkpoint(self) -> Checkpoint | None:
        """The operator's signed "checked up to here" mark, if the log has one."""
        ...

    def set_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def set_block_signatures(self, height: int, block_hash: str, data: bytes) -> None:
        """Store block `height` again with more signatures (same hash)."""
        ...

    def block(self, height: int) -> StoredBlock | None: ...

    def blocks(self, start: int = 1) -> Iterator[StoredBlock]:
        """Blocks from height `start` on, in order."""
        ...

    def tx(self, tx_hash: str) -> StoredTx | None: ...

    def txs_between(self, after: int, upto: int) -> list[StoredTx]:
        """Index rows of blocks `after` < height <= `upto`, in log order."""
        ...

    def txs_in(self, height: int) -> list[StoredTx]: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS txs (
    hash TEXT PRIMARY KEY,
    height INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    receipt BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS txs_by_height ON txs (height, idx);
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    height INTEGER NOT NULL,
    hash TEXT NOT NULL,
    key TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""
_SET_CHECKPOINT = ("INSERT OR REPLACE INTO checkpoint (id, height, hash, key, signature) "
                   "VALUES (1, ?, ?, ?, ?)")


class SqliteLog:
    """The embedded default: one SQLite file in WAL mode.

    One connection shared under a lock: writes come from the block sealer thread,
    reads from the API; SQLite serializes them anyway.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + FULL: every commit is fsynced before append() returns, so a block
            # whose transactions were acknowledged survives a power loss too (blocks are
            # cut while the previous one is written, so one fsync serves many of them)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: cannot open the ledger database: {exc}") from exc
        self._lock = threading.Lock()

    def head(self) -> tuple[int, str]:
        with self._lock:
            row = self._db.execute(
                "SELECT height, hash FROM blocks ORDER BY height DESC LIMIT 1"
            ).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    def append(self, block: Block, receipts: list[Receipt],
               checkpoint: Checkpoint | None = None) -> None:
        rows = [
            (tx.hash.hex(), block.height, i, orjson.dumps(tx.to_wire()), orjson.dumps(r))
            for i, (tx, r) in enumerate(zip(block.txs, receipts, strict=True))
        ]
        data = block.encode()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)",
                    (block.height, block.hash, data),
                )
                self._db.executemany(
                    "INSERT INTO txs (hash, height, idx, data, receipt) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                if checkpoint is not None:
                    self._db.execute(_SET_CHECKPOINT, _checkpoint_row(checkpoint))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise LedgerError(f"cannot append block {block.height}: {exc}") from exc

    def checkpoint(self) -> Checkpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT height, hash, key, signature FROM checkpoint WHERE id = 1").fetchone()
        return Checkpoint(int(row[0]), str(row[1]), str(row[2]), str(row[3])) if row else None

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            try:
                self._db.execute(_SET_CHECKPOINT, _checkpoint_row(checkpoint))
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot write the checkpoint: {exc}") from exc

    def block(self, height: int) -> StoredBlock | None:
        with self._lock:
            row = self._db.execute(
                "SELECT height, hash, data FROM blocks WHERE height = ?", (height,)
            ).fetchone()
        return StoredBlock(int(row[0]), str(row[1]), bytes(row[2])) if row else None

    def blocks(self, start: int = 1) -> Iterator[StoredBlock]:
        height = start
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT height, hash, data FROM blocks WHERE height >= ? "
                    "ORDER BY height LIMIT 256",
                    (height,),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield StoredBlock(int(row[0]), str(row[1]), bytes(row[2]))
            height = int(rows[-1][0]) + 1

    def tx(self, tx_hash: str) -> StoredTx | None:
        with self._lock:
            row = self._db.execute(
                "SELECT hash, height, idx, data, receipt FROM txs WHERE hash = ?", (tx_hash,)
            ).fetchone()
        return _stored_tx(row) if row else None

    def txs_between(self, after: int, upto: int) -> list[StoredTx]:
        with self._lock:
            rows = self._db.execute(
                "SELECT hash, height, idx, data, receipt FROM txs WHERE height > ? "
                "AND height <= ? ORDER BY height, idx",
                (after, upto),
            ).fetchall()
        return [_stored_tx(r) for r in rows]

    def txs_in(self, height: int) -> list[StoredTx]:
        with self._lock:
            rows = self._db.execute(
                "SELECT hash, height, idx, data, receipt FROM txs WHERE height = ? ORDER BY idx",
                (height,),
            ).fetchall()
        return [_stored_tx(r) for r in rows]

    def set_block_signatures(self, height: int, block_hash: str, data: bytes) -> None:
        """Replace the stored bytes of block `height` by `data`, the same block with more
        signatures (a replica adds the validators' signatures it collects): only the
        `signatures` part may differ, which the caller checked; the hash must be the same."""
        with self._lock:
            try:
                cur = self._db.execute("UPDATE blocks SET data = ? WHERE height = ? AND hash = ?",
                                       (data, height, block_hash))
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot update block {height}: {exc}") from exc
        if cur.rowcount != 1:
            raise LedgerError(f"block {height} with hash {block_hash} is not in the log")

    def tx_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM txs").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stored_tx(row: Any) -> StoredTx:
    return StoredTx(str(row[0]), int(row[1]), int(row[2]), bytes(row[3]), bytes(row[4]))


def _checkpoint_row(c: Checkpoint) -> tuple[int, str, str, str]:
    return (c.height, c.hash, c.key, c.signature)
