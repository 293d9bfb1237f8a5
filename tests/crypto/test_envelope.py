"""Sealed envelopes (one plaintext, several recipients) and pinned keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostack.crypto import (
    CryptoError,
    Identity,
    KeyChanged,
    KeyPins,
    envelope_recipients,
    open_envelope,
    seal_envelope,
)

PEOPLE = [Identity.generate() for _ in range(4)]


@given(st.binary(max_size=4096), st.sets(st.integers(0, 3), min_size=1))
@settings(max_examples=40, deadline=None)
def test_every_recipient_and_nobody_else_opens_it(text: bytes, who: set[int]) -> None:
    env = seal_envelope([PEOPLE[i].public_hex for i in who], text)
    assert set(envelope_recipients(env)) == {PEOPLE[i].public_hex for i in who}
    for i, person in enumerate(PEOPLE):
        if i in who:
            assert open_envelope(person, env) == text
        else:
            with pytest.raises(CryptoError, match="not sealed to this identity"):
                open_envelope(person, env)


@given(st.binary(max_size=300))
def test_junk_is_refused_with_a_crypto_error(junk: bytes) -> None:
    with pytest.raises(CryptoError):
        open_envelope(PEOPLE[0], junk)


def test_a_flipped_byte_is_detected() -> None:
    env = bytearray(seal_envelope([PEOPLE[0].public_hex], b"secret"))
    env[-1] ^= 1
    with pytest.raises(CryptoError, match="damaged"):
        open_envelope(PEOPLE[0], bytes(env))


def test_pins_refuse_a_changed_key_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "pins.json"
    pins = KeyPins(path)
    pins.pin("twin", 3, "aa" * 32)
    pins.pin("twin", 3, "aa" * 32)  # the same key again is fine
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = KeyPins(path)
    assert again.get("twin", 3) == "aa" * 32
    with pytest.raises(KeyChanged, match="twin 3's key is now"):
        again.pin("twin", 3, "bb" * 32)
    with pytest.raises(KeyChanged):
        again.check("twin", 3, "bb" * 32)
    again.check("node", 3, "bb" * 32)  # kinds are separate
    path.write_text("[1, 2]")
    with pytest.raises(CryptoError, match="not a"):
        KeyPins(path)
