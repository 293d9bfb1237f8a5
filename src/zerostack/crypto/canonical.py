"""Canonical JSON (UTF-8, sorted keys, no whitespace, integers only) and blake2b-256 hashes.

Every hash and signature in zerostack is taken over these bytes, so two parties that
hold the same data compute the same hash whatever JSON library produced it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


class CanonicalError(ValueError):
    """A value that has no canonical JSON form (a float, a non-string key, bytes...)."""


def _check(value: Any, path: str) -> None:
    # orjson would happily encode floats and non-str keys; canonical form forbids them
    # because they do not round-trip identically across languages.
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        raise CanonicalError(f"{path or 'value'}: floats are not allowed in canonical JSON")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalError(f"{path or 'value'}: object keys must be strings, got {k!r}")
            _check(v, f"{path}.{k}" if path else k)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]")
        return
    raise CanonicalError(f"{path or 'value'}: {type(value).__name__} is not JSON")


def canonical_json(value: Any) -> bytes:
    """Encode `value` as canonical JSON bytes."""
    _check(value, "")
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def hash_bytes(data: bytes) -> bytes:
    """blake2b-256 of raw bytes."""
    return hashlib.blake2b(data, digest_size=32).digest()


def hash_obj(value: Any) -> bytes:
    """blake2b-256 of the canonical JSON of `value` (32 raw bytes)."""
    return hash_bytes(canonical_json(value))


def hash_hex(value: Any) -> str:
    """blake2b-256 of the canonical JSON of `value`, as lowercase hex."""
    return hash_obj(value).hex()
