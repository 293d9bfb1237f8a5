"""The ledger's HTTP JSON API (FastAPI) over a `LedgerService`: submit transactions,
query the state, follow events. The hot paths (submission, node queries) are answered by
a small ASGI layer in front of FastAPI; the FastAPI routes document them in the spec."""

from __future__ import annotations

import contextlib
import socket
import time as _time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from zerostack.crypto import Domain, Identity, billing_notice_digest
from zerostack.ledger.billing import billing_notice
from zerostack.ledger.chain import block_json, header_json
from zerostack.ledger.errors import HTTP_STATUS, LedgerError
from zerostack.ledger.explorer import mount as mount_explorer
from zerostack.ledger.query import NodeFilter, find_contracts, node_view, page
from zerostack.ledger.service import MAX_BATCH_BYTES, LedgerService
from zerostack.ledger.state import CONTRACT_STATES, billing_view, contract_prices
from zerostack.ledger.store import BlockLog, SqliteLog
from zerostack.ledger.tx import MAX_BATCH, MAX_TX_BYTES, SignedTxModel
from zerostack.ledger.validators import validators_view


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
            # ASCII digits and a bounded length: int() reads other scripts' digits too,
            # and refuses (with an exception) strings over 4,300 digits
            if not (value.isascii() and value.isdigit() and len(value) <= 16) or (
                    int(value) < _NODE_INTS[key]):
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


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(message: str, code: str, status: int | None = None) -> Response:
    return _json({"error": message, "code": code}, status or HTTP_STATUS.get(code, 400))


def _not_found(what: str) -> Response:
    return _error(f"{what} does not exist", "not_found", 404)


_TX_SCHEMA = SignedTxModel.model_json_schema()
_STATES = "|".join(CONTRACT_STATES)
# the paging parameters of every list
Limit = Annotated[int, Query(ge=1, le=10000)]
Offset = Annotated[int, Query(ge=0)]
Cursor = Annotated[str, Query(max_length=32, description=(
    "Event cursor: `H` (after every event of block H) or `H.I` (after event I, from 0, of "
    "block H). Past the head: 400."))]


