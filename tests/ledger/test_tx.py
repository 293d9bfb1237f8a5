"""Wire format: parsing refuses anything malformed with a precise reason; signing round-trips."""

from __future__ import annotations

from typing import Any

import pytest

from zerostack.crypto import Domain, Identity, hash_obj, verify
from zerostack.ledger.errors import LedgerRejected
from zerostack.ledger.tx import MAX_INSTRUCTIONS, parse_tx, sign_tx, tx_hash

KEY = Identity.from_seed(bytes(range(32)))


def good(**changes: Any) -> dict[str, Any]:
    tx = sign_tx(KEY, "name.register", 3, 5, {"name": "web"})
    tx.update(changes)
    return tx


def rejected(data: Any) -> LedgerRejected:
    with pytest.raises(LedgerRejected) as info:
        parse_tx(data)
    return info.value


def test_sign_and_parse_round_trip() -> None:
    wire = good()
    tx = parse_tx(wire)
    assert tx.hash == hash_obj({"type": "name.register", "sender": 3, "nonce": 5,
                                "payload": {"name": "web"}})
    assert tx.hash_hex == tx_hash(wire)
    assert verify(Domain.TRANSACTION, KEY.public_hex, tx.hash, tx.signature)
    assert not verify(Domain.APPROVAL, KEY.public_hex, tx.hash, tx.signature)
    assert tx.to_wire() == wire
    assert tx.payload.name == "web"


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        ([1, 2], "malformed", "JSON object"),
        ({"type": "name.register"}, "malformed", "missing"),
        (good(extra=1), "invalid", "unknown field 'extra'"),
        (good(type="contract.destroy"), "invalid", "unknown transaction type"),
        (good(sender="3"), "invalid", "sender"),
        (good(sender=0), "invalid", "sender"),
        (good(sender=True), "invalid", "sender"),
        (good(nonce=-1), "invalid", "nonce"),
        (good(nonce="1"), "invalid", "nonce"),
        (good(payload=[]), "invalid", "payload must be an object"),
        (good(signature="ab"), "invalid", "signature"),
        (good(signature="A" * 128), "invalid", "lowercase hex"),
        (good(payload={"name": "web", "owner": 1}), "invalid", "unknown field 'owner'"),
        (good(payload={"name": "Web!"}), "invalid", "name"),
        (good(payload={}), "invalid", "name"),
    ],
)
def test_malformed_transactions_are_refused(data: Any, code: str, words: str) -> None:
    exc = rejected(data)
    assert exc.code == code
    assert words in str(exc)


def test_payload_types_are_strict() -> None:
    tx = sign_tx(KEY, "contract.cancel", 3, 1, {"contract": "7"})
    assert "contract" in str(rejected(tx))
    tx = sign_tx(KEY, "node.heartbeat", 3, 1, {"uptime": 1})
    tx["payload"]["uptime"] = 1.5
    assert rejected(tx).code == "invalid"


def test_oversize_instructions_are_refused() -> None:
    payload = {
        "node": 1,
        "deployment_hash": "0" * 64,
        "body_hash": "0" * 64,
        "instructions": "A" * (MAX_INSTRUCTIONS + 4),
        "signature_requirement": {"requests": [{"twin": 1, "key": KEY.public_hex}],
                                  "weight_required": 1},
    }
    exc = rejected(sign_tx(KEY, "contract.create", 3, 1, payload))
    assert exc.code == "invalid" and "instructions" in str(exc)


def test_floats_have_no_canonical_form() -> None:
    tx = sign_tx(KEY, "template.publish", 3, 1, {"name": "t", "body": {"a": "b"}})
    tx["payload"]["body"] = {"a": 1.5}
    exc = rejected(tx)
    assert exc.code == "invalid" and "float" in str(exc)
