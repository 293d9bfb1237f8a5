"""Validators: the keys whose signatures make a block final, and how the set changes.

The set lives in the ledger's state. Genesis names it (a single-process ledger's set is
its operator key alone: a one-validator grid). Each validator signs each block's hash in
the `block-header` domain; a block is **final** once more than two thirds of the set in
force for it (the set after the block before) signed it.

The set changes only by a `validator.set` transaction carrying, in the `validator-set`
domain, the approvals of more than two thirds of the *current* validators over the digest
of `{epoch, validators}` (the new set, sorted, and the next epoch number). The change
takes effect from the next block. A consumer that knows the set of epoch N follows every
change from there on by checking each change's approvals against the set before it:
nothing but the validators themselves can hand it a new set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from zerostack.crypto import Domain, Identity, hash_obj, verify
from zerostack.ledger import tx as t
from zerostack.ledger.records import Refuse, State, Twin, replace_record

Receipt = dict[str, Any]


def quorum(n: int) -> int:
    """The fewest signers of a set of `n` that are more than two thirds of it."""
    return 2 * n // 3 + 1


def set_digest(epoch: int, validators: Iterable[str]) -> bytes:
    """What a validator approves when it agrees to the set `validators` as epoch `epoch`."""
    return hash_obj({"epoch": epoch, "validators": sorted(set(validators))})


def approve_set(identity: Identity, epoch: int, validators: Iterable[str]) -> dict[str, str]:
    """One current validator's approval of the new set (an entry of `approvals`)."""
    sig = identity.sign(Domain.VALIDATOR_SET, set_digest(epoch, validators))
    return {"key": identity.public_hex, "signature": sig.hex()}


def approved_by(current: Sequence[str], epoch: int, validators: Iterable[str],
                approvals: Iterable[tuple[str, str]]) -> int:
    """How many distinct members of `current` validly approved this change."""
    digest = set_digest(epoch, validators)
    members = set(current)
    good: set[str] = set()
    for key, signature in approvals:
        if key in members and key not in good and len(signature) == 128 and verify(
                Domain.VALIDATOR_SET, key, digest, bytes.fromhex(signature)):
            good.add(key)
    return len(good)


def signed_by(block_hash: str, signatures: Iterable[Any], validators: Sequence[str]) -> int:
    """How many distinct members of `validators` validly signed `block_hash`.
    `signatures` are BlockSignature records or `{key, signature}` dicts."""
    members = set(validators)
    good: set[str] = set()
    digest = bytes.fromhex(block_hash)
    for s in signatures:
        key, sig = (s["key"], s["signature"]) if isinstance(s, dict) else (s.key, s.signature)
        if key in members and key not in good and verify(
                Domain.BLOCK_HEADER, key, digest, bytes.fromhex(sig)):
            good.add(key)
    return len(good)


def is_final(block_hash: str, signatures: Iterable[Any], validators: Sequence[str]) -> bool:
    """More than two thirds of `validators` signed `block_hash`."""
    return bool(validators) and signed_by(block_hash, signatures, validators) >= quorum(
        len(validators))


def validator_set(state: State, tx: t.Tx, twin: Twin, time: int) -> tuple[State, Receipt]:
    """The `validator.set` handler (registered in ledger/state.py)."""
    p: t.ValidatorSet = tx.payload
    new = tuple(sorted(set(p.validators)))
    if len(new) != len(p.validators):
        raise Refuse("invalid", "validator.set lists a key twice")
    if p.epoch != state.validator_epoch + 1:
        raise Refuse("conflict", f"validator.set must be epoch {state.validator_epoch + 1}, "
                     f"not {p.epoch}")
    current = state.validators
    approvals = tuple((a.key, a.signature) for a in p.approvals)
    got = approved_by(current, p.epoch, new, approvals)
    if got < quorum(len(current)):
        raise Refuse("unauthorized", f"validator.set needs the approval of {quorum(len(current))}"
                     f" of the {len(current)} current validators, it has {got}")
    change = (p.epoch, new, approvals, tx.hash_hex)
    state = replace_record(state, validators=new, validator_epoch=p.epoch,
                           validator_changes=(*state.validator_changes, change))
    return state, {"epoch": p.epoch, "validators": list(new)}


def validators_view(state: State, height_of: Any = None) -> dict[str, Any]:
    """What `GET /validators` serves: the current set, its epoch, the quorum, and every
    change with the approvals that authorised it (`height_of(tx_hash)` gives the block
    height of a change, so a consumer knows which set signs which block)."""
    changes = []
    for epoch, keys, approvals, tx_hash in state.validator_changes:
        changes.append({
            "epoch": epoch, "validators": list(keys), "tx": tx_hash,
            "height": height_of(tx_hash) if height_of is not None else None,
            "approvals": [{"key": k, "signature": s} for k, s in approvals],
        })
    return {"epoch": state.validator_epoch, "validators": list(state.validators),
            "quorum": quorum(len(state.validators)), "changes": changes}
