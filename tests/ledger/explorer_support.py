"""What the explorer's browser tests, its screenshots and its benchmark share: a real ledger
server on loopback (in this process, with a clock the test can move), a small grid on it,
Debian's Chromium driven by Playwright, and a server that serves tampered JSON."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import free_port, wait_for_port
from tests.ledger.world import GiB, hashes, requirement, sealed
from zerostack.crypto import Identity
from zerostack.ledger import LedgerClient
from zerostack.ledger.api import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


class Clock:
    """Wall-clock time plus an offset the test moves forward (never back)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Ledger:
    url: str
    clock: Clock
    operator: Identity


def _serve(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1, loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def ledger_server(db: Path) -> Iterator[Ledger]:
    """A ledger serving the SQLite file `db` on 127.0.0.1, with a movable clock."""
    clock = Clock()
    operator = Identity.generate()
    app = create_app(db, operator, clock=clock)
    for url in _serve(app):
        yield Ledger(url, clock, operator)


@dataclass
class SmallGrid:
    """What `seed` registered, to compare with what the pages show."""

    ids: dict[str, Identity] = field(default_factory=dict)
    twins: dict[str, int] = field(default_factory=dict)
    farms: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    contracts: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


NODES = [  # name, farm, country, city, cores, memory GiB
    ("gent1", "flanders", "BE", "Gent", 8, 32),
    ("gent2", "flanders", "BE", "Gent", 16, 64),
    ("liege1", "flanders", "BE", "Liège", 4, 16),
    ("ams1", "polder", "NL", "Amsterdam", 32, 128),
    ("ams2", "polder", "NL", "Amsterdam", 8, 32),
    ("berlin1", "spree", "DE", "Berlin", 16, 64),
]


def _identity(g: SmallGrid, client: LedgerClient, name: str) -> Identity:
    ident = Identity.generate()
    g.ids[name] = ident
    g.twins[name] = client.register_twin(ident)
    return ident


def seed(ledger: Ledger) -> SmallGrid:
    """Six nodes on three farms in three countries; `ams2` and `berlin1` stop sending
    heartbeats (down); contract `web` deployed with a signed report, contract `vote`
    waiting for a second stakeholder's approval; one template."""
    g = SmallGrid()
    with LedgerClient(ledger.url) as client:
        for name in ("alice", "bob", "carol", "farmer"):
            _identity(g, client, name)
        for farm in ("flanders", "polder", "spree"):
            g.farms[farm] = client.create_farm(g.ids["farmer"], farm)
        for name, farm, country, city, cores, mem in NODES:
            ident = _identity(g, client, name)
            g.nodes[name] = client.register_node(ident, g.farms[farm], {
                "cru": cores, "mru": mem * GiB, "sru": 512 * GiB, "hru": 4096 * GiB},
                country, city=city, endpoint=f"198.18.0.{len(g.nodes) + 2}:7000")
        # ten minutes and more pass: only the nodes that send a heartbeat stay up
        ledger.clock.offset += 700
        for name in ("gent1", "gent2", "liege1", "ams1"):
            client.heartbeat(g.ids[name], used={"cru": 1, "mru": 2 * GiB}, uptime=3600)
        keys = {g.twins[n]: g.ids[n].public_hex for n in g.ids}
        req = requirement(keys, g.twins["alice"])
        ids = hashes(1, req)
        g.hashes["web"] = ids["deployment_hash"]
        g.contracts["web"] = client.create_contract(
            g.ids["alice"], g.nodes["gent1"], ids["deployment_hash"], sealed(), req,
            body_hash=ids["body_hash"], capacity={"cru": 2, "mru": 4 * GiB},
            metadata="web shop")
        client.report(g.ids["gent1"], g.contracts["web"], 1, [
            {"name": "web", "type": "container", "state": "ok", "message": "running",
             "data": {"ip": "10.20.0.2"}},
            {"name": "data", "type": "volume", "state": "ok"}])
        req2 = requirement(keys, g.twins["alice"], g.twins["bob"], g.twins["carol"],
                           weight_required=2, required=(g.twins["bob"],))
        ids2 = hashes(2, req2)
        g.hashes["vote"] = ids2["deployment_hash"]
        g.contracts["vote"] = client.create_contract(
            g.ids["alice"], g.nodes["ams1"], ids2["deployment_hash"], sealed(), req2,
            body_hash=ids2["body_hash"], capacity={"cru": 4, "mru": 8 * GiB},
            metadata="shared database <b>not bold</b>")
        client.publish_template(g.ids["carol"], "wordpress", {
            "parameters": {"domain": {"type": "string"}, "memory": {"type": "integer"},
                           "theme": {"type": "string", "default": "plain"}},
            "stakeholders": [{"role": "legal", "required": True}, {"role": "design"}],
            "workloads": []}, version="1.0", description="A blog with its database")
    return g


def new_contract(ledger: Ledger, g: SmallGrid, n: int) -> int:
    """Another contract by bob on berlin1 (for the live-update tests)."""
    with LedgerClient(ledger.url) as client:
        keys = {g.twins[k]: g.ids[k].public_hex for k in g.ids}
        req = requirement(keys, g.twins["bob"])
        ids = hashes(100 + n, req)
        return client.create_contract(g.ids["bob"], g.nodes["gent2"], ids["deployment_hash"],
                                      sealed(), req, body_hash=ids["body_hash"])


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, with a fresh profile; Playwright never downloads one."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="zs-explorer-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


Tamper = Callable[[str, Any], Any]


@contextmanager
def tampering_server(upstream: str, tamper: Tamper) -> Iterator[str]:
    """A server that forwards GETs to `upstream` and passes each JSON answer through
    `tamper(path, data)`: a ledger that lies. It serves no event stream."""
    client = httpx.Client(base_url=upstream, timeout=10)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if path.startswith("/events/stream"):
            return Response(b'{"error":"no stream here"}', 404, media_type="application/json")
        query = request.url.query
        answer = client.get(path + (f"?{query}" if query else ""),
                            headers={"accept-encoding": "identity"})
        kind = answer.headers.get("content-type", "")
        headers = {k: v for k, v in answer.headers.items()
                   if k in ("content-security-policy", "etag", "cache-control")}
        if kind.startswith("application/json") and answer.status_code == 200:
            data = tamper(path, orjson.loads(answer.content))
            return Response(orjson.dumps(data), 200, media_type="application/json")
        return Response(answer.content, answer.status_code, headers=headers, media_type=kind)

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET"])])
    try:
        yield from _serve(app)
    finally:
        client.close()
