"""The node and the user's side trust no server. A man in the middle between them and the
real ledger forges approvals, invents contracts in a victim's name, replays a signed
deployment under another contract id, says a contract is cancelled or gone without the
signed votes, and serves another node key: nothing is provisioned, deleted or sealed to
the attacker."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import ProcessGroup, free_port, wait_for_port
from tests.node.harness import Grid
from tests.node.test_agent_e2e import namespaces, open_ns
from zerostack.bot import BotError, ThreeBot
from zerostack.crypto import Domain, Identity, KeyPins, approval_digest, envelope_recipients
from zerostack.workloads import seal_instructions

Tamper = Callable[[dict[str, Any]], dict[str, Any]]
Rewrite = Callable[[str, int, Any], tuple[int, Any]]


def contracts_only(tamper: Tamper) -> Rewrite:
    """A rewrite that passes every contract the proxy serves through `tamper`."""
    def rewrite(path: str, status: int, data: Any) -> tuple[int, Any]:
        if path.startswith("/contracts") and status == 200:
            data = [tamper(c) for c in data] if isinstance(data, list) else tamper(data)
        return status, data
    return rewrite


@contextmanager
def tampering_proxy(upstream: str, tamper: Tamper | None = None,
                    rewrite: list[Rewrite] | None = None) -> Iterator[str]:
    """A man in the middle: forwards everything, rewrites the JSON answers of GETs with
    `rewrite[0]` (a one-item list the test may swap while the proxy runs)."""
    client = httpx.AsyncClient(base_url=upstream, timeout=60)
    rules = rewrite if rewrite is not None else [contracts_only(tamper or (lambda c: c))]

    async def forward(request: Request) -> Response:
        resp = await client.request(request.method, request.url.path,
                                    params=request.query_params, content=await request.body(),
                                    headers={"content-type": "application/json"})
        body, status = resp.content, resp.status_code
        if request.method == "GET" and body and not request.url.path.startswith("/events"):
            status, data = rules[0](request.url.path, status, orjson.loads(body))
            body = orjson.dumps(data)
        return Response(body, status, media_type="application/json")

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


def passthrough(path: str, status: int, data: Any) -> tuple[int, Any]:
    return status, data


def test_a_lying_ledger_cannot_delete_replay_or_invent(procs: ProcessGroup,
                                                       tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    owner, owner_twin = grid.user()
    holder, holder_twin = grid.user()
    attacker = Identity.generate()
    rule: list[Rewrite] = [passthrough]
    status_port = free_port()
    with tampering_proxy(grid.url, rewrite=rule) as lying_ledger:
        proc, zport, data = grid.start_node("node", "--status-port", str(status_port),
                                            ledger=lying_ledger)
        node = grid.node_id(data, proc)
        wait_for_port(status_port)

        def node_contract(cid: int) -> dict[str, Any]:
            snap = httpx.get(f"http://127.0.0.1:{status_port}/").json()
            return next((c for c in snap["contracts"] if c["id"] == cid), {})

        def wait_message(cid: int, needle: str) -> str:
            deadline = time.monotonic() + 15
            while needle not in node_contract(cid).get("message", ""):
                assert time.monotonic() < deadline, (node_contract(cid), grid.log_tail("node"))
                time.sleep(0.1)
            return str(node_contract(cid)["message"])

        # A: deleting needs the owner's and the holder's votes
        with grid.bot(owner) as bot:
            dep_a = bot.build({"workloads": [{"type": "zdb", "name": "a", "size": "1M",
                                              "password": "p"}],
                               "delete_requirement": {
                                   "requests": [{"twin": holder_twin, "required": True}],
                                   "weight_required": 2}}, [], None)
            a = bot.deploy(dep_a, node)
        # B: owner only
        b, _ = grid.deploy(owner, owner_twin, [{"type": "zdb", "name": "b", "size": "1M",
                                                "password": "p"}], node)
        grid.wait_contract(a, {"deployed"})
        grid.wait_contract(b, {"deployed"})
        open_ns(zport, f"c{a}-a", "p").execute_command("SET", "k", "kept")

        # 1. the owner alone votes: the real ledger keeps A; a lie says it is cancelled
        grid.client.cancel(owner, a)
        assert grid.client.contract(a)["state"] == "deployed"

        def says_cancelled(path: str, status: int, data: Any) -> tuple[int, Any]:
            return contracts_only(lambda c: {**c, "state": "cancelled"}
                                  if c.get("id") == a else c)(path, status, data)

        rule[0] = says_cancelled
        msg = wait_message(a, "anomaly")
        assert "delete quorum does not hold" in msg and f"twin(s) {holder_twin}" in msg
        # 2. the ledger says A does not exist any more
        def says_gone(path: str, status: int, data: Any) -> tuple[int, Any]:
            if path == f"/contracts/{a}":
                return 404, {"error": "not found", "code": "not_found"}
            if path.startswith("/contracts") and isinstance(data, list):
                return status, [c for c in data if c.get("id") != a]
            return status, data

        rule[0] = says_gone
        wait_message(a, "is missing")
        time.sleep(1.5)  # more than one resync pass
        assert f"c{a}-a" in namespaces(zport, data)
        assert open_ns(zport, f"c{a}-a", "p").execute_command("GET", "k") == b"kept"

        # 3. B's signed deployment replayed as another contract (the owner's approval made
        #    at creation names no contract id)
        real_b = grid.client.contract(b)
        fake_id = b + 1000

        def replays(path: str, status: int, data: Any) -> tuple[int, Any]:
            if path.startswith("/contracts") and isinstance(data, list) and status == 200:
                return status, [*data, {**real_b, "id": fake_id, "report": None}]
            if path == f"/contracts/{fake_id}":
                return 200, {**real_b, "id": fake_id, "report": None}
            return status, data

        rule[0] = replays
        wait_message(fake_id, f"already ran here as contract {b}")

        # 4. a contract invented in the owner's name: the attacker's key as the owner's
        with grid.bot(owner) as bot:
            forged = bot.build({"workloads": [{"type": "zdb", "name": "evil", "size": "1M"}]},
                               [], None)
        spec = forged.to_dict()
        spec["signature_requirement"]["requests"][0]["key"] = attacker.public_hex
        forged = type(forged).parse(spec)
        sealed = seal_instructions(forged, attacker, grid.client.twin(
            grid.client.node(node)["twin"])["public_key"])
        invented_id = 7777
        invented = {**real_b, "id": invented_id, "owner": owner_twin,
                    "deployment_hash": forged.hash(), "instructions": sealed,
                    "approvals": {str(owner_twin): forged.approve(attacker, 0, 1, node)}}
        invented["active"] = {**real_b["active"], "deployment_hash": forged.hash(),
                              "instructions": sealed, "approvals": invented["approvals"]}

        def invents(path: str, status: int, data: Any) -> tuple[int, Any]:
            if path.startswith("/contracts") and isinstance(data, list) and status == 200:
                return status, [*data, invented]
            if path == f"/contracts/{invented_id}":
                return 200, invented
            return status, data

        rule[0] = invents
        wait_message(invented_id, f"twin {owner_twin}'s key is now")
        assert namespaces(zport, data) == {f"c{a}-a", f"c{b}-b"}

        # 5. back to the truth: the holder's vote completes the delete quorum
        rule[0] = passthrough
        grid.client.cancel(holder, a)
        c = grid.wait_contract(a, {"deleted"})
        assert [w["state"] for w in c["report"]["workloads"]] == ["deleted"]
        assert namespaces(zport, data) == {f"c{b}-b"}


def test_the_users_side_refuses_a_node_key_it_did_not_pin(procs: ProcessGroup,
                                                          tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    _, _, _, node = grid.ready_node()
    owner, _ = grid.user()
    attacker = Identity.generate()
    pins = KeyPins(tmp_path / "pins.json")
    node_twin = grid.client.node(node)["twin"]
    with ThreeBot(grid.url, owner, pins=pins) as bot:
        first = bot.deploy(bot.build({"workloads": [{"type": "zdb", "name": "x", "size": "1M"}]},
                                     [], None), node)

    def fake_node_key(path: str, status: int, data: Any) -> tuple[int, Any]:
        if path == f"/twins/{node_twin}" and status == 200:
            return status, {**data, "public_key": attacker.public_hex}
        return status, data

    with tampering_proxy(grid.url, rewrite=[fake_node_key]) as lying_ledger, \
            ThreeBot(lying_ledger, owner, pins=KeyPins(tmp_path / "pins.json")) as bot:
        dep = bot.build({"workloads": [{"type": "zdb", "name": "y", "size": "1M"}]}, [], None)
        with pytest.raises(BotError, match=f"node {node}'s key is now"):
            bot.deploy(dep, node)
    # nothing was created after the first contract, and nothing was sealed to the attacker
    assert [c["id"] for c in grid.client.contracts(node=node)] == [first]
    sealed = base64.b64decode(grid.client.contract(first)["instructions"])
    assert attacker.public_hex not in envelope_recipients(sealed)
