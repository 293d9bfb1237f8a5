"""The ledger service: the imperative shell around `Chain` that the HTTP API drives.

It verifies signatures in worker threads (PyNaCl releases the GIL), applies transactions
in arrival order, and a sealer task cuts a block whenever transactions are pending,
writing it while the next block fills. A submission is answered once its block is in the
log. It also answers the event feed, from memory for recent blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time as _time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from zerostack.crypto import Domain, Identity, verify
from zerostack.ledger.block import Block
from zerostack.ledger.chain import Chain
from zerostack.ledger.errors import HTTP_STATUS, LedgerError, LedgerRejected, Rejected
from zerostack.ledger.query import NodeFilter, find_node_records, nodes_json
from zerostack.ledger.state import Receipt, State, sender_key
from zerostack.ledger.store import BlockLog
from zerostack.ledger.tx import MAX_BATCH, MAX_TX_BYTES, Tx, parse_tx, sign_tx

log = logging.getLogger("zerostack.ledger")

MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_EVENT_BLOCKS = 1000
"""Most blocks one `/events` answer covers; the client asks again from `next`."""
MAX_EVENTS = 10000
"""Most events in one `/events` answer; `next` then points inside a block."""
RECENT_BLOCKS = 2000
"""Blocks whose events `/events` serves from memory; older ones are read from the log."""
PARALLEL_VERIFY_MIN = 32
"""Below this many transactions, verifying inline beats handing work to threads."""


class LedgerService:
    """One ledger: its chain, the sealer task, and the waiters for blocks."""

    def __init__(
        self,
        blocklog: BlockLog,
        operator: Identity,
        *,
        clock: Callable[[], float] = _time.time,
        block_interval: float = 0.0,
        verify_threads: int | None = None,
        policy: dict[str, Any] | None = None,
        start: State | None = None,
    ) -> None:
        self.log = blocklog
        self.clock = clock
        self.chain = Chain(blocklog, operator, clock, start=start)
        if policy is not None:
            self._genesis_policy(operator, policy)
        self.block_interval = block_interval
        self._threads = verify_threads or max(1, min(4, os.cpu_count() or 1))
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="ledger-verify")
        self._wake = asyncio.Event()
        self._new_block = asyncio.Event()
        self._pending_future: asyncio.Future[int] | None = None
        self._sealer: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._closing = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent: OrderedDict[int, list[tuple[dict[str, Any], Tx]]] = OrderedDict()
        # the last block whose events are in `_recent`: `/events` answers up to it only
        self._published = self.chain.height

    def _genesis_policy(self, operator: Identity, policy: dict[str, Any]) -> None:
        """Give a grid without a pricing policy its first one, signed with the operator key
        (the grid's governing key) in a block of its own; a grid that has one keeps it, but
        must agree on whether it is a development grid (dev_faucet is fixed at genesis)."""
        state = self.chain.state
        if state.policy is not None:
            if bool(policy.get("dev_faucet")) != state.policy.dev_faucet:
                raise LedgerError(
                    f"this ledger was started with dev_faucet={state.policy.dev_faucet}: the "
                    "faucet is fixed by the grid's first policy", code="invalid")
            return
        tx = parse_tx(sign_tx(operator, "grid.policy", operator.public_hex,
                              state.governor_nonce, policy))
        result = self.chain.add(tx)
        if isinstance(result, Rejected):
            raise LedgerError(f"pricing policy refused: {result.reason}", code=result.code)
        self.chain.seal()

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sealer = asyncio.create_task(self._seal_loop(), name="ledger-sealer")

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Shutdown has begun: answer every long-poll now with what it has, and wait no
        more, so that open `/events` requests do not hold the server's graceful shutdown
        for their whole timeout. Submissions carry on: their block is still written."""
        self._draining = True
        self._new_block.set()

    def drain_soon(self) -> None:
        """drain() from a signal handler or another thread (it runs on the loop)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.drain)

    async def stop(self) -> None:
        """Write every accepted transaction, answer its waiters, then close the log."""
        self._closing = True
        self._wake.set()
        if self._sealer is not None:
            try:
                await asyncio.wait_for(self._sealer, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                log.error("event=sealer_stuck_at_shutdown")
        self._executor.shutdown(wait=False)
        self.log.close()

    # ---- submission ---------------------------------------------------------------------

    async def submit(self, raws: list[Any]) -> list[dict[str, Any]]:
        """Check, verify and apply each transaction; answer once their block is committed."""
        if self._broken or self._closing:
            why = self._broken or "it is shutting down"
            raise LedgerError(f"the ledger stopped accepting transactions: {why}",
                              code="unavailable", status=503)
        results: list[dict[str, Any]] = [{} for _ in raws]
        parsed: list[tuple[int, Tx]] = []
        for i, raw in enumerate(raws):
            try:
                tx = parse_tx(raw)
            except LedgerRejected as exc:
                results[i] = {"error": str(exc), "code": exc.code}
                continue
            if not _encodable(tx):
                results[i] = {"error": "transaction cannot be encoded inside a block or an "
                              "answer (nested too deep?)", "code": "invalid"}
                continue
            parsed.append((i, tx))
        checks = await self._verify([tx for _, tx in parsed])
        if self._closing:  # the sealer may be gone: accept nothing it would not write
            raise LedgerError("the ledger stopped accepting transactions: it is shutting down",
                              code="unavailable", status=503)
        future: asyncio.Future[int] | None = None
        accepted: list[int] = []
        for (i, tx), ok in zip(parsed, checks, strict=True):
            # a failed check is re-run by apply, which words the rejection precisely
            result = self.chain.add(tx, verified=ok is True)
            if isinstance(result, Rejected):
                results[i] = {"hash": tx.hash_hex, **result.to_dict()}
                continue
            results[i] = {"hash": tx.hash_hex, "receipt": result}
            accepted.append(i)
            if future is None:
                future = self._future()
        if future is not None:
            self._wake.set()
            height = await asyncio.shield(future)
            for i in accepted:
                results[i]["height"] = height
        return results

    async def submit_one(self, body: bytes) -> tuple[int, bytes]:
        """`POST /tx`: (HTTP status, JSON answer) for one encoded transaction."""
        try:
            raw = _decode_body(body, MAX_TX_BYTES)
            (result,) = await self.submit([raw])
        except LedgerError as exc:
            return exc.status or 400, orjson.dumps({"error": str(exc), "code": exc.code})
        status = HTTP_STATUS.get(result["code"], 400) if "error" in result else 200
        return status, orjson.dumps(result)

    async def submit_batch(self, body: bytes) -> tuple[int, bytes]:
        """`POST /txs`: (HTTP status, JSON answer) for an encoded array of transactions."""
        try:
            raws = _decode_body(body, MAX_BATCH_BYTES)
            if not isinstance(raws, list):
                raise LedgerRejected("a batch is a JSON array of transactions",
                                     code="malformed", status=400)
            if len(raws) > MAX_BATCH:
                raise LedgerRejected(f"a batch holds at most {MAX_BATCH} transactions",
                                     code="too_large", status=413)
            refused = {i: why for i, raw in enumerate(raws) if (why := _oversize(raw))}
            results = await self.submit([r for i, r in enumerate(raws) if i not in refused])
        except LedgerError as exc:
            return exc.status or 400, orjson.dumps({"error": str(exc), "code": exc.code})
        if refused:
            it = iter(results)
            results = [refused[i] if i in refused else next(it) for i in range(len(raws))]
        return 200, orjson.dumps({"results": results})

    def nodes_json(self, f: NodeFilter, limit: int, offset: int) -> bytes:
        now = int(self.clock())
        return nodes_json(find_node_records(self.chain.state, f, now=now, limit=limit,
                                            offset=offset), now)

    def _future(self) -> asyncio.Future[int]:
        if self._pending_future is None:
            self._pending_future = asyncio.get_running_loop().create_future()
        return self._pending_future

    async def _verify(self, txs: list[Tx]) -> list[bool | None]:
        """True/False per transaction, None when the sender's key is not known yet."""
        state = self.chain.pending_state
        keys = [sender_key(state, tx) for tx in txs]
        if len(txs) < PARALLEL_VERIFY_MIN:
            return _verify_chunk(txs, keys)
        n = self._threads
        size = (len(txs) + n - 1) // n
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._executor, _verify_chunk, txs[k : k + size], keys[k : k + size]
                )
                for k in range(0, len(txs), size)
            )
        )
        return [ok for part in parts for ok in part]

    async def _seal_loop(self) -> None:
        last = 0.0
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            if self.block_interval:
                wait = last + self.block_interval - _time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            cut = self.chain.cut(allow_empty=self.chain.pending is None and self.chain.deadline_due())
            if cut is None:
                if self._closing:
                    return
                continue
            last = _time.monotonic()
            future, self._pending_future = self._pending_future, None
            try:
                await asyncio.to_thread(self.chain.commit, *cut)
            except Exception as exc:  # the log is unusable: stop accepting, tell the waiters
                self._broken = str(exc)
                log.error("event=commit_failed height=%d error=%r", cut[0].height, str(exc))
                # fail this block's waiters and those of the block filling behind it
                for waiting in (future, self._pending_future):
                    if waiting is not None and not waiting.done():
                        waiting.set_exception(LedgerError(
                            f"cannot write block: {exc}", code="unavailable", status=503))
                return
            self._remember(cut[0], cut[1])
            self._published = cut[0].height
            if future is not None and not future.done():
                future.set_result(cut[0].height)
            event, self._new_block = self._new_block, asyncio.Event()
            event.set()

    # ---- events -------------------------------------------------------------------------

    async def events(
        self, since: str | int, timeout: float, filters: dict[str, Any], full: bool
    ) -> dict[str, Any]:
        """Events after cursor `since`, waiting up to `timeout` s for one to come.

        A cursor is "H" (after every event of block H) or "H.I" (after event I, counted
        from 0, of block H); `next` in the answer is the cursor to ask from next time.
        A cursor past the head raises LedgerError (400): the ledger never had it.
        """
        height, index = await self.position(since)
        # (block, index) of the first event not delivered yet
        start_h, start_i = (height + 1, 0) if index is None else (height, index + 1)
        if self._published < start_h and timeout > 0 and not self._draining:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_block.wait(), timeout)
        head = self._published
        upper = min(head, start_h - 1 + MAX_EVENT_BLOCKS)
        if upper < start_h:
            return {"head": head, "next": _cursor(height, index), "events": []}
        if self._recent and start_h >= next(iter(self._recent)):
            # followers are nearly always near the head: serve from memory
            events: list[dict[str, Any]] = []
            for h in range(start_h, upper + 1):
                block = self._recent.get(h, ())
                for i in range(start_i if h == start_h else 0, len(block)):
                    e, tx = block[i]
                    if _matches(e, e["receipt"], filters):
                        events.append(_event(e, tx, full))
                        if len(events) >= MAX_EVENTS:
                            return {"head": head, "events": events,
                                    "next": _cursor(h, None if i == len(block) - 1 else i)}
            return {"head": head, "next": str(upper), "events": events}
        rows = await asyncio.to_thread(self.log.txs_between, start_h - 1, upper)
        events = []
        for n, row in enumerate(rows):
            if row.height == start_h and row.index < start_i:
                continue
            wire = orjson.loads(row.data)
            receipt = orjson.loads(row.receipt)
            if not _matches(wire, receipt, filters):
                continue
            event = {
                "height": row.height,
                "index": row.index,
                "hash": row.hash,
                "type": wire["type"],
                "sender": wire["sender"],
                "receipt": receipt,
            }
            if full:
                event["tx"] = wire
            events.append(event)
            if len(events) >= MAX_EVENTS:
                last = n + 1 == len(rows) or rows[n + 1].height != row.height
                return {"head": head, "events": events,
                        "next": _cursor(row.height, None if last else row.index)}
        return {"head": head, "next": str(upper), "events": events}

    async def position(self, cursor: str | int) -> tuple[int, int | None]:
        """(height, index) of an event cursor (index None: after the whole block); raise
        LedgerError (400) for a cursor that is malformed or past what the ledger holds."""
        height, index = parse_cursor(cursor)
        head = self._published
        if height > head:
            raise LedgerError(f"cursor {cursor} is beyond the head (height {head}): this "
                              "ledger never had it", code="bad_cursor", status=400)
        if index is not None:
            block = self._recent.get(height)
            count = len(block) if block is not None else len(
                await asyncio.to_thread(self.log.txs_in, height))
            if index >= count:
                raise LedgerError(f"cursor {cursor} is beyond block {height}, which holds "
                                  f"{count} events", code="bad_cursor", status=400)
            if index == count - 1:
                index = None  # the last event of a block: the same as the whole block
        return height, index

    def _remember(self, block: Block, receipts: list[Receipt]) -> None:
        """Keep the events of the last RECENT_BLOCKS blocks in memory for followers."""
        self._recent[block.height] = [
            ({"height": block.height, "index": i, "hash": tx.hash_hex, "type": tx.type,
              "sender": tx.sender, "receipt": receipt}, tx)
            for i, (tx, receipt) in enumerate(zip(block.txs, receipts, strict=True))
        ]
        while len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)


