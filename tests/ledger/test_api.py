"""The ledger server as a real process: clients, bad input over HTTP, events, restart, verify."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd
from tests.ledger.world import GiB, hashes, requirement, sealed
from zerostack.crypto import Identity
from zerostack.ledger import AsyncLedgerClient, LedgerClient, LedgerError, LedgerRejected, sign_tx


@dataclass
class Server:
    url: str
    db: Path
    port: int
    proc: subprocess.Popen[bytes]


def start(procs: ProcessGroup, db: Path, port: int | None = None, *extra: str) -> Server:
    port = port or free_port()
    proc = procs.start([*zerostack_cmd(), "ledger", "serve", "--db", str(db),
                        "--listen", f"127.0.0.1:{port}", *extra], stdout=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return Server(f"http://127.0.0.1:{port}", db, port, proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that only add fresh identities (starting one takes ~2 s)."""
    group = ProcessGroup()
    try:
        yield start(group, tmp_path_factory.mktemp("ledger") / "ledger.db")
    finally:
        group.stop_all()


@pytest.fixture
def client(server: Server) -> Iterator[LedgerClient]:
    with LedgerClient(server.url) as c:
        yield c


def grid(client: LedgerClient) -> dict[str, Any]:
    """Owner + two stakeholders + one node on a farm, registered through the client."""
    ids = {name: Identity.generate() for name in ("owner", "s1", "s2", "node")}
    twins = {name: client.register_twin(ident) for name, ident in ids.items()}
    farm = client.create_farm(ids["owner"], f"farm-{ids['owner'].public_hex[:8]}")
    node = client.register_node(ids["node"], farm, {"cru": 4, "mru": 8 * GiB}, "BE",
                                city="Gent", endpoint="198.18.0.2:7000")
    return {"ids": ids, "twins": twins, "farm": farm, "node": node}


def contract(client: LedgerClient, g: dict[str, Any], n: int, *others: str,
             weight_required: int | None = None, **kw: Any) -> tuple[int, str]:
    """The owner creates contract `n` of grid `g` with `others` as stakeholders."""
    keys = {g["twins"][name]: ident.public_hex for name, ident in g["ids"].items()}
    req = requirement(keys, g["twins"]["owner"], *(g["twins"][o] for o in others),
                      weight_required=weight_required)
    ids = hashes(n, req)
    cid = client.create_contract(g["ids"]["owner"], g["node"], ids["deployment_hash"],
                                 sealed(), req, body_hash=ids["body_hash"], **kw)
    return cid, ids["deployment_hash"]


def test_contract_flow_through_the_client(client: LedgerClient) -> None:
    g = grid(client)
    ids, twins = g["ids"], g["twins"]
    assert client.register_twin(ids["owner"]) == twins["owner"]  # idempotent
    cid, h = contract(client, g, 1, "s1", "s2", weight_required=2, capacity={"mru": 2 * GiB})
    assert client.contract(cid)["state"] == "created"  # type: ignore[index]
    assert client.contracts(node=g["node"], state="created")[0]["id"] == cid
    assert client.contracts(node=g["node"], state="approved,deployed") == []
    assert [c["id"] for c in client.contracts(node=g["node"], state="deleted,created")] == [cid]
    since = client.head()["height"]
    client.approve(ids["s1"], cid, h)
    c = client.wait_contract(cid, {"approved"}, timeout=5)
    assert c["active"]["deployment_hash"] == h
    events = client.events(since, timeout=0, node=g["node"])["events"]
    assert [e["type"] for e in events] == ["contract.approve"]
    client.report(ids["node"], cid, 1, [{"name": "db", "type": "zdb", "state": "ok",
                                         "data": {"port": 9900}}])
    assert client.contract(cid)["state"] == "deployed"  # type: ignore[index]
    node = client.node(g["node"])
    assert node is not None and node["free"]["mru"] == 6 * GiB and node["status"] == "up"
    listed = client.nodes(country="BE", free_mru=6 * GiB, status="up")
    assert [n["id"] for n in listed] == [g["node"]] and listed[0] == node
    assert client.nodes(country="BE", free_mru=6 * GiB + 1) == []
    assert client.nodes(country="NL") == []
    tpl = client.publish_template(ids["owner"], "zdb", {"workloads": [], "by": twins["owner"]})
    assert client.template(tpl)["author"] == twins["owner"]  # type: ignore[index]
    client.register_name(ids["s2"], "shop-flow")
    assert client.name("shop-flow")["owner"] == twins["s2"]  # type: ignore[index]
    client.cancel(ids["owner"], cid)
    client.report(ids["node"], cid, 1, [{"name": "db", "state": "deleted"}])
    assert client.contract(cid)["state"] == "deleted"  # type: ignore[index]
    assert client.contract(999) is None
    assert client.account(twins["s1"]) == {"twin": twins["s1"], "balance": 0, "paid_out": 0,
                                           "in_grace": 0}


