"""HeaderPin: the last signed header seen is kept on disk, and a ledger whose chain does
not extend it (rollback, fork, another operator key, a forged header) is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zerostack.crypto import Identity
from zerostack.ledger import LedgerError
from zerostack.ledger.block import GENESIS_HASH, Block
from zerostack.ledger.pin import HeaderPin, pin_path

OPERATOR = Identity.generate()


def chain(length: int, operator: Identity = OPERATOR, start: int = 1000) -> list[Block]:
    """Signed empty blocks 1..length; `start` sets their times, so two starts fork."""
    out: list[Block] = []
    prev = GENESIS_HASH
    for h in range(1, length + 1):
        block = Block.build(h, prev, start + h, []).signed(operator)
        out.append(block)
        prev = block.hash
    return out


class Ledger:
    """What a client reads from a ledger: its head and the header at a height."""

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks

    def head(self) -> dict[str, Any]:
        return self.blocks[-1].signed_header()

    def header(self, height: int) -> dict[str, Any] | None:
        return self.blocks[height - 1].signed_header() if height <= len(self.blocks) else None


def check(pin: HeaderPin, ledger: Ledger) -> None:
    pin.check(ledger)  # type: ignore[arg-type]


def refused(pin: HeaderPin, ledger: Ledger, words: str) -> None:
    before = pin.path.read_bytes() if pin.path.exists() else None
    with pytest.raises(LedgerError) as info:
        check(pin, ledger)
    assert info.value.code == "untrusted"
    assert words in str(info.value), str(info.value)
    assert (pin.path.read_bytes() if pin.path.exists() else None) == before  # unchanged


def test_first_contact_pins_the_key_and_head_then_follows(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "pin.json"
    blocks = chain(8)
    check(HeaderPin(path), Ledger(blocks[:5]))
    saved = json.loads(path.read_text())
    assert saved == {"operator_key": OPERATOR.public_hex, "height": 5, "hash": blocks[4].hash}
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    check(HeaderPin(path), Ledger(blocks))  # a later start: the chain grew
    assert json.loads(path.read_text())["height"] == 8


def test_rollback_is_refused(tmp_path: Path) -> None:
    blocks = chain(8)
    pin = HeaderPin(tmp_path / "pin.json")
    check(pin, Ledger(blocks))
    refused(HeaderPin(pin.path), Ledger(blocks[:6]), "rolled back: its head is block 6")


def test_fork_at_the_same_height_and_beyond_is_refused(tmp_path: Path) -> None:
    blocks = chain(5)
    pin = HeaderPin(tmp_path / "pin.json")
    check(pin, Ledger(blocks))
    # the same first blocks, then another block 5 (and more): the same operator's key
    other = blocks[:4] + chain(9, start=5000)[4:]
    assert other[4].prev_hash != blocks[3].hash  # (a different chain after block 4)
    refused(HeaderPin(pin.path), Ledger(other[:5]), "forked: its block 5")
    refused(HeaderPin(pin.path), Ledger(other), "forked: its block 5")


def test_another_operator_key_is_refused(tmp_path: Path) -> None:
    pin = HeaderPin(tmp_path / "pin.json")
    check(pin, Ledger(chain(3)))
    refused(HeaderPin(pin.path), Ledger(chain(9, Identity.generate())),
            "not signed by the operator key " + OPERATOR.public_hex)
    with pytest.raises(LedgerError, match="change of operator key is refused"):
        HeaderPin(pin.path, Identity.generate().public_hex)


def test_a_given_key_is_required_from_the_first_contact(tmp_path: Path) -> None:
    stranger = chain(3, Identity.generate())
    refused(HeaderPin(tmp_path / "pin.json", OPERATOR.public_hex), Ledger(stranger),
            "not signed by the operator key")
    check(HeaderPin(tmp_path / "pin.json", OPERATOR.public_hex), Ledger(chain(3)))


def test_forged_or_missing_headers_are_refused(tmp_path: Path) -> None:
    blocks = chain(6)
    pin = HeaderPin(tmp_path / "pin.json")
    check(pin, Ledger(blocks[:3]))

    class Lying(Ledger):
        def head(self) -> dict[str, Any]:
            return {**super().head(), "time": 1}  # the hash served no longer matches

    refused(HeaderPin(pin.path), Lying(blocks), "does not hash to the hash served")

    class Hiding(Ledger):
        def header(self, height: int) -> dict[str, Any] | None:
            return None

    refused(HeaderPin(pin.path), Hiding(blocks), "does not show its block 3")

    class Unsigned(Ledger):
        def head(self) -> dict[str, Any]:
            return {**super().head(), "signatures": []}

    refused(HeaderPin(pin.path), Unsigned(blocks), "malformed header")


def test_an_empty_ledger_pins_nothing(tmp_path: Path) -> None:
    class Empty(Ledger):
        def head(self) -> dict[str, Any]:
            return {"height": 0, "hash": GENESIS_HASH, "time": 0, "signatures": []}

    pin = HeaderPin(tmp_path / "pin.json")
    check(pin, Empty([]))
    assert not pin.path.exists()


def test_pin_files_per_ledger_stay_in_the_config_dir(tmp_path: Path) -> None:
    path = pin_path(tmp_path, "http://127.0.0.1:7700/../../x")
    assert path.parent == tmp_path / "ledgers" and "/" not in path.name
    with pytest.raises(LedgerError, match="64 lowercase hex"):
        HeaderPin(path, "not-a-key")
