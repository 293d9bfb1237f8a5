"""Orders transactions into blocks over a `BlockLog`, and replays or verifies a log from genesis.

`Chain` keeps two states: `state`, the materialized state after the last block written to
the log (what queries see), and the pending state, where accepted transactions wait for
the next block. Every transaction of a block is applied at the block's time, so replay
reaches exactly the same state.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from zerostack.crypto import Domain, canonical_json, verify
from zerostack.ledger.block import GENESIS_HASH, Block, tx_root
from zerostack.ledger.errors import LedgerError, LedgerRejected, Rejected
from zerostack.ledger.state import (
    Receipt,
    State,
    apply_with_receipt,
    genesis,
    sender_key,
    tick,
)
from zerostack.ledger.store import BlockLog
from zerostack.ledger.tx import Tx, parse_tx

Clock = Callable[[], float]


@dataclass
class PendingBlock:
    height: int
    time: int
    txs: list[Tx] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)


class Chain:
    """The single writer of a ledger: accepts transactions, cuts blocks, commits them."""

    def __init__(self, log: BlockLog, clock: Clock = _time.time) -> None:
        self.log = log
        self.clock = clock
        replayed = replay(log, check_signatures=False)
        self.state: State = replayed.state
        self.height, self.hash, self.time = replayed.height, replayed.hash, replayed.time
        # the tip of what has been cut (may be ahead of `height` while a block is written)
        self._tip_height, self._tip_hash, self._tip_time = self.height, self.hash, self.time
        self._tip_state = self.state
        self.pending: PendingBlock | None = None
        self._pending_state = self.state

    @property
    def pending_state(self) -> State:
        return self._pending_state

    def _open(self) -> PendingBlock:
        if self.pending is None:
            now = max(self._tip_time, int(self.clock()))
            self.pending = PendingBlock(self._tip_height + 1, now)
            self._pending_state = tick(self._tip_state, now)
        return self.pending

    def add(self, tx: Tx, *, verified: bool = False) -> Receipt | Rejected:
        """Apply `tx` to the pending block; it is durable once that block is committed."""
        block = self._open()
        result = apply_with_receipt(self._pending_state, tx, time=block.time, verified=verified)
        if isinstance(result, Rejected):
            return result
        self._pending_state, receipt = result
        block.txs.append(tx)
        block.receipts.append(receipt)
        return receipt

    def deadline_due(self) -> bool:
        """A contract deadline has passed: an (empty) block would expire it."""
        return self._tip_state.next_deadline < int(self.clock())

    def cut(self, *, allow_empty: bool = False) -> tuple[Block, list[Receipt], State] | None:
        """Close the pending block; the caller writes it with `commit` (maybe in a thread)."""
        if self.pending is None:
            if not allow_empty:
                return None
            self._open()
        assert self.pending is not None
        p = self.pending
        block = Block.build(p.height, self._tip_hash, p.time, p.txs)
        self._tip_height, self._tip_hash, self._tip_time = block.height, block.hash, block.time
        self._tip_state = self._pending_state
        self.pending = None
        return block, p.receipts, self._pending_state

    def commit(self, block: Block, receipts: list[Receipt], state: State) -> None:
        """Write a cut block to the log, then publish its state to queries."""
        self.log.append(block, receipts)
        self.state = state
        self.height, self.hash, self.time = block.height, block.hash, block.time

    def seal(self) -> Block | None:
        """Cut and commit in one step (for synchronous callers and tests)."""
        cut = self.cut()
        if cut is None:
            return None
        self.commit(*cut)
        return cut[0]


@dataclass
class Replayed:
    state: State
    height: int
    hash: str
    time: int
    txs: int


class BadBlock(LedgerError):
    """The log is not what its hashes and signatures say: `height` is the first bad block."""

    def __init__(self, height: int, reason: str) -> None:
        super().__init__(f"block {height}: {reason}", code="bad_block")
        self.height = height
        self.reason = reason


def replay(log: BlockLog, *, check_signatures: bool = True, check_index: bool = False) -> Replayed:
    """Rebuild the state from genesis, checking every block; raise `BadBlock` at the first bad one.

    `check_signatures=False` trusts the signatures (a server reopening its own file);
    `zerostack ledger verify` checks everything, including the transaction index.
    """
    state = genesis()
    prev_hash, prev_time, height, count = GENESIS_HASH, 0, 0, 0
    threads = max(1, min(4, os.cpu_count() or 1)) if check_signatures else 0
    with ThreadPoolExecutor(threads or 1, thread_name_prefix="ledger-replay") as pool:
        for stored in log.blocks(1):
            height += 1
            if stored.height != height:
                raise BadBlock(height, f"missing: the log jumps to height {stored.height}")
            block, state = _replay_block(state, stored.data, height, prev_hash, prev_time,
                                         pool if threads else None,
                                         log if check_index else None)
            if block.hash != stored.hash:
                raise BadBlock(height,
                               f"stored hash {stored.hash} is not the header's {block.hash}")
            prev_hash, prev_time = block.hash, block.time
            count += len(block.txs)
    return Replayed(state, height, prev_hash, prev_time, count)


def _verify_in(pool: ThreadPoolExecutor, state: State, txs: list[Tx]) -> list[bool]:
    """Check signatures in parallel (PyNaCl releases the GIL); a sender registered within
    the same block is unknown yet, so its transaction is left for apply to check."""
    keys = [sender_key(state, tx) for tx in txs]

    def check(i: int) -> bool:
        key = keys[i]
        return key is not None and verify(Domain.TRANSACTION, key, txs[i].hash, txs[i].signature)

    return list(pool.map(check, range(len(txs)), chunksize=64))


def _replay_block(
    state: State,
    data: bytes,
    height: int,
    prev_hash: str,
    prev_time: int,
    verifier: ThreadPoolExecutor | None,
    index: BlockLog | None,
) -> tuple[Block, State]:
    """Check one stored block against the previous one and apply it; `verifier` is None
    when signatures are trusted."""
    try:
        wire = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadBlock(height, f"not JSON: {exc}") from None
    try:
        if canonical_json(wire) != data:
            raise BadBlock(height, "stored bytes are not canonical JSON")
    except ValueError as exc:
        raise BadBlock(height, f"not canonical JSON: {exc}") from None
    if not isinstance(wire, dict) or set(wire) != {"header", "txs"}:
        raise BadBlock(height, "not a block {header, txs}")
    header, raw_txs = wire["header"], wire["txs"]
    if not isinstance(header, dict) or not isinstance(raw_txs, list):
        raise BadBlock(height, "not a block {header, txs}")
    expected_keys = {"height", "prev_hash", "time", "tx_root", "tx_count"}
    if set(header) != expected_keys:
        raise BadBlock(height, "header fields are wrong")
    if header["height"] != height:
        raise BadBlock(height, f"header says height {header['height']}")
    if header["prev_hash"] != prev_hash:
        raise BadBlock(height, "prev_hash does not match the previous block's hash")
    btime = header["time"]
    if type(btime) is not int or btime < prev_time:
        raise BadBlock(height, "block time goes backwards")
    txs: list[Tx] = []
    for i, raw in enumerate(raw_txs):
        try:
            txs.append(parse_tx(raw, canonical_checked=True))
        except LedgerRejected as exc:
            raise BadBlock(height, f"transaction {i}: {exc}") from None
    if header["tx_count"] != len(txs):
        raise BadBlock(height, "tx_count does not match the transactions")
    if header["tx_root"] != tx_root(txs):
        raise BadBlock(height, "tx_root does not match the transactions")
    block = Block.build(height, prev_hash, btime, txs)
    state = tick(state, btime)
    verified = _verify_in(verifier, state, txs) if verifier else [True] * len(txs)
    receipts: list[Receipt] = []
    for i, tx in enumerate(txs):
        # a failed or skipped check is redone by apply, which words the rejection
        result = apply_with_receipt(state, tx, time=btime, verified=verified[i])
        if isinstance(result, Rejected):
            raise BadBlock(height, f"transaction {i} ({tx.hash_hex}) is refused: {result.reason}")
        state, receipt = result
        receipts.append(receipt)
    if index is not None:
        _check_index(index, block, receipts)
    return block, state


def _check_index(log: BlockLog, block: Block, receipts: list[Receipt]) -> None:
    rows = log.txs_in(block.height)
    if len(rows) != len(block.txs):
        raise BadBlock(block.height, "the transaction index does not list this block's txs")
    for i, (row, tx, receipt) in enumerate(zip(rows, block.txs, receipts, strict=True)):
        if row.hash != tx.hash_hex or row.index != i:
            raise BadBlock(block.height, f"transaction index row {i} is wrong")
        try:
            same = orjson.loads(row.data) == tx.to_wire() and orjson.loads(row.receipt) == receipt
        except orjson.JSONDecodeError:
            same = False
        if not same:
            raise BadBlock(block.height, f"transaction index row {i} does not match the block")


def verify_log(log: BlockLog) -> Replayed:
    """Full check of a log: every hash, signature, transition and index row."""
    return replay(log, check_signatures=True, check_index=True)


def block_json(data: bytes, block_hash: str) -> dict[str, Any]:
    """A stored block as the API serves it: header fields, hash and transactions."""
    wire = orjson.loads(data)
    return {**wire["header"], "hash": block_hash, "txs": wire["txs"]}