def raw_post(server: Server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body,
                      headers={"content-type": "application/json"})


def test_bad_input_is_refused_precisely_and_changes_nothing(server: Server,
                                                             client: LedgerClient) -> None:
    g = grid(client)
    ids, twins = g["ids"], g["twins"]
    owner = twins["owner"]
    nonce = client.next_nonce(owner)
    head = client.head()
    good = sign_tx(ids["owner"], "name.register", owner, nonce, {"name": "ok"})

    def refused(body: bytes, status: int, words: str, path: str = "/tx") -> None:
        r = raw_post(server, path, body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"], r.json()

    refused(b"{not json", 400, "not JSON")
    refused(b"[1, 2]", 400, "JSON object")
    refused(orjson.dumps({**good, "extra": 1}), 422, "unknown field 'extra'")
    refused(orjson.dumps({**good, "type": "node.destroy"}), 422, "unknown transaction type")
    refused(orjson.dumps(sign_tx(ids["owner"], "name.register", owner, nonce,
                                 {"name": "ok", "ttl": 5})), 422, "unknown field 'ttl'")
    refused(orjson.dumps(sign_tx(ids["s1"], "name.register", owner, nonce, {"name": "ok"})),
            401, "signature does not verify")
    refused(orjson.dumps(sign_tx(ids["owner"], "name.register", owner, nonce + 3,
                                 {"name": "ok"})), 409, "out of order")
    refused(b'{"pad": "' + b"x" * 200_000 + b'"}', 413, "limit")
    # unauthorised: a stakeholder who is not the owner cancels
    cid, h = contract(client, g, 7, "s1")
    with pytest.raises(LedgerRejected) as info:
        client.cancel(ids["s1"], cid)
    assert info.value.status == 403 and "only the owner" in str(info.value)
    head = client.head()
    refused(orjson.dumps(sign_tx(ids["s2"], "contract.approve", twins["s2"],
                                 client.next_nonce(twins["s2"]),
                                 {"contract": cid, "deployment_hash": h,
                                  "signature": "00" * 64})), 403, "not a stakeholder")
    # replay an accepted transaction
    nonce = client.next_nonce(owner)
    tx = sign_tx(ids["owner"], "name.register", owner, nonce, {"name": "once"})
    assert raw_post(server, "/tx", orjson.dumps(tx)).status_code == 200
    head = client.head()
    refused(orjson.dumps(tx), 409, "already used")
    # batches: independent results, and limits
    results = client.submit_many([
        sign_tx(ids["owner"], "name.register", owner, nonce + 1, {"name": "b1"}),
        {"type": "name.register"},
        sign_tx(ids["owner"], "name.register", owner, nonce + 2, {"name": "b1"}),
    ])
    assert "receipt" in results[0]
    assert results[1]["code"] == "malformed" and results[2]["code"] == "conflict"
    refused(b"{}", 400, "JSON array", path="/txs")
    refused(orjson.dumps([{}] * 2001), 413, "at most", path="/txs")
    after = client.head()
    assert after["height"] == head["height"] + 1  # only the batch's good tx made a block
    assert client.twin(owner)["nonce"] == nonce + 2  # type: ignore[index]
    r = httpx.get(server.url + "/contracts", params={"state": "approved,running"})
    assert r.status_code == 422 and "state" in r.json()["error"]
    r = httpx.get(server.url + "/nodes", params={"free_mru": -1})
    assert r.status_code == 422 and "error" in r.json()
    assert httpx.get(server.url + "/contracts/77").json() == {
        "error": "contract 77 does not exist", "code": "not_found"}
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/tx", "/txs", "/events", "/nodes"} <= set(spec["paths"])


def test_events_long_poll_wakes_on_a_new_block(client: LedgerClient) -> None:
    ident = Identity.generate()
    twin = client.register_twin(ident)
    head = client.head()["height"]
    got: dict[str, Any] = {}

    def poll() -> None:
        start = time.monotonic()
        got["batch"] = client.events(head, timeout=20, twin=twin)
        got["waited"] = time.monotonic() - start

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.3)
    client.register_name(ident, "late")
    waiter.join(10)
    assert got["waited"] < 5
    assert [e["type"] for e in got["batch"]["events"]] == ["name.register"]
    assert got["batch"]["next"] == str(head + 1)
    idle = client.events(head + 1, timeout=0.2)
    assert idle["events"] == [] and idle["next"] == str(head + 1)