# ASCII digits only: \d would also take other scripts' digits, which int() reads too
_CURSOR = re.compile(r"([0-9]{1,15})(?:\.([0-9]{1,9}))?")


def parse_cursor(cursor: str | int) -> tuple[int, int | None]:
    """Split an event cursor "H" or "H.I" (an int H is "H"); LedgerError (400) if malformed."""
    if type(cursor) is int and 0 <= cursor < 10**15:
        return cursor, None
    match = _CURSOR.fullmatch(cursor) if isinstance(cursor, str) else None
    if match is None:
        raise LedgerError(f"cursor {str(cursor)[:40]!r} is not a block height H or an "
                          "event H.I", code="bad_cursor", status=400)
    index = match.group(2)
    return int(match.group(1)), None if index is None else int(index)


def _cursor(height: int, index: int | None) -> str:
    return str(height) if index is None else f"{height}.{index}"


def _event(event: dict[str, Any], tx: Tx, full: bool) -> dict[str, Any]:
    return {**event, "tx": tx.to_wire()} if full else event


def _oversize(raw: Any) -> dict[str, str] | None:
    """Why one transaction of a batch is refused before parsing: too large, or too deep
    to even measure (the encoder stops at 254 levels)."""
    try:
        size = len(orjson.dumps(raw))
    except orjson.JSONEncodeError:
        return {"error": "transaction is nested too deep", "code": "invalid"}
    if size > MAX_TX_BYTES:
        return {"error": f"transaction is over {MAX_TX_BYTES} bytes", "code": "too_large"}
    return None


