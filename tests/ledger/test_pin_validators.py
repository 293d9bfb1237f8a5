"""HeaderPin against a ledger cluster: the head must be final (signed by more than two
thirds of the validator set the consumer knows), extend what it saw, and the set changes
only through changes the known set approved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zerostack.crypto import Identity
from zerostack.ledger import LedgerError
from zerostack.ledger.block import GENESIS_HASH, Block
from zerostack.ledger.pin import HeaderPin
from zerostack.ledger.validators import approve_set

VALS = [Identity.from_seed(bytes([i + 7]) * 32) for i in range(5)]
KEYS = sorted(v.public_hex for v in VALS[:4])


def chain(length: int, signers: list[Identity], start: int = 1000) -> list[Block]:
    out: list[Block] = []
    prev = GENESIS_HASH
    for h in range(1, length + 1):
        block = Block.build(h, prev, start + h, [])
        for s in signers:
            block = block.signed(s)
        out.append(block)
        prev = block.hash
    return out


class Cluster:
    def __init__(self, blocks: list[Block], changes: list[dict[str, Any]] | None = None,
                 validators: list[str] = KEYS) -> None:
        self.blocks, self.changes, self.vals = blocks, changes or [], validators

    def head(self) -> dict[str, Any]:
        return self.blocks[-1].signed_header()

    def header(self, height: int) -> dict[str, Any] | None:
        return self.blocks[height - 1].signed_header() if height <= len(self.blocks) else None

    def validators(self) -> dict[str, Any]:
        return {"epoch": len(self.changes), "validators": self.vals, "changes": self.changes}


def refused(pin: HeaderPin, ledger: Cluster, words: str) -> None:
    with pytest.raises(LedgerError) as info:
        pin.check(ledger)  # type: ignore[arg-type]
    assert info.value.code == "untrusted"
    assert words in str(info.value), str(info.value)


def test_first_contact_learns_the_set_and_needs_final_heads(tmp_path: Path) -> None:
    path = tmp_path / "pin.json"
    blocks = chain(6, VALS[:3])  # 3 of 4: final
    HeaderPin(path).check(Cluster(blocks[:4]))  # type: ignore[arg-type]
    saved = json.loads(path.read_text())
    assert saved["validators"] == KEYS and saved["height"] == 4
    HeaderPin(path).check(Cluster(blocks))  # type: ignore[arg-type]
    # two of four signatures: not final, refused
    thin = chain(7, VALS[:2])
    thin[:6] = blocks
    refused(HeaderPin(path), Cluster([*blocks, thin[6]]), "not final: signed by 2 of the 4")


def test_a_rewritten_history_signed_by_one_replica_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pin.json"
    honest = chain(6, VALS[:4])
    HeaderPin(path).check(Cluster(honest))  # type: ignore[arg-type]
    # one replica re-hashes every block (other times) and signs them alone
    rewritten = chain(8, [VALS[0]], start=2000)
    refused(HeaderPin(path), Cluster(rewritten), "not final: signed by 1 of the 4")
    # even with forged copies of others' signatures the hashes do not match
    forged = [Block(b.height, b.prev_hash, b.time, b.tx_root, b.txs, b.hash,
                    signatures=(*b.signatures, *honest[0].signatures[1:]))
              for b in rewritten]
    refused(HeaderPin(path), Cluster(forged), "not final: signed by 1 of the 4")


def test_a_fork_signed_by_a_quorum_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "pin.json"
    a = chain(6, VALS[:3])
    HeaderPin(path).check(Cluster(a))  # type: ignore[arg-type]
    b = chain(9, VALS[1:4], start=3000)
    refused(HeaderPin(path), Cluster(b), "forked")


def test_the_set_moves_only_by_approved_changes(tmp_path: Path) -> None:
    path = tmp_path / "pin.json"
    first = chain(3, VALS[:3])
    HeaderPin(path).check(Cluster(first))  # type: ignore[arg-type]
    new = sorted(v.public_hex for v in VALS[1:5])
    # blocks 4.. are signed by the new set only (VALS[4] is new, VALS[0] left)
    prev = first[-1].hash
    tail = []
    for h in range(4, 7):
        block = Block.build(h, prev, 1000 + h, [])
        for s in VALS[2:5]:
            block = block.signed(s)
        tail.append(block)
        prev = block.hash
    blocks = first + tail
    unapproved = [{"epoch": 1, "validators": new, "height": 3, "tx": "0" * 64,
                   "approvals": [approve_set(v, 1, new) for v in (VALS[0], VALS[4])]}]
    refused(HeaderPin(path), Cluster(blocks, unapproved, new), "approved by 1 of the 4")
    # the approved set served with a key twice: it would need more signers than exist
    doubled = [{"epoch": 1, "validators": [*new, new[0]], "height": 3, "tx": "0" * 64,
                "approvals": [approve_set(v, 1, new) for v in VALS[:3]]}]
    refused(HeaderPin(path), Cluster(blocks, doubled, new), "malformed validator change")
    approved = [{"epoch": 1, "validators": new, "height": 3, "tx": "0" * 64,
                 "approvals": [approve_set(v, 1, new) for v in VALS[:3]]}]
    pin = HeaderPin(path)
    pin.check(Cluster(blocks, approved, new))  # type: ignore[arg-type]
    assert pin.validators == new and pin.epoch == 1 and pin.height == 6
