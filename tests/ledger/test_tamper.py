"""An edited ledger file fails closed: `verify` reports it and `serve` refuses to start.

Each edit is what someone with write access to the file but without the operator's key
can do: drop the last blocks, remove, reorder or forge a transaction, or move a block's
time, then recompute every hash after it (and fix the transaction index) so that the
chain of hashes holds again. Only the header signatures, which need the operator's key,
give the edit away.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import free_port, zerostack_cmd
from tests.ledger.world import World
from zerostack.crypto import Domain, Identity, canonical_json, hash_hex, save_identity
from zerostack.ledger import BadBlock, Chain, SqliteLog, verify_log
from zerostack.ledger.block import Block, BlockSignature, Checkpoint
from zerostack.ledger.errors import Rejected
from zerostack.ledger.tx import parse_tx, sign_tx

OPERATOR = Identity.generate()
ATTACKER = Identity.generate()
LAST = 3  # the height of the last block


def build(path: Path) -> None:
    """Three blocks; the last holds independent transactions of two twins:
    a.name.register(x), b.name.register(y), a.name.release(x)."""
    clock = [2_000_000.0]
    chain = Chain(SqliteLog(path), OPERATOR, clock=lambda: clock[0])
    w = World(time=int(clock[0]))

    def add(result: Any) -> None:
        assert not isinstance(result, Rejected), result

    def send(twin: int, ttype: str, payload: dict[str, Any]) -> None:
        tx = w.tx(twin, ttype, payload)
        add(w.apply_tx(tx))
        add(chain.add(tx))

    a_ident, b_ident = Identity.generate(), Identity.generate()
    for ident in (a_ident, b_ident):
        tx = parse_tx(sign_tx(ident, "twin.register", ident.public_hex, 0, {}))
        add(w.apply_tx(tx))
        add(chain.add(tx))
    a, b = 1, 2
    w.keys.update({a: a_ident, b: b_ident})
    w.nonces.update({a: 1, b: 1})
    chain.seal()
    clock[0] += 10
    w.time = int(clock[0])
    send(a, "name.register", {"name": "early"})
    chain.seal()
    clock[0] += 10
    w.time = int(clock[0])
    send(a, "name.register", {"name": "x"})
    send(b, "name.register", {"name": "y"})
    send(a, "name.release", {"name": "x"})
    chain.seal()
    assert chain.height == LAST
    chain.log.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ledger") / "ledger.db"
    build(path)
    return path


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine ledger with its operator key file beside it."""
    path = tmp_path / "ledger.db"
    shutil.copy(pristine, path)
    save_identity(OPERATOR, tmp_path / "ledger.key", "operator")
    return path


def blocks(db: sqlite3.Connection) -> list[dict[str, Any]]:
    return [orjson.loads(data) for (data,) in
            db.execute("SELECT data FROM blocks ORDER BY height")]


def rewrite(path: Path, height: int, edit: Callable[[dict[str, Any]], None],
            signer: Identity | None = None) -> None:
    """Edit block `height`'s wire form, then recompute tx_root, tx_count and the hashes of
    it and every later block, as an editor without the key would; `signer` re-signs the
    rewritten headers (else they keep their old, now wrong, signatures). The tx index is
    fixed to match and the operator's checkpoint, which cannot be redone, removed."""
    with sqlite3.connect(path) as db:
        wires = blocks(db)
        edit(wires[height - 1])
        prev = wires[height - 2]["header"] if height > 1 else None
        prev_hash = hash_hex(prev) if prev else "0" * 64
        for wire in wires[height - 1:]:
            txs = [parse_tx(t) for t in wire["txs"]]
            rebuilt = Block.build(wire["header"]["height"], prev_hash, wire["header"]["time"], txs)
            wire["header"] = rebuilt.header()
            if signer is not None:
                wire["signatures"] = [
                    s.to_wire() for s in rebuilt.signed(signer).signatures]
            db.execute("UPDATE blocks SET hash = ?, data = ? WHERE height = ?",
                       (rebuilt.hash, canonical_json(wire), rebuilt.height))
            prev_hash = rebuilt.hash
            kept = [t.hash_hex for t in txs]
            db.execute(f"DELETE FROM txs WHERE height = ? AND hash NOT IN "
                       f"({','.join('?' * len(kept))})", (rebuilt.height, *kept))
            for i, h in enumerate(kept):
                db.execute("UPDATE txs SET idx = ? WHERE hash = ?", (i, h))
        db.execute("DELETE FROM checkpoint")


