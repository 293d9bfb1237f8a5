"""The node trusts no server: a ledger endpoint that lies about a contract's approvals
(forged signatures the real ledger never accepted) gets nothing provisioned."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import ProcessGroup, free_port, wait_for_port
from tests.node.harness import Grid
from tests.node.test_agent_e2e import namespaces, open_ns
from zerostack.crypto import Domain, Identity, approval_digest

Tamper = Callable[[dict[str, Any]], dict[str, Any]]


@contextmanager
def tampering_proxy(upstream: str, tamper: Tamper) -> Iterator[str]:
    """A man in the middle: forwards everything, rewrites every contract it serves."""
    client = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def forward(request: Request) -> Response:
        resp = await client.request(request.method, request.url.path,
                                    params=request.query_params, content=await request.body(),
                                    headers={"content-type": "application/json"})
        body = resp.content
        if request.method == "GET" and request.url.path.startswith("/contracts") \
                and resp.status_code == 200:
            data = orjson.loads(body)
            data = [tamper(c) for c in data] if isinstance(data, list) else tamper(data)
            body = orjson.dumps(data)
        return Response(body, resp.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_forged_approvals_from_a_lying_ledger_are_refused(procs: ProcessGroup,
                                                         tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    owner, owner_twin = grid.user()
    holder, holder_twin = grid.user()
    attacker = Identity.generate()
    target: dict[str, int] = {}

    def forge(c: dict[str, Any]) -> dict[str, Any]:
        # Pretend the stakeholder approved: a signature made with the attacker's key.
        if c.get("id") != target.get("cid") or c["state"] != "created":
            return c
        h = c["deployment_hash"]
        approvals = {**c["approvals"],
                     str(holder_twin): attacker.sign(Domain.APPROVAL, approval_digest(c["id"], c["version"], c["node"], h)).hex()}
        active = {k: c[k] for k in ("version", "deployment_hash", "instructions",
                                    "signature_requirement", "capacity", "deadline")}
        return {**c, "state": "approved", "pending": False, "approvals": approvals,
                "active": {**active, "approvals": approvals}}

    status_port = free_port()
    with tampering_proxy(grid.url, forge) as lying_ledger:
        proc, zport, data = grid.start_node("node", "--status-port", str(status_port),
                                            ledger=lying_ledger)
        node = grid.node_id(data, proc)
        cid, dep = grid.deploy(owner, owner_twin,
                               [{"type": "zdb", "name": "db", "size": "1M", "password": "p"}],
                               node, [f"{holder_twin}:1:required"])
        target["cid"] = cid

        def node_view() -> dict[str, Any]:
            snap = httpx.get(f"http://127.0.0.1:{status_port}/").json()
            return next((c for c in snap["contracts"] if c["id"] == cid), {})

        wait_for_port(status_port)
        deadline = time.monotonic() + 15
        while "does not verify" not in node_view().get("message", ""):
            assert time.monotonic() < deadline, grid.log_tail("node")
            time.sleep(0.1)
        assert f"approval of twin {holder_twin} does not verify" in node_view()["message"]
        assert namespaces(zport, data) == set()
        # the real approval arrives: judged again, provisioned
        grid.client.approve(holder, cid, dep.hash())
        c = grid.wait_contract(cid, {"deployed", "error"})
        assert c["state"] == "deployed", c["report"]
        assert open_ns(zport, f"c{cid}-db", "p").execute_command("SET", "k", "v") == b"k"
