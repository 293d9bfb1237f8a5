"""Orders transactions into blocks over a `BlockLog`, signs them as the ledger's operator,
and replays or verifies a log from genesis.

`Chain` keeps two states: `state`, the materialized state after the last block written to
the log (what queries see), and the pending state, where accepted transactions wait for
the next block. Every transaction of a block is applied at the block's time, so replay
reaches exactly the same state.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from zerostack.crypto import Domain, Identity, canonical_json, verify
from zerostack.ledger.block import (
    GENESIS_HASH,
    Block,
    BlockSignature,
    Checkpoint,
    parse_signatures,
    signature_problem,
    tx_root,
)
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

    def __init__(self, log: BlockLog, operator: Identity, clock: Clock = _time.time,
                 *, start: State | None = None) -> None:
        """Open `log`, refusing it (`BadBlock`) unless it passes the checks of `verify`
        (transaction signatures up to its checkpoint excepted, see `replay`) with every
        block signed by `operator`, this ledger's key, which signs the blocks it adds.
        `start` is the genesis state (default: `operator` governs and validates alone;
        a replica of a cluster starts from the cluster's genesis instead)."""
        self.log = log
        self.clock = clock
        self.operator = operator
        replayed = replay(log, operator_key=operator.public_hex, trust_checkpoint=True,
                          start=start)
        self.state: State = replayed.state
        self.height, self.hash, self.time = replayed.height, replayed.hash, replayed.time
        self.last: Block | None = replayed.last
        cp = replayed.checkpoint
        if self.height and (cp is None or cp.height != self.height):
            # everything up to the head was just checked: the next start need not again
            log.set_checkpoint(Checkpoint.make(operator, self.height, self.hash))
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
        """A contract deadline or grace period has passed, or a billing boundary: an
        (empty) block would expire, end or charge what is due."""
        s, now = self._tip_state, int(self.clock())
        # a boundary with nothing to bill waits for the next block: it changes nothing
        return (s.next_deadline < now or s.next_grace < now
                or (s.next_bill <= now and bool(s.billable)))

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

    def commit(self, block: Block, receipts: list[Receipt], state: State) -> Block:
        """Sign a cut block, write it to the log, then publish its state to queries.
        Every transaction in it was checked, so the checkpoint moves along with it."""
        block = block.signed(self.operator)
        self.log.append(block, receipts, Checkpoint.make(self.operator, block.height, block.hash))
        self.state = state
        self.height, self.hash, self.time = block.height, block.hash, block.time
        self.last = block
        return block

    def head_header(self) -> dict[str, Any]:
        """The last block's signed header (what `GET /head` serves)."""
        return genesis_header() if self.last is None else self.last.signed_header()

    def seal(self) -> Block | None:
        """Cut and commit in one step (for synchronous callers and tests)."""
        cut = self.cut()
        if cut is None:
            return None
        return self.commit(*cut)


@dataclass
class Replayed:
    state: State
    height: int
    hash: str
    time: int
    txs: int
    operator_key: str | None = None
    """The key every block is signed by (None for an empty log)."""
    last: Block | None = None
    """The last block, with its signatures (None for an empty log)."""
    checkpoint: Checkpoint | None = None
    """The log's checkpoint, checked against the chain (None if it has none)."""


class BadBlock(LedgerError):
    """The log is not what its hashes and signatures say: `height` is the first bad block."""

    def __init__(self, height: int, reason: str) -> None:
        super().__init__(f"block {height}: {reason}", code="bad_block")
        self.height = height
        self.reason = reason


HEADER_CHUNK = 256
"""Blocks whose header signatures one worker checks at a time, beside state replay."""


def replay(log: BlockLog, *, operator_key: str | None = None, trust_checkpoint: bool = False,
           check_index: bool = True, start: State | None = None) -> Replayed:
    """Rebuild the state from genesis, checking every block; raise `BadBlock` at the first bad one.

    Every block's bytes, hashes, header signature (by `operator_key`; without one, by the
    key that signed block 1) and state transition are checked, and with `check_index` the
    transaction index too. Transaction signatures are checked too, except, with
    `trust_checkpoint`, those up to the log's checkpoint when the operator signed it and
    its hash is the chain's at that height (a server reopening its own file).
    A checkpoint that does not match the chain, or lies beyond its end, is a bad log.
    """
    if operator_key is None:
        operator_key = _first_signer(log)
    checkpoint = log.checkpoint()
    # a checkpoint that is not the operator's is reported once the blocks before it are
    # checked (a bad block 1 is the first thing wrong with a log whose signer is unknown)
    forged = checkpoint is not None and (operator_key is None
                                         or not checkpoint.valid_for(operator_key))
    trusted = checkpoint.height if checkpoint is not None and trust_checkpoint and not forged \
        else 0
    state = genesis(operator_key) if start is None else start
    prev_hash, prev_time, height, count = GENESIS_HASH, 0, 0, 0
    last: Block | None = None
    threads = max(1, min(4, os.cpu_count() or 1))
    headers: list[tuple[int, str, tuple[BlockSignature, ...]]] = []
    checks: list[Future[tuple[int, str] | None]] = []
    with ThreadPoolExecutor(threads, thread_name_prefix="ledger-replay") as pool:
        try:
            for stored in log.blocks(1):
                height += 1
                if stored.height != height:
                    raise BadBlock(height, f"missing: the log jumps to height {stored.height}")
                block, state = _replay_block(state, stored.data, height, prev_hash, prev_time,
                                             pool if height > trusted else None,
                                             log if check_index else None)
                if block.hash != stored.hash:
                    raise BadBlock(height,
                                   f"stored hash {stored.hash} is not the header's {block.hash}")
                if checkpoint is not None and not forged and height == checkpoint.height \
                        and block.hash != checkpoint.hash:
                    raise BadBlock(height, "the block hash differs from the operator's "
                                   "checkpoint at this height: the file was edited")
                headers.append((height, block.hash, block.signatures))
                if len(headers) >= HEADER_CHUNK:
                    checks.append(pool.submit(_check_headers, headers, operator_key))
                    headers = []
                prev_hash, prev_time, last = block.hash, block.time, block
                count += len(block.txs)
            checks.append(pool.submit(_check_headers, headers, operator_key))
            if checkpoint is not None and checkpoint.height > height:
                raise BadBlock(height + 1, f"missing: the log ends at height {height}, but the "
                               f"operator checked it up to height {checkpoint.height} "
                               "(blocks were removed)")
            if check_index and log.txs_between(height, 2**62):
                raise BadBlock(height + 1, "missing: the transaction index lists transactions "
                               "of blocks after the last one (blocks were removed)")
        except BadBlock as exc:
            # a header signature that failed in an earlier block is the first bad block
            _raise_first(checks, exc.height)
            raise
        _raise_first(checks, height + 1)
    if forged:
        assert checkpoint is not None
        raise BadBlock(checkpoint.height, f"the checkpoint at height {checkpoint.height} is "
                       f"not signed by the operator key {operator_key}")
    return Replayed(state, height, prev_hash, prev_time, count,
                    operator_key if height else None, last, checkpoint)


def _first_signer(log: BlockLog) -> str | None:
    """The key that signed block 1: a file records its operator in every block."""
    first = log.block(1)
    if first is None:
        return None
    try:
        wire = orjson.loads(first.data)
        return parse_signatures(wire["signatures"])[0].key
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError):
        return None  # replay words what is wrong with block 1


