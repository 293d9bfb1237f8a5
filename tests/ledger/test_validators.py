"""The validator set on the ledger: genesis, changes by a quorum of the current set,
finality of blocks by more than two thirds of the validators."""

from __future__ import annotations

from zerostack.crypto import Identity
from zerostack.ledger.block import Block
from zerostack.ledger.errors import Rejected
from zerostack.ledger.state import apply_with_receipt, genesis
from zerostack.ledger.tx import parse_tx, sign_tx
from zerostack.ledger.validators import approve_set, is_final, quorum, validators_view

KEYS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(5)]


def _state_with_twin(validators: tuple[str, ...]):  # type: ignore[no-untyped-def]
    state = genesis(KEYS[0].public_hex, validators)
    carrier = Identity.from_seed(b"\x42" * 32)
    reg = parse_tx(sign_tx(carrier, "twin.register", carrier.public_hex, 0, {}))
    result = apply_with_receipt(state, reg, time=10)
    assert not isinstance(result, Rejected)
    return result[0], carrier


def _change(state, carrier, epoch, new, signers):  # type: ignore[no-untyped-def]
    payload = {"validators": new, "epoch": epoch,
               "approvals": [approve_set(k, epoch, new) for k in signers]}
    tx = parse_tx(sign_tx(carrier, "validator.set", 1, state.twins[1].nonce, payload))
    return apply_with_receipt(state, tx, time=20)


def test_quorum_is_more_than_two_thirds() -> None:
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 3, 3, 4, 5, 5]


def test_single_process_ledger_is_a_one_validator_grid() -> None:
    state = genesis(KEYS[0].public_hex)
    assert state.validators == (KEYS[0].public_hex,)
    block = Block.build(1, "0" * 64, 5, []).signed(KEYS[0])
    assert is_final(block.hash, block.signatures, state.validators)


def test_finality_needs_more_than_two_thirds_of_distinct_valid_signers() -> None:
    vals = tuple(k.public_hex for k in KEYS[:4])
    block = Block.build(3, "1" * 64, 5, [])
    two = block.signed(KEYS[0]).signed(KEYS[1])
    assert not is_final(two.hash, two.signatures, vals)
    three = two.signed(KEYS[2])
    assert is_final(three.hash, three.signatures, vals)
    # a non-validator's signature does not count
    outsider = two.signed(KEYS[4])
    assert not is_final(outsider.hash, outsider.signatures, vals)
    # a signature over another block does not count
    other = Block.build(3, "2" * 64, 5, []).signed(KEYS[2])
    mixed = [*two.signatures, *other.signatures]
    assert not is_final(two.hash, mixed, vals)


def test_set_changes_only_with_a_quorum_of_the_current_set() -> None:
    vals = tuple(sorted(k.public_hex for k in KEYS[:4]))
    state, carrier = _state_with_twin(vals)
    new = sorted(k.public_hex for k in KEYS[1:5])
    refused = _change(state, carrier, 1, new, KEYS[:2])  # 2 of 4: not enough
    assert isinstance(refused, Rejected) and refused.code == "unauthorized"
    outsiders = _change(state, carrier, 1, new, [KEYS[0], KEYS[1], KEYS[4]])
    assert isinstance(outsiders, Rejected) and outsiders.code == "unauthorized"
    wrong_epoch = _change(state, carrier, 2, new, KEYS[:3])
    assert isinstance(wrong_epoch, Rejected) and wrong_epoch.code == "conflict"
    ok = _change(state, carrier, 1, new, KEYS[:3])
    assert not isinstance(ok, Rejected)
    state = ok[0]
    assert state.validators == tuple(new) and state.validator_epoch == 1
    view = validators_view(state)
    assert view["epoch"] == 1 and view["quorum"] == 3
    assert view["changes"][0]["validators"] == new
    # the approvals of the old set cannot be replayed for another change
    again = _change(state, carrier, 2, sorted(k.public_hex for k in KEYS[:4]), KEYS[:3])
    assert isinstance(again, Rejected) and again.code == "unauthorized"