def create_app(
    db: Path | str | BlockLog,
    operator: Identity,
    *,
    clock: Callable[[], float] = _time.time,
    block_interval: float = 0.0,
    policy: dict[str, Any] | None = None,
    etcd: Any = None,
) -> FastAPI:
    """The ASGI app for a ledger whose log is the SQLite file `db` (or any BlockLog),
    operated with the key `operator`. Raises `LedgerError` (`BadBlock`) when the log
    fails its checks: a ledger never serves a file `zerostack ledger verify` refuses."""
    blocklog: BlockLog = SqliteLog(db) if isinstance(db, (str, Path)) else db
    service: LedgerService
    try:
        if etcd is not None:  # a replica of a cluster ordered by etcd (ledger/replica.py)
            from zerostack.ledger.replica import ReplicaService

            service = ReplicaService(blocklog, operator, etcd, clock=clock, policy=policy)
        else:
            service = LedgerService(blocklog, operator, clock=clock,
                                    block_interval=block_interval, policy=policy)
    except BaseException:
        blocklog.close()
        raise

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

    @app.get("/head", summary="The last committed block's header, hash and signatures.")
    async def get_head() -> Response:
        return _json(service.chain.head_header())

    @app.get("/operator", summary="The public key that signs this ledger's block headers.")
    async def get_operator() -> Response:
        return _json({"key": operator.public_hex})

    @app.get("/blocks/{height}/header", summary="A block's header, hash and signatures.")
    async def get_block_header(height: int) -> Response:
        stored = service.log.block(height)
        if stored is None:
            return _not_found(f"block {height}")
        return _json(header_json(stored.data, stored.hash))

    @app.get("/blocks/{height}", summary="A block: header, hash and transactions.")
    async def get_block(height: int) -> Response:
        stored = service.log.block(height)
        if stored is None:
            return _not_found(f"block {height}")
        return _json(block_json(stored.data, stored.hash))

    @app.get("/validators", summary="The validator set, its epoch and quorum, and every "
             "change of it with the approvals of the set before.")
    async def get_validators() -> Response:
        def height_of(tx_hash: str) -> int | None:
            row = service.log.tx(tx_hash)
            return None if row is None else row.height

        return _json(validators_view(service.chain.state, height_of))

    @app.get("/cluster", summary="This replica's view of its cluster: its key, the heights "
             "it materialized and saw final, and its counters (a single ledger: mode single).")
    async def get_cluster() -> Response:
        status = getattr(service, "status", None)
        if status is None:
            return _json({"mode": "single", "key": operator.public_hex,
                          "materialized": service.chain.height, "final": service.chain.height})
        return _json({"mode": "replica", **status()})

    @app.get("/twins", summary="Twins, or the twin with public key `key`.")
    async def get_twins(key: str | None = None, limit: Limit = 100,
                        offset: Offset = 0) -> Response:
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

    @app.get("/accounts/{twin_id}", summary="A twin's balance, what it was paid, and its "
             "contracts in grace.")
    async def get_account(twin_id: int) -> Response:
        state = service.chain.state
        balance = state.balances.get(twin_id)
        if balance is None:
            return _not_found(f"twin {twin_id}")
        return _json({"twin": twin_id, "balance": balance,
                      "paid_out": state.paid_out.get(twin_id, 0),
                      "in_grace": state.graced_owners.get(twin_id, 0)})

    @app.get("/accounts/{twin_id}/payouts", summary="What a twin received as farmer or "
             "template author, per billing block (the last 1,000 rows).")
    async def get_payouts(twin_id: int, limit: Limit = 100, offset: Offset = 0) -> Response:
        state = service.chain.state
        if twin_id not in state.twins:
            return _not_found(f"twin {twin_id}")
        rows = list(reversed(state.payouts.get(twin_id, ())))
        return _json({"twin": twin_id, "total": state.paid_out.get(twin_id, 0),
                      "payouts": [r.to_dict() for r in page(iter(rows), limit, offset)]})

    @app.get("/policy", summary="The grid's pricing policy, a scheduled one, and its money.")
    async def get_policy() -> Response:
        return _json(billing_view(service.chain.state, int(service.clock())))

    @app.get("/nodes/{node_id}/prices", summary="The prices a contract created on this node "
             "now would be recorded with.")
    async def get_node_prices(node_id: int) -> Response:
        state = service.chain.state
        if node_id not in state.nodes:
            return _not_found(f"node {node_id}")
        prices = contract_prices(state, node_id, int(service.clock()))
        return _json({"node": node_id, "farm": state.nodes[node_id].farm,
                      "prices": None if prices is None else prices.to_dict()})

    @app.get("/contracts/{contract_id}/bill", summary="A contract's charges: per period and "
             "per resource, and where it stands.")
    async def get_bill(contract_id: int, limit: Limit = 1000, offset: Offset = 0) -> Response:
        state = service.chain.state
        c = state.contracts.get(contract_id)
        if c is None:
            return _not_found(f"contract {contract_id}")
        rows = state.charges.get(contract_id, ())
        return _json({"contract": c.id, "owner": c.owner, "node": c.node, "state": c.state,
                      "billing": c.billing.to_dict() if c.billing else None,
                      "charges": [r.to_dict() for r in page(iter(rows), limit, offset)]})

    @app.get("/contracts/{contract_id}/notice", summary="Where a contract stands with its "
             "payments as of the head block, signed by the grid's governing key.")
    async def get_notice(contract_id: int) -> Response:
        chain = service.chain
        if chain.state.operator != operator.public_hex:
            # only the grid's governing key speaks for billing; another replica of a
            # cluster would sign on its own word: send the client to another replica
            return _error("billing notices are signed by the grid's governing key, which "
                          "this replica does not hold: ask another", "unavailable", 503)
        notice = billing_notice(chain.state, contract_id, chain.height, chain.hash, chain.time)
        if notice is None:
            return _not_found(f"contract {contract_id}")
        notice["key"] = operator.public_hex
        notice["signature"] = operator.sign(Domain.BILLING_NOTICE,
                                            billing_notice_digest(notice)).hex()
        return _json(notice)

    @app.get("/farms", summary="Farms, optionally by name or owner.")
    async def get_farms(name: str | None = None, owner: int | None = None,
                        limit: Limit = 100,
                        offset: Offset = 0) -> Response:
        state = service.chain.state
        farms = (state.farms[i] for i in sorted(state.farms.keys()))
        chosen = (f for f in farms if (name is None or f.name == name)
                  and (owner is None or f.owner == owner))
        return _json([f.to_dict() for f in page(chosen, limit, offset)])

    @app.get("/farms/{farm_id}", summary="A farm.")
    async def get_farm(farm_id: int) -> Response:
        farm = service.chain.state.farms.get(farm_id)
        return _json(farm.to_dict()) if farm else _not_found(f"farm {farm_id}")

    @app.get("/farms/{farm_id}/pool", summary="A farm's public address pool.")
    async def get_farm_pool(farm_id: int) -> Response:
        state = service.chain.state
        if farm_id not in state.farms:
            return _not_found(f"farm {farm_id}")
        pool = sorted((e for e in state.public_ips.values() if e.farm == farm_id),
                      key=lambda e: (":" in e.ip, e.ip))
        return _json([e.to_dict() for e in pool])

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
        limit: Limit = 100,
        offset: Offset = 0,
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
        state: str | None = Query(None, pattern=f"^({_STATES})(,({_STATES}))*$",
                                  description="One state, or several separated by commas."),
        twin: int | None = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Response:
        return _json(find_contracts(service.chain.state, owner=owner, node=node,
                                    states=None if state is None else set(state.split(",")),
                                    twin=twin, limit=limit, offset=offset))

    @app.get("/contracts/{contract_id}", summary="A contract: versions, approvals, report.")
    async def get_contract(contract_id: int) -> Response:
        c = service.chain.state.contracts.get(contract_id)
        return _json(c.to_dict()) if c else _not_found(f"contract {contract_id}")

    @app.get("/templates", summary="Published templates, optionally by name or author.")
    async def get_templates(name: str | None = None, author: int | None = None,
                            limit: Limit = 100,
                            offset: Offset = 0) -> Response:
        state = service.chain.state
        chosen = (t for t in sorted(state.templates.values(), key=lambda t: (t.created, t.hash))
                  if (name is None or t.name == name) and (author is None or t.author == author))
        return _json([t.to_dict() for t in page(chosen, limit, offset)])

    @app.get("/templates/{template_hash}", summary="A template by its content hash.")
    async def get_template(template_hash: str) -> Response:
        tpl = service.chain.state.templates.get(template_hash)
        return _json(tpl.to_dict()) if tpl else _not_found(f"template {template_hash}")

    @app.get("/solutions", summary="Solutions, optionally by owner.")
    async def get_solutions(owner: int | None = None, limit: Limit = 100,
                            offset: Offset = 0) -> Response:
        state = service.chain.state
        if owner is None:
            ids: Any = sorted(state.solutions.keys())
        else:
            ids = sorted((state.solutions_by_owner.get(owner) or {}).keys())
        return _json([state.solutions[i].to_dict() for i in page(iter(ids), limit, offset)])

    @app.get("/solutions/{solution_id}", summary="A solution: its parts and approvals.")
    async def get_solution(solution_id: int) -> Response:
        sol = service.chain.state.solutions.get(solution_id)
        return _json(sol.to_dict()) if sol else _not_found(f"solution {solution_id}")

    @app.get("/names", summary="Registered gateway names, optionally by owner.")
    async def get_names(owner: int | None = None, limit: Limit = 100,
                        offset: Offset = 0) -> Response:
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
        summary="Long-poll: events after cursor `since` (waits up to `timeout` s for one).",
    )
    async def get_events(
        since: Cursor = "0",
        timeout: float = Query(25.0, ge=0, le=300),
        node: int | None = None,
        contract: int | None = None,
        twin: int | None = None,
        type: str | None = None,
        full: bool = False,
    ) -> Response:
        filters = {"node": node, "contract": contract, "twin": twin, "type": type}
        return _json(await service.events(since, timeout, filters, full))

    @app.get("/events/stream", summary=(
        "Server-sent events: one `data:` line per transaction, its `id:` the event's cursor "
        "`H.I`. A reconnect resumes after `Last-Event-ID` (else after `since`)."))
    async def get_event_stream(
        since: Cursor = "0",
        node: int | None = None,
        contract: int | None = None,
        twin: int | None = None,
        type: str | None = None,
        full: bool = False,
        last_event_id: Annotated[str | None, Header(max_length=32)] = None,
    ) -> StreamingResponse:
        filters = {"node": node, "contract": contract, "twin": twin, "type": type}
        start = last_event_id if last_event_id else since
        await service.position(start)  # a bad cursor is a 400, not a broken stream

        async def stream() -> AsyncIterator[bytes]:
            cursor = start
            while True:
                batch = await service.events(cursor, 15.0, filters, full)
                for event in batch["events"]:
                    yield b"id: %d.%d\ndata: %s\n\n" % (event["height"], event["index"],
                                                         orjson.dumps(event))
                if service.draining:
                    return
                if batch["next"] == cursor:
                    yield b": keep-alive\n\n"
                cursor = batch["next"]

        return StreamingResponse(stream(), media_type="text/event-stream")

    mount_explorer(app, service)
    return app


def serve(app: FastAPI, host: str, port: int, extra: Sequence[socket.socket] = ()) -> None:
    """Run a create_app() app under uvicorn on `host`:`port` and on the listening sockets
    in `extra`, until SIGTERM or SIGINT. On the signal the
    long-polls are answered at once, so shutting down takes as long as answering the
    submissions in flight and writing the pending block, not a long-poll's timeout."""
    import uvicorn

    service: LedgerService = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            service.drain_soon()

    # the graceful timeout is a backstop: a stuck request must not keep the ledger up
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            loop="uvloop", http="httptools", timeout_graceful_shutdown=3)
    if not extra:
        Server(config).run()
        return
    own = config.bind_socket()
    Server(config).run(sockets=[own, *extra])