def truncate(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM blocks WHERE height = ?", (LAST,))


def truncate_with_index(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM blocks WHERE height = ?", (LAST,))
        db.execute("DELETE FROM txs WHERE height = ?", (LAST,))


def remove_tx(path: Path) -> None:
    # hide a.name.release(x): the name would stay a's
    rewrite(path, LAST, lambda w: w["txs"].pop())


def reorder_txs(path: Path) -> None:
    rewrite(path, LAST, lambda w: w["txs"].insert(0, w["txs"].pop(1)))


def move_time(path: Path) -> None:
    rewrite(path, LAST, lambda w: w["header"].update(time=w["header"]["time"] + 3600))


def forge_signature(path: Path) -> None:
    def edit(w: dict[str, Any]) -> None:
        w["txs"][1]["signature"] = ATTACKER.sign(Domain.TRANSACTION, bytes(32)).hex()
    rewrite(path, LAST, edit)


def resign_remove_tx(path: Path) -> None:
    rewrite(path, LAST, lambda w: w["txs"].pop(), signer=ATTACKER)


EDITS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncate": (truncate, "blocks were removed"),
    "truncate_with_index": (truncate_with_index, "blocks were removed"),
    "remove_tx": (remove_tx, "header signature"),
    "reorder_txs": (reorder_txs, "header signature"),
    "move_time": (move_time, "header signature"),
    "forge_signature": (forge_signature, "transaction 1"),
    "resign_remove_tx": (resign_remove_tx, "not signed by the operator key"),
}


def serve_refuses(path: Path) -> str:
    """Start `zerostack ledger serve` on `path`: it must exit non-zero with one line."""
    env = {**os.environ, "COLUMNS": "1000"}
    proc = subprocess.run([*zerostack_cmd(), "ledger", "serve", "--db", str(path),
                           "--listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "refusing to serve" in lines[0]
    return lines[0]


def test_the_pristine_file_passes_and_serves(copy: Path) -> None:
    log = SqliteLog(copy)
    try:
        result = verify_log(log, OPERATOR.public_hex)
    finally:
        log.close()
    assert result.height == LAST and result.operator_key == OPERATOR.public_hex
    assert result.checkpoint is not None and result.checkpoint.height == LAST


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edited_file_fails_verify_and_serve(copy: Path, name: str) -> None:
    edit, why = EDITS[name]
    edit(copy)
    log = SqliteLog(copy)
    try:
        with pytest.raises(BadBlock) as info:
            verify_log(log)
    finally:
        log.close()
    assert why in info.value.reason
    assert info.value.height == LAST
    env = {**os.environ, "COLUMNS": "1000"}
    cli = subprocess.run([*zerostack_cmd(), "ledger", "verify", "--db", str(copy), "--json"],
                         capture_output=True, timeout=60, env=env)
    assert cli.returncode == 1
    assert orjson.loads(cli.stdout)["bad_block"] == LAST
    line = serve_refuses(copy)
    assert f"block {LAST}" in line and why in line


def test_a_file_resigned_whole_by_another_key_fails_against_the_operator_key(
        copy: Path) -> None:
    """Re-signing every block with another key makes a consistent file, but not the
    operator's: `verify --operator-key` and the operator's own server refuse it."""
    rewrite(copy, 1, lambda w: None, signer=ATTACKER)
    log = SqliteLog(copy)
    try:
        assert verify_log(log).operator_key == ATTACKER.public_hex  # says whose it is
        with pytest.raises(BadBlock) as info:
            verify_log(log, OPERATOR.public_hex)
    finally:
        log.close()
    assert info.value.height == 1 and "not signed by the operator key" in info.value.reason
    env = {**os.environ, "COLUMNS": "1000"}
    cli = subprocess.run([*zerostack_cmd(), "ledger", "verify", "--db", str(copy),
                          "--operator-key", OPERATOR.public_hex],
                         capture_output=True, text=True, timeout=60, env=env)
    assert cli.returncode == 1 and "first bad block is 1" in cli.stderr
    assert "block 1" in serve_refuses(copy)


def test_a_forged_transaction_signed_by_the_operator_is_checked_at_start(copy: Path) -> None:
    """Transactions after the checkpoint are checked again at start, even in blocks the
    operator's key signed: the checkpoint, not the header signature, says what was
    checked."""
    def edit(w: dict[str, Any]) -> None:
        w["txs"][1]["signature"] = "00" * 64
    rewrite(copy, LAST, edit, signer=OPERATOR)
    line = serve_refuses(copy)
    assert f"block {LAST}: transaction 1" in line and "signature" in line


def test_a_fresh_key_is_not_made_for_a_file_with_blocks(copy: Path) -> None:
    (copy.parent / "ledger.key").unlink()
    proc = subprocess.run([*zerostack_cmd(), "ledger", "serve", "--db", str(copy),
                           "--listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "1000"})
    assert proc.returncode != 0 and "operator key" in proc.stderr and "missing" in proc.stderr
    assert not (copy.parent / "ledger.key").exists()


def test_an_unsigned_block_is_refused(copy: Path) -> None:
    with sqlite3.connect(copy) as db:
        wire = blocks(db)[LAST - 1]
        del wire["signatures"]
        db.execute("UPDATE blocks SET data = ? WHERE height = ?", (canonical_json(wire), LAST))
    line = serve_refuses(copy)
    assert "no operator signature" in line


def test_an_invalid_extra_signature_is_refused(copy: Path) -> None:
    with sqlite3.connect(copy) as db:
        wire = blocks(db)[1]
        wire["signatures"].append(BlockSignature(ATTACKER.public_hex, "11" * 64).to_wire())
        db.execute("UPDATE blocks SET data = ? WHERE height = 2", (canonical_json(wire),))
    assert "block 2: header signature" in serve_refuses(copy)


def test_the_checkpoint_spares_the_checked_signatures_and_must_match(
        copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zerostack.ledger.chain as chain_module

    checked: list[bytes] = []
    real = chain_module.verify

    def counting(domain: Domain, key: str, data: bytes, sig: bytes) -> bool:
        checked.append(data)
        return real(domain, key, data, sig)

    monkeypatch.setattr(chain_module, "verify", counting)
    log = SqliteLog(copy)
    try:
        Chain(log, OPERATOR)  # a server's start: the checkpoint is at the head
        assert checked == []
        verify_log(log)  # verify checks every transaction signature
        assert len(checked) == 6
    finally:
        log.close()
    monkeypatch.undo()

    with sqlite3.connect(copy) as db:
        (block2,) = db.execute("SELECT hash FROM blocks WHERE height = 2").fetchone()
    # the operator's checkpoint for another chain (another hash at height 3)
    forged = Checkpoint.make(OPERATOR, LAST, block2)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE checkpoint SET hash = ?, signature = ?",
                   (forged.hash, forged.signature))
    assert "differs from the operator's checkpoint" in serve_refuses(copy)
    # a checkpoint of the right block, signed by another key
    with sqlite3.connect(copy) as db:
        (block3,) = db.execute("SELECT hash FROM blocks WHERE height = 3").fetchone()
    other = Checkpoint.make(ATTACKER, LAST, block3)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE checkpoint SET hash = ?, key = ?, signature = ?",
                   (other.hash, other.key, other.signature))
    assert "checkpoint at height 3 is not signed by the operator key" in serve_refuses(copy)
