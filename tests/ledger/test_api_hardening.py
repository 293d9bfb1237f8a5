"""Attacks on the ledger's input, each against a real `ledger serve` process: deep nesting,
integers past what JSON clients hold, capacity griefing and overflow, look-alike names,
and event cursors. Each asserts that nothing was accepted and that the error says why."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ProcessGroup
from tests.ledger.test_api import Server, grid, raw_post, start
from tests.ledger.world import GiB, hashes, requirement, sealed
from zerostack.crypto import MAX_INT, Domain, Identity
from zerostack.crypto.canonical import hash_bytes
from zerostack.ledger import LedgerClient, LedgerError, LedgerRejected
from zerostack.ledger import service as service_module
from zerostack.ledger.client import contract_payload
from zerostack.ledger.service import LedgerService
from zerostack.ledger.state import MAX_PENDING_PER_TWIN
from zerostack.ledger.store import SqliteLog
from zerostack.ledger.tx import PAYLOADS, Tx, parse_tx, sign_approval

OPERATOR = Identity.generate()
"""The ledger operator's key for the in-process services these tests run."""


def signed_raw(ident: Identity, ttype: str, sender: int | str, nonce: int,
               payload: dict[str, Any]) -> dict[str, Any]:
    """A correctly signed transaction built without sign_tx, whose canonical checks would
    refuse the values these attacks need."""
    body = {"type": ttype, "sender": sender, "nonce": nonce, "payload": payload}
    digest = hash_bytes(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return {**body, "signature": ident.sign(Domain.TRANSACTION, digest).hex()}


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def template(levels: int) -> dict[str, Any]:
    return {"name": "deep", "body": {"x": nested(levels)}}


def too_deep_to_sign(sender: int, nonce: int, levels: int) -> bytes:
    """A template.publish nested `levels` deep, written out by hand: past 254 levels the
    encoder refuses it, so it cannot be signed (parsing refuses it before that check)."""
    wire = {"type": "template.publish", "sender": sender, "nonce": nonce,
            "payload": {"name": "deep", "body": {"x": "@deep"}}, "signature": "00" * 64}
    return orjson.dumps(wire).replace(b'"@deep"', b'{"k":' * levels + b"1" + b"}" * levels)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    group = ProcessGroup()
    try:
        yield start(group, tmp_path_factory.mktemp("ledger") / "ledger.db")
    finally:
        group.stop_all()


@pytest.fixture
def client(server: Server) -> Iterator[LedgerClient]:
    with LedgerClient(server.url) as c:
        yield c


# ---- nesting ------------------------------------------------------------------------------


def test_deep_nesting_is_refused_and_never_stops_writes(procs: ProcessGroup,
                                                         tmp_path: Path) -> None:
    """Nested 250 levels, a transaction used to be accepted and then made its block
    unwritable (every later submission: 503, again after a restart); nested 249 levels,
    `/events?full=true` answered 500 for good."""
    server = start(procs, tmp_path / "ledger.db")
    with LedgerClient(server.url) as c:
        ident = Identity.generate()
        twin = c.register_twin(ident)
        head = c.head()
        for body in (orjson.dumps(signed_raw(ident, "template.publish", twin, 1, template(249))),
                     orjson.dumps(signed_raw(ident, "template.publish", twin, 1, template(250))),
                     too_deep_to_sign(twin, 1, 300)):
            r = raw_post(server, "/tx", body)
            assert r.status_code == 422, r.text
            assert r.json()["code"] == "invalid"
            assert "nested deeper than 32 levels" in r.json()["error"]
        # in a batch: the deep transaction alone is refused, its neighbour is written
        good = signed_raw(ident, "name.register", twin, 1, {"name": "after-deep"})
        r = raw_post(server, "/txs", b"[%s,%s,%s]" % (
            orjson.dumps(signed_raw(ident, "template.publish", twin, 1, template(250))),
            too_deep_to_sign(twin, 1, 300), orjson.dumps(good)))
        assert r.status_code == 200, r.text
        first, second, third = r.json()["results"]
        assert first["code"] == "invalid" and "nested deeper" in first["error"]
        assert second["code"] == "invalid" and "nested too deep" in second["error"]
        assert "receipt" in third
        assert c.head()["height"] == head["height"] + 1
        assert c.templates() == []
        # the feed, with full transactions, still answers
        full = httpx.get(server.url + "/events", params={"since": 0, "timeout": 0,
                                                         "full": "true"})
        assert full.status_code == 200
        assert [e["type"] for e in full.json()["events"]] == ["twin.register",
                                                              "name.register"]
        c.register_name(ident, "still-writable")
    server.proc.terminate()
    server.proc.wait(10)
    again = start(procs, tmp_path / "ledger.db")
    with LedgerClient(again.url) as c:
        assert c.name("still-writable") is not None
        r = raw_post(again, "/tx", orjson.dumps(signed_raw(
            ident, "template.publish", twin, 3, template(250))))
        assert r.status_code == 422 and "nested deeper" in r.json()["error"]
        c.register_name(ident, "after-restart")


def test_a_transaction_that_cannot_be_encoded_is_refused_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: were parse_tx ever to let a too-deep transaction through, the
    service refuses it before it joins a block, and the ledger keeps writing."""

    def lenient(raw: dict[str, Any]) -> Tx:
        if raw["type"] != "template.publish":
            return parse_tx(raw)
        payload = raw["payload"]
        body = {k: raw[k] for k in ("type", "sender", "nonce", "payload")}
        return Tx(raw["type"], raw["sender"], raw["nonce"],
                  PAYLOADS["template.publish"].model_construct(**payload), payload,
                  bytes.fromhex(raw["signature"]),
                  hash_bytes(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)))

    monkeypatch.setattr(service_module, "parse_tx", lenient)
    ident = Identity.generate()

    async def main() -> None:
        service = LedgerService(SqliteLog(tmp_path / "ledger.db"), OPERATOR)
        await service.start()
        try:
            (reg,) = await service.submit([signed_raw(ident, "twin.register", ident.public_hex,
                                                      0, {})])
            twin = reg["receipt"]["twin"]
            # 250 levels: encodes on its own, but not inside a block
            (deep,) = await service.submit([signed_raw(ident, "template.publish", twin, 1,
                                                       template(250))])
            assert deep["code"] == "invalid" and "cannot be encoded" in deep["error"]
            (ok,) = await service.submit([signed_raw(ident, "name.register", twin, 1,
                                                     {"name": "fine"})])
            assert ok["height"] == 2
        finally:
            await service.stop()

    asyncio.run(main())


# ---- integers -----------------------------------------------------------------------------


def test_integers_past_2_53_are_refused_over_http(server: Server,
                                                  client: LedgerClient) -> None:
    g = grid(client)
    owner, ident = g["twins"]["owner"], g["ids"]["owner"]
    head = client.head()
    nonce = client.next_nonce(owner)
    for payload, words in [
        ({"name": "p", "pricing": {"cu": 2**62}}, "integers are limited"),
        ({"name": "p", "pricing": {"cu": -(2**53)}}, "integers are limited"),
    ]:
        r = raw_post(server, "/tx", orjson.dumps(signed_raw(ident, "farm.create", owner,
                                                            nonce, payload)))
        assert r.status_code == 422 and words in r.json()["error"], r.text
    r = raw_post(server, "/tx", orjson.dumps(signed_raw(ident, "name.register", owner,
                                                        2**53, {"name": "n"})))
    assert r.status_code == 422 and "nonce" in r.json()["error"]
    assert client.head() == head


# ---- capacity -----------------------------------------------------------------------------


def test_reservations_cannot_overflow_or_fill_a_node(server: Server,
                                                     client: LedgerClient) -> None:
    """Four contracts reserving 2^62 CPUs each pushed a node's sum past 64 bits and
    GET /nodes answered 500; a contract could also hold more than its node has."""
    owner_id, node_id = Identity.generate(), Identity.generate()
    owner = client.register_twin(owner_id)
    client.register_twin(node_id)
    farm = client.create_farm(owner_id, f"big-{owner}")
    node = client.register_node(node_id, farm, {"cru": MAX_INT, "mru": 8 * GiB}, "BE")

    def contract(n: int, capacity: dict[str, int]) -> dict[str, Any]:
        req = requirement({owner: owner_id.public_hex}, owner)
        ids = hashes(10_000 + n, req)
        h = ids["deployment_hash"]
        return contract_payload(node, h, sealed(), req, body_hash=ids["body_hash"],
                                capacity=capacity,
                                approval=sign_approval(owner_id, 0, 1, node, h))

    head = client.head()
    nonce = client.next_nonce(owner)
    # signed by hand: the client's own canonical checks refuse to sign such a payload
    r = raw_post(server, "/txs", orjson.dumps([
        signed_raw(owner_id, "contract.create", owner, nonce + n, contract(n, {"cru": 2**62}))
        for n in range(4)]))
    results = r.json()["results"]
    assert all(r["code"] == "invalid" and "cru" in r["error"] for r in results), results
    assert client.head() == head and client.contracts(owner=owner) == []
    with pytest.raises(LedgerRejected) as info:
        client.send(owner_id, "contract.create", contract(5, {"mru": 9 * GiB}))
    assert info.value.status == 422
    assert f"asks for {9 * GiB} mru but node {node} has {8 * GiB} in all" in str(info.value)
    client.send(owner_id, "contract.create", contract(6, {"cru": MAX_INT}))
    with pytest.raises(LedgerRejected) as info:
        client.send(owner_id, "contract.create", contract(7, {"cru": 1}))
    assert info.value.status == 409 and "would pass 2^53 - 1" in str(info.value)
    r = httpx.get(server.url + "/nodes", params={"farm": farm})
    assert r.status_code == 200 and r.json()[0]["reserved"]["cru"] == MAX_INT
    assert len(client.contracts(owner=owner)) == 1


def test_one_twin_cannot_keep_many_nodes_reserved(client: LedgerClient) -> None:
    g = grid(client)
    ids, twins, node = g["ids"], g["twins"], g["node"]
    keys = {twins[name]: ident.public_hex for name, ident in ids.items()}
    req = requirement(keys, twins["owner"], twins["s1"])
    payloads = [contract_payload(node, h["deployment_hash"], sealed(), req,
                                 body_hash=h["body_hash"], capacity={"cru": 4})
                for h in (hashes(20_000 + n, req) for n in range(MAX_PENDING_PER_TWIN + 1))]
    results = client.send_many(ids["owner"], "contract.create", payloads)
    assert all("receipt" in r for r in results[:-1])
    assert results[-1]["code"] == "state"
    assert f"already has {MAX_PENDING_PER_TWIN} contracts waiting" in results[-1]["error"]
    assert len(client.contracts(owner=twins["owner"])) == MAX_PENDING_PER_TWIN


# ---- event cursors ------------------------------------------------------------------------


def sse_events(lines: Iterator[str], count: int) -> list[tuple[str, dict[str, Any]]]:
    """The next `count` (id, event) pairs of a server-sent event stream's lines."""
    out: list[tuple[str, dict[str, Any]]] = []
    event_id = ""
    for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            out.append((event_id, orjson.loads(line[6:])))
            if len(out) == count:
                break
    return out


def test_event_cursors_resume_mid_block_without_loss_or_repeat(procs: ProcessGroup,
                                                               tmp_path: Path) -> None:
    """The stream's id used to be the block height and Last-Event-ID was ignored, so a
    reconnect after 100 of a block's 1,500 events skipped the other 1,400 (or, from the
    height before, repeated the first 100); a cursor past the head was moved back."""
    server = start(procs, tmp_path / "ledger.db")
    ident = Identity.generate()
    with LedgerClient(server.url) as c:
        twin = c.register_twin(ident)
        before = c.head()["height"]
        results = c.send_many(ident, "name.register", [{"name": f"e{n}"} for n in range(1500)])
        block = before + 1
        assert {r["height"] for r in results} == {block}  # one block of 1,500 events
    url = server.url + "/events/stream"
    with httpx.stream("GET", url, params={"since": before}, timeout=30) as r:
        first = sse_events(r.iter_lines(), 100)
    assert [i for i, _ in first] == [f"{block}.{n}" for n in range(100)]
    # reconnect the way an EventSource does: Last-Event-ID wins over the query
    with httpx.stream("GET", url, params={"since": 0}, timeout=30,
                      headers={"Last-Event-ID": first[-1][0]}) as r:
        lines = r.iter_lines()
        rest = sse_events(lines, 1400)
        with LedgerClient(server.url) as c:
            c.register_name(ident, "later")
        (after,) = sse_events(lines, 1)
    assert [e["index"] for _, e in rest] == list(range(100, 1500))
    assert {e["height"] for _, e in rest} == {block}
    assert [e["receipt"]["name"] for _, e in first + rest] == [f"e{n}" for n in range(1500)]
    assert after[0] == f"{block + 1}.0" and after[1]["receipt"]["name"] == "later"
    with LedgerClient(server.url) as c:
        # the long-poll takes the same cursors; a plain height still means "after block H"
        polled = c.events(f"{block}.99", timeout=0)
        assert [(e["height"], e["index"]) for e in polled["events"]] == [
            *((block, n) for n in range(100, 1500)), (block + 1, 0)]
        assert polled["next"] == str(block + 1)
        assert len(c.events(before, timeout=0)["events"]) == 1501
        assert c.events(f"{block}.1499", timeout=0)["next"] == str(block + 1)
        head = c.head()["height"]
        for cursor, words in [(head + 1, "beyond the head"), (f"{head + 5}.0", "beyond the head"),
                              (f"{block}.1500", "holds 1500 events"), ("0.0", "holds 0 events"),
                              ("7x", "not a block height"), ("-1", "not a block height")]:
            with pytest.raises(LedgerError) as info:
                c.events(cursor, timeout=0)
            assert info.value.status == 400 and words in str(info.value), cursor
            assert info.value.code == "bad_cursor"
    r = httpx.get(url, headers={"Last-Event-ID": f"{head + 1}.0"}, timeout=10)
    assert r.status_code == 400 and "beyond the head" in r.json()["error"]
    # after a restart the same cursors are served from the log
    server.proc.terminate()
    server.proc.wait(10)
    again = start(procs, tmp_path / "ledger.db")
    with LedgerClient(again.url) as c:
        polled = c.events(f"{block}.99", timeout=0, twin=twin, full=True)
        assert [(e["height"], e["index"]) for e in polled["events"]] == [
            *((block, n) for n in range(100, 1500)), (block + 1, 0)]
        assert polled["next"] == str(head) and polled["events"][-1]["tx"]["nonce"] == 1501


def test_a_long_poll_answer_ends_mid_block_and_the_next_one_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer holds at most MAX_EVENTS events; its `next` then points inside a block,
    from memory (recent blocks) and from the log (after a restart) alike."""
    monkeypatch.setattr(service_module, "MAX_EVENTS", 40)
    ident = Identity.generate()

    async def drain(service: LedgerService, since: str) -> tuple[list[tuple[int, int]],
                                                                 list[str]]:
        seen, cursors = [], []
        while True:
            batch = await service.events(since, 0, {}, False)
            seen += [(e["height"], e["index"]) for e in batch["events"]]
            cursors.append(batch["next"])
            if batch["next"] == since:
                return seen, cursors
            since = batch["next"]

    async def main() -> None:
        service = LedgerService(SqliteLog(tmp_path / "ledger.db"), OPERATOR)
        await service.start()
        try:
            (reg,) = await service.submit([signed_raw(ident, "twin.register", ident.public_hex,
                                                      0, {})])
            twin = reg["receipt"]["twin"]
            results = await service.submit([
                signed_raw(ident, "name.register", twin, 1 + n, {"name": f"m{n}"})
                for n in range(100)])
            assert {r["height"] for r in results} == {2}
            seen, cursors = await drain(service, "1")
            assert seen == [(2, n) for n in range(100)]
            assert cursors == ["2.39", "2.79", "2", "2"]
        finally:
            await service.stop()
        again = LedgerService(SqliteLog(tmp_path / "ledger.db"), OPERATOR)
        await again.start()
        try:
            seen, cursors = await drain(again, "1.0")
            assert seen == [(2, n) for n in range(100)]
            assert cursors == ["2.39", "2.79", "2", "2"]
        finally:
            await again.stop()

    asyncio.run(main())


def test_node_query_numbers_are_bounded(server: Server) -> None:
    # a 5,000-digit number made int() raise inside the fast path: 500
    for value in ("9" * 5000, "\u0661", "12" * 9):
        r = httpx.get(server.url + "/nodes", params={"farm": value})
        assert r.status_code in (200, 422), (value[:10], r.status_code, r.text[:200])
        if r.status_code == 200:
            assert r.json() == []
        else:
            assert r.json()["code"] == "invalid" and "farm" in r.json()["error"]
