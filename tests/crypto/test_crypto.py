"""Identities, canonical JSON, hashes, sealed boxes and key files."""

from __future__ import annotations

import os
from pathlib import Path

import nacl.exceptions
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.crypto import (
    MAX_DEPTH,
    MAX_INT,
    CanonicalError,
    CryptoError,
    Domain,
    Identity,
    canonical_json,
    hash_hex,
    load_identity,
    open_sealed,
    save_identity,
    seal_to,
    verify,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX_INT, MAX_INT) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


def test_canonical_json_sorts_keys_and_has_no_whitespace() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()


def nested(levels: int) -> object:
    value: object = 0
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("bad", [1.5, {"a": 0.1}, {1: "x"}, b"raw", [object()], 2**53,
                                 -(2**53), {"a": [2**63]}, nested(MAX_DEPTH + 1)])
def test_canonical_json_refuses_non_canonical_values(bad: object) -> None:
    with pytest.raises(CanonicalError):
        canonical_json(bad)


def test_canonical_json_bounds_integers_and_nesting_with_a_reason() -> None:
    assert canonical_json([MAX_INT, -MAX_INT]) == b"[9007199254740991,-9007199254740991]"
    canonical_json(nested(MAX_DEPTH))
    with pytest.raises(CanonicalError, match=r"nested deeper than 64 levels"):
        canonical_json(nested(300))  # no RecursionError, no encoder error
    with pytest.raises(CanonicalError, match=r"k\[0\]\.k: integers are limited"):
        canonical_json({"k": [{"k": 2**53}]})


@given(json_values)
def test_hash_ignores_key_order(value: object) -> None:
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert hash_hex(reordered) == hash_hex(value)
    assert len(hash_hex(value)) == 64


def test_sign_and_verify() -> None:
    a, b = Identity.generate(), Identity.generate()
    msg = bytes(32)
    sig = a.sign(Domain.TRANSACTION, msg)
    assert verify(Domain.TRANSACTION, a.public_hex, msg, sig)
    assert not verify(Domain.TRANSACTION, b.public_hex, msg, sig)
    assert not verify(Domain.TRANSACTION, a.public_hex, b"\x01" + msg[1:], sig)
    assert not verify(Domain.TRANSACTION, a.public_hex, msg, sig[:-1])
    assert not verify(Domain.TRANSACTION, "zz", msg, sig)


@given(st.sampled_from(list(Domain)), st.sampled_from(list(Domain)), st.binary(max_size=64))
def test_a_signature_verifies_in_its_own_domain_only(signed: Domain, shown: Domain,
                                                      data: bytes) -> None:
    key = Identity.from_seed(bytes(32))
    sig = key.sign(signed, data)
    assert verify(shown, key.public_hex, data, sig) == (signed == shown)
    # and never as the bare data: no signature of zerostack's is over undecorated bytes
    assert not nacl_verifies(key, data, sig)


def nacl_verifies(key: Identity, data: bytes, sig: bytes) -> bool:
    try:
        key.signing_key.verify_key.verify(data, sig)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def test_sign_refuses_a_bare_string_domain() -> None:
    with pytest.raises(TypeError, match="Domain"):
        Identity.generate().sign("transaction", bytes(32))  # type: ignore[arg-type]


def test_sealed_box_opens_only_for_its_recipient() -> None:
    a, b = Identity.generate(), Identity.generate()
    box = seal_to(a.public_hex, b"secret instructions")
    assert b"secret" not in box
    assert open_sealed(a, box) == b"secret instructions"
    with pytest.raises(CryptoError):
        open_sealed(b, box)


def test_key_file_mode_and_round_trip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "ids" / "alice.key"
    save_identity(ident, path, "alice")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_identity(path).public_hex == ident.public_hex
    os.chmod(path, 0o644)
    with pytest.raises(CryptoError, match="0600"):
        load_identity(path)
