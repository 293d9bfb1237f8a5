"""Sealed envelopes: one plaintext readable by several identities (a node and every
stakeholder of a deployment), and by nobody else.

A random 32-byte key encrypts the plaintext once (XSalsa20-Poly1305, `SecretBox`); that
key is sealed to each recipient's X25519 key (derived from its ed25519 identity). Layout:
`0x01 | n | n x (ed25519 public key 32 | sealed key 80) | secret box`.
"""

from __future__ import annotations

from collections.abc import Iterable

import nacl.exceptions
import nacl.secret
import nacl.utils

from zerostack.crypto.identity import CryptoError, Identity, open_sealed, seal_to

VERSION = 1
MAX_RECIPIENTS = 255
_SEALED_KEY = 32 + 48  # a SealedBox adds an ephemeral public key and a MAC
_ENTRY = 32 + _SEALED_KEY


def seal_envelope(recipients: Iterable[str], plaintext: bytes) -> bytes:
    """Encrypt `plaintext` for every public key (hex) in `recipients` (deduplicated)."""
    keys = sorted(set(recipients))
    if not keys:
        raise CryptoError("an envelope needs at least one recipient")
    if len(keys) > MAX_RECIPIENTS:
        raise CryptoError(f"an envelope has at most {MAX_RECIPIENTS} recipients")
    secret = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    out = bytearray([VERSION, len(keys)])
    for key in keys:
        out += bytes.fromhex(key)
        out += seal_to(key, secret)
    out += nacl.secret.SecretBox(secret).encrypt(plaintext)
    return bytes(out)


def envelope_recipients(envelope: bytes) -> list[str]:
    """The public keys (hex) an envelope is sealed to."""
    n = _header(envelope)
    return [envelope[2 + i * _ENTRY: 2 + i * _ENTRY + 32].hex() for i in range(n)]


def open_envelope(identity: Identity, envelope: bytes) -> bytes:
    """The plaintext, if `identity` is one of the recipients; CryptoError otherwise."""
    n = _header(envelope)
    mine = identity.public_key
    for i in range(n):
        at = 2 + i * _ENTRY
        if envelope[at:at + 32] != mine:
            continue
        secret = open_sealed(identity, envelope[at + 32:at + _ENTRY])
        try:
            return nacl.secret.SecretBox(secret).decrypt(envelope[2 + n * _ENTRY:])
        except nacl.exceptions.CryptoError as exc:
            raise CryptoError("envelope is damaged: its content does not decrypt") from exc
    raise CryptoError("this envelope is not sealed to this identity")


def _header(envelope: bytes) -> int:
    if len(envelope) < 2 or envelope[0] != VERSION:
        raise CryptoError("not a sealed envelope (unknown format)")
    n = envelope[1]
    if n == 0 or len(envelope) < 2 + n * _ENTRY + nacl.secret.SecretBox.NONCE_SIZE + 16:
        raise CryptoError("sealed envelope is truncated")
    return n