def _encodable(tx: Tx) -> bool:
    """Whether `tx` still encodes nested as deep as a block or an event answer holds it
    (four levels). parse_tx's limits guarantee it; this keeps one transaction that slipped
    through from making its whole block unwritable, which would stop the ledger."""
    try:
        orjson.dumps([[[tx.to_wire()]]])
    except (orjson.JSONEncodeError, TypeError):
        return False
    return True


def _decode_body(body: bytes, limit: int) -> Any:
    if len(body) > limit:
        raise LedgerRejected(f"body is {len(body)} bytes, the limit is {limit}",
                             code="too_large", status=413)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise LedgerRejected(f"body is not JSON: {exc}", code="malformed", status=400) from None


def _verify_chunk(txs: list[Tx], keys: list[str | None]) -> list[bool | None]:
    return [
        None if key is None else verify(Domain.TRANSACTION, key, tx.hash, tx.signature)
        for tx, key in zip(txs, keys, strict=True)
    ]


def _matches(tx: dict[str, Any], receipt: dict[str, Any], f: dict[str, Any]) -> bool:
    if f.get("type") and not str(tx["type"]).startswith(f["type"]):
        return False
    if f.get("node") is not None and receipt.get("node") != f["node"] \
            and f["node"] not in (receipt.get("nodes") or ()):
        return False
    if f.get("contract") is not None and receipt.get("contract") != f["contract"]:
        return False
    twin = f.get("twin")
    return twin is None or twin in (tx["sender"], receipt.get("owner"), receipt.get("twin"))


# ---- HTTP ---------------------------------------------------------------------------------
