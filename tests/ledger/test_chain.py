"""Blocks over the SQLite log: replay rebuilds the state; verify finds any edited byte."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ledger.world import World, hashes, requirement, sealed
from zerostack.crypto import Identity
from zerostack.ledger.chain import BadBlock, Chain, replay, verify_log
from zerostack.ledger.errors import Rejected
from zerostack.ledger.store import SqliteLog

BLOCKS = 6
OPERATOR = Identity.generate()


def build_log(path: Path) -> Chain:
    """A few blocks of realistic traffic written through Chain (the server's path)."""
    clock = [1_000_000.0]
    chain = Chain(SqliteLog(path), OPERATOR, clock=lambda: clock[0])
    w = World(time=int(clock[0]))
    # World applies to its own state; mirror every accepted tx into the chain
    original = w.apply_tx

    def mirrored(tx):  # type: ignore[no-untyped-def]
        result = original(tx)
        if not isinstance(result, Rejected):
            assert not isinstance(chain.add(tx), Rejected)
        return result

    w.apply_tx = mirrored  # type: ignore[method-assign]
    owner, s1 = w.twin(), w.twin()
    farm = w.farm(owner)
    node, node_twin = w.node(farm)
    chain.seal()
    for i in range(BLOCKS - 1):
        clock[0] += 1
        w.time = int(clock[0])
        req = requirement(w, owner, s1)
        ids = hashes(i, req)
        h = ids["deployment_hash"]
        cid = int(w.ok(owner, "contract.create", {
            "node": node, **ids, "instructions": sealed(), "signature_requirement": req,
            "approval": w.approval(owner, h, node=node)})["contract"])
        w.ok(s1, "contract.approve", {"contract": cid, "deployment_hash": h,
                                      "signature": w.approves(s1, cid, h)})
        w.ok(node_twin, "contract.report", {"contract": cid, "version": 1,
                                            "workloads": [{"name": "z", "state": "ok"}]})
        chain.seal()
    return chain


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ledger") / "ledger.db"
    chain = build_log(path)
    assert chain.height == BLOCKS
    chain.log.close()
    return path


def test_replay_and_verify(pristine: Path, tmp_path: Path) -> None:
    log = SqliteLog(pristine)
    try:
        result = verify_log(log)
        assert result.height == BLOCKS and result.txs == 5 + 3 * (BLOCKS - 1)
        assert len(result.state.contracts) == BLOCKS - 1
        assert all(c.state == "deployed" for c in result.state.contracts.values())
        # a server reopening the file gets the same state
        chain = Chain(log, OPERATOR)
        assert chain.height == BLOCKS and chain.hash == result.hash
        assert chain.state.contracts[1].to_dict() == result.state.contracts[1].to_dict()
    finally:
        log.close()


def tampered(pristine: Path, sql: str, args: tuple[object, ...]) -> Path:
    path = Path(tempfile.mkdtemp(prefix="ledger-tamper-")) / "ledger.db"
    shutil.copy(pristine, path)
    with sqlite3.connect(path) as db:
        db.execute(sql, args)
    return path


def first_bad(path: Path) -> int | None:
    log = SqliteLog(path)
    try:
        verify_log(log)
    except BadBlock as exc:
        return exc.height
    finally:
        log.close()
        shutil.rmtree(path.parent, ignore_errors=True)
    return None


def flip(data: bytes, offset: int, value: int) -> bytes:
    offset %= len(data)
    new = value if value != data[offset] else (value + 1) % 256
    return data[:offset] + bytes([new]) + data[offset + 1:]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, BLOCKS), st.integers(0, 10**6), st.integers(0, 255))
def test_verify_detects_any_byte_change_in_a_block(pristine: Path, height: int, offset: int,
                                                   value: int) -> None:
    with sqlite3.connect(pristine) as db:
        (data,) = db.execute("SELECT data FROM blocks WHERE height = ?", (height,)).fetchone()
    path = tampered(pristine, "UPDATE blocks SET data = ? WHERE height = ?",
                    (flip(bytes(data), offset, value), height))
    assert first_bad(path) == height


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 100), st.sampled_from(["data", "receipt", "hash"]), st.integers(0, 10**6),
       st.integers(0, 255))
def test_verify_detects_any_byte_change_in_the_tx_index(pristine: Path, row: int, column: str,
                                                        offset: int, value: int) -> None:
    with sqlite3.connect(pristine) as db:
        rows = db.execute(f"SELECT rowid, height, {column} FROM txs ORDER BY rowid").fetchall()
    rowid, height, data = rows[row % len(rows)]
    raw = data.encode() if isinstance(data, str) else bytes(data)
    changed = flip(raw, offset, value)
    new: object = changed.decode("latin-1") if column == "hash" else changed
    path = tampered(pristine, f"UPDATE txs SET {column} = ? WHERE rowid = ?", (new, rowid))
    assert first_bad(path) == height


def test_verify_detects_removed_and_reordered_blocks(pristine: Path) -> None:
    path = tampered(pristine, "DELETE FROM blocks WHERE height = ?", (3,))
    assert first_bad(path) == 3
    with sqlite3.connect(pristine) as db:
        (h2,) = db.execute("SELECT hash FROM blocks WHERE height = 2").fetchone()
    path = tampered(pristine, "UPDATE blocks SET hash = ? WHERE height = 2", (h2[::-1],))
    assert first_bad(path) == 2


def test_replay_without_signature_checks_still_checks_hashes(pristine: Path) -> None:
    with sqlite3.connect(pristine) as db:
        (data,) = db.execute("SELECT data FROM blocks WHERE height = 4").fetchone()
    path = tampered(pristine, "UPDATE blocks SET data = ? WHERE height = 4",
                    (bytes(data).replace(b'"state":"ok"', b'"state":"no"', 1),))
    log = SqliteLog(path)
    try:
        with pytest.raises(BadBlock) as info:
            replay(log, operator_key=OPERATOR.public_hex, trust_checkpoint=True)
        assert info.value.height == 4
    finally:
        log.close()
        shutil.rmtree(path.parent, ignore_errors=True)