def _check_headers(headers: list[tuple[int, str, tuple[BlockSignature, ...]]],
                   operator_key: str | None) -> tuple[int, str] | None:
    for height, block_hash, signatures in headers:
        why = ("no operator key is known" if operator_key is None
               else signature_problem(block_hash, signatures, operator_key))
        if why is not None:
            return height, f"header signature: {why}"
    return None


def _raise_first(checks: list[Future[tuple[int, str] | None]], before: int) -> None:
    for check in checks:
        bad = check.result()
        if bad is not None and bad[0] < before:
            raise BadBlock(*bad)


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
    if isinstance(wire, dict) and set(wire) == {"header", "txs"}:
        raise BadBlock(height, "the block carries no operator signature (written before "
                       "block headers were signed)")
    if not isinstance(wire, dict) or set(wire) != {"header", "signatures", "txs"}:
        raise BadBlock(height, "not a block {header, signatures, txs}")
    header, raw_txs = wire["header"], wire["txs"]
    if not isinstance(header, dict) or not isinstance(raw_txs, list):
        raise BadBlock(height, "not a block {header, signatures, txs}")
    try:
        signatures = parse_signatures(wire["signatures"])
    except ValueError as exc:
        raise BadBlock(height, str(exc)) from None
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
    block = replace(Block.build(height, prev_hash, btime, txs), signatures=signatures)
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


def verify_log(log: BlockLog, operator_key: str | None = None, *,
               start: State | None = None) -> Replayed:
    """Full check of a log: every hash, signature, transition and index row, every block
    signed by `operator_key` (default: the key that signed block 1). `start`: the genesis
    state (a cluster replica's file starts from the cluster's)."""
    return replay(log, operator_key=operator_key, trust_checkpoint=False, check_index=True,
                  start=start)


def block_json(data: bytes, block_hash: str) -> dict[str, Any]:
    """A stored block as the API serves it: header fields, hash, signatures, transactions."""
    wire = orjson.loads(data)
    return {**header_json(data, block_hash, wire), "txs": wire["txs"]}


def header_json(data: bytes, block_hash: str, wire: Any = None) -> dict[str, Any]:
    """A stored block's signed header as the API serves it (no transactions)."""
    wire = orjson.loads(data) if wire is None else wire
    return {**wire["header"], "hash": block_hash, "signatures": wire.get("signatures", [])}


def genesis_header() -> dict[str, Any]:
    """What `GET /head` answers for an empty ledger: height 0, nothing signed yet."""
    return {"height": 0, "hash": GENESIS_HASH, "time": 0, "signatures": []}
