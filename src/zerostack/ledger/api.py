"""The ledger's HTTP JSON API (FastAPI): submit transactions, query state, follow events.

`LedgerService` is the imperative shell around `Chain`: it verifies signatures in worker
threads (PyNaCl releases the GIL), applies transactions in arrival order, and a sealer task
cuts a block whenever transactions are pending, writing it while the next block fills.
A submission is answered once its block is in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time as _time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from zerostack.crypto import verify
from zerostack.ledger.block import Block
from zerostack.ledger.chain import Chain, block_json
from zerostack.ledger.errors import HTTP_STATUS, LedgerError, LedgerRejected, Rejected
from zerostack.ledger.query import (
    NodeFilter,
    find_contracts,
    find_node_records,
    node_view,
    nodes_json,
    page,
)
from zerostack.ledger.state import CONTRACT_STATES, Receipt, sender_key
from zerostack.ledger.store import BlockLog, SqliteLog
from zerostack.ledger.tx import MAX_BATCH, MAX_TX_BYTES, SignedTxModel, Tx, parse_tx

log = logging.getLogger("zerostack.ledger")

MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_EVENT_BLOCKS = 1000
"""Most blocks one `/events` answer covers; the client asks again from `next`."""
RECENT_BLOCKS = 2000
"""Blocks whose events `/events` serves from memory; older ones are read from the log."""
PARALLEL_VERIFY_MIN = 32
"""Below this many transactions, verifying inline beats handing work to threads."""


class LedgerService:
    """One ledger: its chain, the sealer task, and the waiters for blocks."""

    def __init__(
        self,
        blocklog: BlockLog,
        *,
        clock: Callable[[], float] = _time.time,
        block_interval: float = 0.0,
        verify_threads: int | None = None,
    ) -> None:
        self.log = blocklog
        self.clock = clock
        self.chain = Chain(blocklog, clock)
        self.block_interval = block_interval
        self._threads = verify_threads or max(1, min(4, os.cpu_count() or 1))
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="ledger-verify")
        self._wake = asyncio.Event()
        self._new_block = asyncio.Event()
        self._pending_future: asyncio.Future[int] | None = None
        self._sealer: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._closing = False
        self._recent: OrderedDict[int, list[tuple[dict[str, Any], Tx]]] = OrderedDict()
        # the last block whose events are in `_recent`: `/events` answers up to it only
        self._published = self.chain.height

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._sealer = asyncio.create_task(self._seal_loop(), name="ledger-sealer")

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
                parsed.append((i, parse_tx(raw)))
            except LedgerRejected as exc:
                results[i] = {"error": str(exc), "code": exc.code}
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
            oversize = {i for i, raw in enumerate(raws) if len(orjson.dumps(raw)) > MAX_TX_BYTES}
            results = await self.submit([r for i, r in enumerate(raws) if i not in oversize])
        except LedgerError as exc:
            return exc.status or 400, orjson.dumps({"error": str(exc), "code": exc.code})
        if oversize:
            it = iter(results)
            too_big = {"error": f"transaction is over {MAX_TX_BYTES} bytes", "code": "too_large"}
            results = [too_big if i in oversize else next(it) for i in range(len(raws))]
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
        self, since: int, timeout: float, filters: dict[str, Any], full: bool
    ) -> dict[str, Any]:
        """Transactions of blocks after `since`, waiting up to `timeout` s for one to come."""
        if self._published <= since and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_block.wait(), timeout)
        head = self._published
        upper = min(head, since + MAX_EVENT_BLOCKS)
        if upper <= since:
            # a client ahead of the head (a ledger rebuilt from scratch) is sent back to it
            return {"head": head, "next": min(since, head), "events": []}
        if self._recent and since + 1 >= next(iter(self._recent)):
            # followers are nearly always near the head: serve from memory
            events = [
                _event(e, tx, full)
                for height in range(since + 1, upper + 1)
                for e, tx in self._recent.get(height, ())
                if _matches(e, e["receipt"], filters)
            ]
            return {"head": head, "next": upper, "events": events}
        rows = await asyncio.to_thread(self.log.txs_between, since, upper)
        events = []
        for row in rows:
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
        return {"head": head, "next": upper, "events": events}

    def _remember(self, block: Block, receipts: list[Receipt]) -> None:
        """Keep the events of the last RECENT_BLOCKS blocks in memory for followers."""
        self._recent[block.height] = [
            ({"height": block.height, "index": i, "hash": tx.hash_hex, "type": tx.type,
              "sender": tx.sender, "receipt": receipt}, tx)
            for i, (tx, receipt) in enumerate(zip(block.txs, receipts, strict=True))
        ]
        while len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)


def _event(event: dict[str, Any], tx: Tx, full: bool) -> dict[str, Any]:
    return {**event, "tx": tx.to_wire()} if full else event


def _decode_body(body: bytes, limit: int) -> Any:
    if len(body) > limit:
        raise LedgerRejected(f"body is {len(body)} bytes, the limit is {limit}",
                             code="too_large", status=413)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise LedgerRejected(f"body is not JSON: {exc}", code="malformed", status=400) from None


class _SubmitFastPath:
    """ASGI middleware answering `POST /tx` and `POST /txs` before FastAPI's routing and
    dependency machinery, which otherwise costs more than verifying the signature. The
    FastAPI routes stay (same handlers) for the OpenAPI spec."""

    def __init__(self, app: ASGIApp, service: LedgerService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] == "http" and scope["method"] == "GET" and path == "/nodes":
            query = _node_query(scope.get("query_string", b""))
            if query is None:  # let FastAPI word the validation error
                await self.app(scope, receive, send)
                return
            await _answer(send, 200, self.service.nodes_json(*query))
            return
        if scope["type"] != "http" or scope["method"] != "POST" or path not in ("/tx", "/txs"):
            await self.app(scope, receive, send)
            return
        limit = MAX_TX_BYTES if path == "/tx" else MAX_BATCH_BYTES
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:  # past the limit, read on but keep nothing
                chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if size > limit:
            status, answer = 413, orjson.dumps({
                "error": f"body is {size} bytes, the limit is {limit}", "code": "too_large"})
        elif path == "/tx":
            status, answer = await self.service.submit_one(body)
        else:
            status, answer = await self.service.submit_batch(body)
        await _answer(send, status, answer)


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


_NODE_INTS = {"farm": 1, "twin": 1, "free_cru": 0, "free_mru": 0, "free_sru": 0, "free_hru": 0,
              "limit": 1, "offset": 0}


def _node_query(query_string: bytes) -> tuple[NodeFilter, int, int] | None:
    """Parse `GET /nodes` parameters the quick way; None when anything is off (FastAPI then
    answers, with its precise validation message)."""
    values: dict[str, Any] = {}
    for key, value in parse_qsl(query_string.decode("latin-1")):
        if key in _NODE_INTS:
            if not value.isdigit() or int(value) < _NODE_INTS[key]:
                return None
            values[key] = int(value)
        elif key in ("country", "city"):
            values[key] = value
        elif key == "status":
            if value not in ("up", "down"):
                return None
            values[key] = value
    limit = values.pop("limit", 100)
    if limit > 10000:
        return None
    offset = values.pop("offset", 0)
    return NodeFilter(**values), limit, offset


def _verify_chunk(txs: list[Tx], keys: list[str | None]) -> list[bool | None]:
    return [
        None if key is None else verify(key, tx.hash, tx.signature)
        for tx, key in zip(txs, keys, strict=True)
    ]


def _matches(tx: dict[str, Any], receipt: dict[str, Any], f: dict[str, Any]) -> bool:
    if f.get("type") and not str(tx["type"]).startswith(f["type"]):
        return False
    if f.get("node") is not None and receipt.get("node") != f["node"]:
        return False
    if f.get("contract") is not None and receipt.get("contract") != f["contract"]:
        return False
    twin = f.get("twin")
    return twin is None or twin in (tx["sender"], receipt.get("owner"), receipt.get("twin"))


# ---- HTTP ---------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(message: str, code: str, status: int | None = None) -> Response:
    return _json({"error": message, "code": code}, status or HTTP_STATUS.get(code, 400))


def _not_found(what: str) -> Response:
    return _error(f"{what} does not exist", "not_found", 404)


_TX_SCHEMA = SignedTxModel.model_json_schema()


def create_app(
    db: Path | str | BlockLog,
    *,
    clock: Callable[[], float] = _time.time,
    block_interval: float = 0.0,
) -> FastAPI:
    """The ASGI app for a ledger whose log is the SQLite file `db` (or any BlockLog)."""
    blocklog: BlockLog = SqliteLog(db) if isinstance(db, (str, Path)) else db
    service = LedgerService(blocklog, clock=clock, block_interval=block_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="zerostack ledger",
        description="The BCDB / digital notary: signed transactions in a hash-chained log.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(LedgerError)
    async def _ledger_error(request: Request, exc: LedgerError) -> Response:
        return _error(str(exc), exc.code, exc.status or 400)

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return _error(f"{where}: {err.get('msg')}", "invalid", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(str(exc.detail), "not_found" if exc.status_code == 404 else "error",
                      exc.status_code)

    @app.post(
        "/tx",
        summary="Submit one signed transaction; answered once it is in a block.",
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": _TX_SCHEMA}}}},
    )
    async def post_tx(request: Request) -> Response:
        status, body = await service.submit_one(await request.body())
        return Response(body, status_code=status, media_type="application/json")

    @app.post(
        "/txs",
        summary="Submit a JSON array of signed transactions; one result per transaction.",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "array", "items": _TX_SCHEMA, "maxItems": MAX_BATCH}}}}},
    )
    async def post_txs(request: Request) -> Response:
        status, body = await service.submit_batch(await request.body())
        return Response(body, status_code=status, media_type="application/json")

    app.add_middleware(_SubmitFastPath, service=service)

    @app.get("/tx/{tx_hash}", summary="A committed transaction, its block height and receipt.")
    async def get_tx(tx_hash: str) -> Response:
        row = service.log.tx(tx_hash)
        if row is None:
            return _not_found(f"transaction {tx_hash}")
        return _json({
            "hash": row.hash,
            "height": row.height,
            "index": row.index,
            "tx": orjson.loads(row.data),
            "receipt": orjson.loads(row.receipt),
        })

    @app.get("/head", summary="The last committed block.")
    async def get_head() -> Response:
        c = service.chain
        return _json({"height": c.height, "hash": c.hash, "time": c.time})

    @app.get("/blocks/{height}", summary="A block: header, hash and transactions.")
    async def get_block(height: int) -> Response:
        stored = service.log.block(height)
        if stored is None:
            return _not_found(f"block {height}")
        return _json(block_json(stored.data, stored.hash))

    @app.get("/twins", summary="Twins, or the twin with public key `key`.")
    async def get_twins(key: str | None = None, limit: int = Query(100, ge=1, le=10000),
                        offset: int = Query(0, ge=0)) -> Response:
        state = service.chain.state
        if key is not None:
            tid = state.twin_by_key.get(key)
            return _json([] if tid is None else [state.twins[tid].to_dict()])
        return _json([t.to_dict() for t in page(
            (state.twins[i] for i in sorted(state.twins.keys())), limit, offset)])

    @app.get("/twins/{twin_id}", summary="A twin: public key and next nonce.")
    async def get_twin(twin_id: int) -> Response:
        twin = service.chain.state.twins.get(twin_id)
        return _json(twin.to_dict()) if twin else _not_found(f"twin {twin_id}")

    @app.get("/accounts/{twin_id}", summary="A twin's balance (billing comes later).")
    async def get_account(twin_id: int) -> Response:
        balance = service.chain.state.balances.get(twin_id)
        if balance is None:
            return _not_found(f"twin {twin_id}")
        return _json({"twin": twin_id, "balance": balance})

    @app.get("/farms", summary="Farms, optionally by name or owner.")
    async def get_farms(name: str | None = None, owner: int | None = None,
                        limit: int = Query(100, ge=1, le=10000),
                        offset: int = Query(0, ge=0)) -> Response:
        state = service.chain.state
        farms = (state.farms[i] for i in sorted(state.farms.keys()))
        chosen = (f for f in farms if (name is None or f.name == name)
                  and (owner is None or f.owner == owner))
        return _json([f.to_dict() for f in page(chosen, limit, offset)])

    @app.get("/farms/{farm_id}", summary="A farm.")
    async def get_farm(farm_id: int) -> Response:
        farm = service.chain.state.farms.get(farm_id)
        return _json(farm.to_dict()) if farm else _not_found(f"farm {farm_id}")

    @app.get("/nodes", summary="Nodes by country, city, farm, twin, free capacity and status.")
    async def get_nodes(
        country: str | None = None,
        city: str | None = None,
        farm: int | None = None,
        twin: int | None = None,
        free_cru: int = Query(0, ge=0),
        free_mru: int = Query(0, ge=0),
        free_sru: int = Query(0, ge=0),
        free_hru: int = Query(0, ge=0),
        status: str | None = Query(None, pattern="^(up|down)$"),
        limit: int = Query(100, ge=1, le=10000),
        offset: int = Query(0, ge=0),
    ) -> Response:
        f = NodeFilter(country, city, farm, twin, free_cru, free_mru, free_sru, free_hru, status)
        return Response(service.nodes_json(f, limit, offset), media_type="application/json")

    @app.get("/nodes/{node_id}", summary="A node, with its free capacity and status.")
    async def get_node(node_id: int) -> Response:
        node = service.chain.state.nodes.get(node_id)
        if node is None:
            return _not_found(f"node {node_id}")
        return _json(node_view(node, int(service.clock())))

    @app.get("/contracts", summary="Contracts by owner, node, state, or stakeholder twin.")
    async def get_contracts(
        owner: int | None = None,
        node: int | None = None,
        state: str | None = Query(None, pattern="^(" + "|".join(CONTRACT_STATES) + ")$"),
        twin: int | None = None,
        limit: int = Query(100, ge=1, le=10000),
        offset: int = Query(0, ge=0),
    ) -> Response:
        return _json(find_contracts(service.chain.state, owner=owner, node=node,
                                    contract_state=state, twin=twin, limit=limit, offset=offset))

    @app.get("/contracts/{contract_id}", summary="A contract: versions, approvals, report.")
    async def get_contract(contract_id: int) -> Response:
        c = service.chain.state.contracts.get(contract_id)
        return _json(c.to_dict()) if c else _not_found(f"contract {contract_id}")

    @app.get("/templates", summary="Published templates, optionally by name or author.")
    async def get_templates(name: str | None = None, author: int | None = None,
                            limit: int = Query(100, ge=1, le=10000),
                            offset: int = Query(0, ge=0)) -> Response:
        state = service.chain.state
        chosen = (t for t in sorted(state.templates.values(), key=lambda t: (t.created, t.hash))
                  if (name is None or t.name == name) and (author is None or t.author == author))
        return _json([t.to_dict() for t in page(chosen, limit, offset)])

    @app.get("/templates/{template_hash}", summary="A template by its content hash.")
    async def get_template(template_hash: str) -> Response:
        tpl = service.chain.state.templates.get(template_hash)
        return _json(tpl.to_dict()) if tpl else _not_found(f"template {template_hash}")

    @app.get("/names", summary="Registered gateway names, optionally by owner.")
    async def get_names(owner: int | None = None, limit: int = Query(100, ge=1, le=10000),
                        offset: int = Query(0, ge=0)) -> Response:
        state = service.chain.state
        chosen = (n for n in (state.names[k] for k in sorted(state.names.keys()))
                  if owner is None or n.owner == owner)
        return _json([n.to_dict() for n in page(chosen, limit, offset)])

    @app.get("/names/{name}", summary="Who holds a gateway name.")
    async def get_name(name: str) -> Response:
        entry = service.chain.state.names.get(name)
        return _json(entry.to_dict()) if entry else _not_found(f"name {name!r}")

    @app.get(
        "/events",
        summary="Long-poll: transactions committed after height `since` (waits up to `timeout` s).",
    )
    async def get_events(
        since: int = Query(0, ge=0),
        timeout: float = Query(25.0, ge=0, le=300),
        node: int | None = None,
        contract: int | None = None,
        twin: int | None = None,
        type: str | None = None,
        full: bool = False,
    ) -> Response:
        filters = {"node": node, "contract": contract, "twin": twin, "type": type}
        return _json(await service.events(since, timeout, filters, full))

    @app.get("/events/stream", summary="Server-sent events: one `data:` line per transaction.")
    async def get_event_stream(
        since: int = Query(0, ge=0),
        node: int | None = None,
        contract: int | None = None,
        twin: int | None = None,
        type: str | None = None,
        full: bool = False,
    ) -> StreamingResponse:
        filters = {"node": node, "contract": contract, "twin": twin, "type": type}

        async def stream() -> AsyncIterator[bytes]:
            cursor = since
            while True:
                batch = await service.events(cursor, 15.0, filters, full)
                for event in batch["events"]:
                    yield b"id: %d\ndata: %s\n\n" % (event["height"], orjson.dumps(event))
                if batch["next"] == cursor:
                    yield b": keep-alive\n\n"
                cursor = batch["next"]

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