def test_server_sent_events(server: Server, client: LedgerClient) -> None:
    ident = Identity.generate()
    client.register_twin(ident)
    with httpx.stream("GET", server.url + "/events/stream", params={"since": 0},
                      timeout=10) as r:
        lines = r.iter_lines()
        data = next(line for line in lines if line.startswith("data:"))
    assert orjson.loads(data[5:])["type"] == "twin.register"


def test_async_client(server: Server) -> None:
    async def main() -> None:
        async with AsyncLedgerClient(server.url) as c:
            a, n = Identity.generate(), Identity.generate()
            owner = await c.register_twin(a)
            await c.register_twin(n)
            farm = await c.create_farm(a, "async-farm")
            node = await c.register_node(n, farm, {"cru": 1}, "FR")
            await c.heartbeat(n, used={"cru": 1}, uptime=3)
            req = requirement({owner: a.public_hex}, owner)
            ids = hashes(9, req)
            cid = await c.create_contract(a, node, ids["deployment_hash"], sealed(), req,
                                          body_hash=ids["body_hash"])
            contract = await c.wait_contract(cid, {"approved"}, timeout=5)
            assert contract["owner"] == owner
            # concurrent sends from one identity keep their nonces in order
            await asyncio.gather(*(c.register_name(a, f"n{i}") for i in range(5)))
            assert len(await c.names(owner=owner)) == 5
            assert (await c.node(node))["free"]["cru"] == 0  # type: ignore[index]

    asyncio.run(main())


