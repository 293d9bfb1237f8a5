"""ed25519 identities: signing, verification, sealed boxes (X25519 derived) and key files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.signing

from zerostack.crypto.domains import Domain, signed_message


class CryptoError(Exception):
    """A key, signature or sealed box that is malformed or does not verify."""


@dataclass(frozen=True)
class Identity:
    """An ed25519 key pair. `public_hex` is how the grid names it."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise CryptoError("an ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    def sign(self, domain: Domain, data: bytes) -> bytes:
        """Detached 64-byte signature over `data` (a 32-byte hash) in `domain`: the
        signature says what kind of message it is and verifies as no other kind."""
        return self.signing_key.sign(signed_message(domain, data)).signature

    def open_sealed(self, box: bytes) -> bytes:
        """Open a sealed box addressed to this identity."""
        return open_sealed(self, box)


def public_key_from_hex(public_hex: str) -> nacl.signing.VerifyKey:
    try:
        raw = bytes.fromhex(public_hex)
    except ValueError as exc:
        raise CryptoError(f"public key is not hex: {public_hex[:16]!r}") from exc
    if len(raw) != 32:
        raise CryptoError(f"public key must be 32 bytes, got {len(raw)}")
    return nacl.signing.VerifyKey(raw)


def verify(domain: Domain, public_hex: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_hex`'s signature over `data` in `domain`."""
    if len(signature) != 64:
        return False
    message = signed_message(domain, data)
    try:
        public_key_from_hex(public_hex).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, CryptoError, nacl.exceptions.ValueError):
        return False
    return True


def seal_to(public_hex: str, plaintext: bytes) -> bytes:
    """Encrypt `plaintext` so only the holder of `public_hex`'s private key can read it."""
    curve = public_key_from_hex(public_hex).to_curve25519_public_key()
    return nacl.public.SealedBox(curve).encrypt(plaintext)


def open_sealed(identity: Identity, box: bytes) -> bytes:
    curve = identity.signing_key.to_curve25519_private_key()
    try:
        return nacl.public.SealedBox(curve).decrypt(box)
    except nacl.exceptions.CryptoError as exc:
        raise CryptoError("sealed box does not open with this identity's key") from exc


def save_identity(identity: Identity, path: Path, name: str = "") -> None:
    """Write a key file readable by its owner only (mode 0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    body = json.dumps(
        {"name": name, "public": identity.public_hex, "seed": bytes(identity.signing_key).hex()}
    ).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_identity(path: Path) -> Identity:
    """Read a key file written by `save_identity`; refuses files others can read."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CryptoError(f"{path}: key file mode is {oct(mode)}, must be 0600")
    try:
        data = json.loads(path.read_text())
        return Identity.from_seed(bytes.fromhex(data["seed"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise CryptoError(f"{path}: not a zerostack key file") from exc