def test_restart_keeps_state_and_verify_detects_edits(procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    server = start(procs, db)
    with LedgerClient(server.url) as c:
        g = grid(c)
        head = c.head()
        from_memory = c.events(0, timeout=0, full=True)
    server.proc.kill()  # no clean shutdown: what was answered must be on disk
    server.proc.wait()
    again = start(procs, db)
    with LedgerClient(again.url) as c:
        assert c.head() == head
        # a fresh server reads old events from the log: the same answer
        assert c.events(0, timeout=0, full=True) == from_memory
        assert len(from_memory["events"]) == 6
        assert c.node(g["node"])["location"]["city"] == "Gent"  # type: ignore[index]
        c.register_name(g["ids"]["s1"], "after-restart")
    again.proc.terminate()
    again.proc.wait(10)
    ok = subprocess.run([*zerostack_cmd(), "ledger", "verify", "--db", str(db), "--json"],
                        capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert orjson.loads(ok.stdout)["height"] == head["height"] + 1
    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM blocks WHERE height = 3").fetchone()
        conn.execute("UPDATE blocks SET data = ? WHERE height = 3",
                     (bytes(data).replace(b'"nonce":0', b'"nonce":1', 1),))
    bad = subprocess.run([*zerostack_cmd(), "ledger", "verify", "--db", str(db), "--json"],
                         capture_output=True, check=False)
    assert bad.returncode == 1
    assert orjson.loads(bad.stdout)["bad_block"] == 3


def test_deadline_expires_without_other_traffic(client: LedgerClient) -> None:
    g = grid(client)
    ids = g["ids"]
    cid, h = contract(client, g, 11, "s1",
                                 # 2 s: the block that takes the contract may be
                                 # stamped in the next second, and a deadline must
                                 # lie after its block's time
                                 deadline=int(time.time()) + 2, capacity={"cru": 1})
    assert client.node(g["node"])["reserved"]["cru"] == 1  # type: ignore[index]
    # the server cuts an empty block once the deadline has passed
    c = client.wait_contract(cid, {"expired"}, timeout=8)
    assert c["active"] is None
    assert client.node(g["node"])["reserved"]["cru"] == 0  # type: ignore[index]
    with pytest.raises(LedgerRejected) as info:
        client.approve(ids["s1"], cid, h)
    assert "expired" in str(info.value)


def test_cli_queries(server: Server, client: LedgerClient) -> None:
    g = grid(client)
    cid, _ = contract(client, g, 12)

    def cli(*args: str) -> Any:
        out = subprocess.run([*zerostack_cmd(), "ledger", *args, "--ledger", server.url,
                              "--json"], capture_output=True, check=True)
        return orjson.loads(out.stdout)

    assert cli("head")["height"] >= 1
    assert cid in [c["id"] for c in cli("contracts", "--owner", str(g["twins"]["owner"]))]
    assert cli("contract", str(cid))["state"] == "approved"
    assert g["node"] in [n["id"] for n in cli("nodes", "--country", "BE")]
    assert cli("block", "1")["height"] == 1
    out = subprocess.run([*zerostack_cmd(), "ledger", "events", "--since", "0", "--contract",
                          str(cid), "--ledger", server.url, "--json"],
                         capture_output=True, check=True)
    assert [orjson.loads(line)["type"] for line in out.stdout.splitlines()] == [
        "contract.create"]
    missing = subprocess.run([*zerostack_cmd(), "ledger", "contract", "9999", "--ledger",
                              server.url], capture_output=True, check=False)
    assert missing.returncode == 1 and b"does not exist" in missing.stderr


def test_follow_and_wait_for_timeout(client: LedgerClient) -> None:
    ident = Identity.generate()
    since = client.head()["height"]
    twin = client.register_twin(ident)
    client.register_name(ident, f"follow-{twin}")
    seen = []
    for event in client.follow(since, twin=twin):
        seen.append(event["type"])
        if len(seen) == 2:
            break
    assert seen == ["twin.register", "name.register"]
    with pytest.raises(LedgerError) as info:
        client.wait_for(lambda: None, timeout=0.3)
    assert info.value.code == "timeout"


def test_send_many_resigns_after_a_refusal(client: LedgerClient) -> None:
    ident = Identity.generate()
    twin = client.register_twin(ident)
    names = [f"b{twin}-{n}" for n in (1, 1, 2, 3)]
    results = client.send_many(ident, "name.register", [{"name": n} for n in names])
    # the duplicate is refused; the two after it are re-signed with fresh nonces
    assert "height" in results[0] and results[1]["code"] == "conflict"
    assert all("height" in r for r in results[2:])
    client.register_name(ident, f"b{twin}-4")  # and the nonce book is right afterwards
    assert len(client.names(owner=twin)) == 4


def test_sigterm_answers_long_polls_and_writes_the_pending_block(procs: ProcessGroup,
                                                                tmp_path: Path) -> None:
    """SIGTERM with a long-poll open: the poll is answered at once, the submission waiting
    for its block gets it, and the server exits within seconds."""
    # the block interval holds the next block back, so a submission waits at the SIGTERM
    server = start(procs, tmp_path / "ledger.db", None, "--block-interval", "1.5")
    with LedgerClient(server.url) as client:
        client.register_twin(Identity.generate())
        head = client.head()["height"]
    ident = Identity.generate()
    answers: dict[str, tuple[float, httpx.Response]] = {}

    def ask(name: str, method: str, path: str, **kw: Any) -> None:
        response = httpx.request(method, server.url + path, timeout=30, **kw)
        answers[name] = (time.monotonic(), response)

    asks = [threading.Thread(target=ask, args=("poll", "GET", "/events"),
                             kwargs={"params": {"since": head, "timeout": 25}}),
            threading.Thread(target=ask, args=("submit", "POST", "/tx"), kwargs={
                "content": orjson.dumps(sign_tx(ident, "twin.register", ident.public_hex, 0,
                                                {}))})]
    for thread in asks:
        thread.start()
    time.sleep(0.3)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    took = time.monotonic() - sent
    for thread in asks:
        thread.join(5)
    poll_at, poll = answers["poll"]
    assert poll.status_code == 200 and poll.json()["events"] == []
    assert poll_at - sent < 1.0  # answered at the signal, not at its timeout
    submit_at, submitted = answers["submit"]
    assert submitted.status_code == 200 and submitted.json()["height"] == head + 1
    assert poll_at < submit_at  # not woken by the pending block: by the shutdown
    assert took < 3.0
    verified = subprocess.run([*zerostack_cmd(), "ledger", "verify", "--db", str(server.db),
                               "--json"], capture_output=True, check=True)
    assert orjson.loads(verified.stdout)["height"] == head + 1
