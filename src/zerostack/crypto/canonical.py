"""Canonical JSON (UTF-8, sorted keys, no whitespace, bounded integers and nesting) and
blake2b-256 hashes.

Every hash and signature in zerostack is taken over these bytes, so two parties that
hold the same data compute the same hash whatever JSON library produced it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

MAX_INT = 2**53 - 1
"""Largest magnitude of an integer: what every JSON client (a JavaScript number, a double)
holds exactly, so a value means the same to every party that reads it."""
MAX_DEPTH = 64
"""Deepest nesting of objects and arrays. The encoder stops at 254 levels; staying well
inside it means whatever was hashed can still be wrapped in a block or an answer."""


class CanonicalError(ValueError):
    """A value that has no canonical JSON form (a float, a non-string key, bytes, an
    integer beyond ±MAX_INT, nesting deeper than MAX_DEPTH...)."""


def _where(path: str) -> str:
    # a path is built from keys the sender chose: keep the error message short
    return "value" if not path else path if len(path) <= 60 else f"{path[:57]}..."


def _check(value: Any, path: str, left: int, limit: int) -> None:
    # orjson would happily encode floats, non-str keys and 64-bit integers; canonical form
    # forbids them because they do not round-trip identically across languages.
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            raise CanonicalError(f"{_where(path)}: integers are limited to ±(2^53 - 1)")
        return
    if isinstance(value, float):
        raise CanonicalError(f"{_where(path)}: floats are not allowed in canonical JSON")
    if isinstance(value, (dict, list, tuple)) and left <= 0:
        raise CanonicalError(f"{_where(path)}: nested deeper than {limit} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalError(f"{_where(path)}: object keys must be strings, got {k!r}")
            _check(v, f"{path}.{k}" if path else k, left - 1, limit)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]", left - 1, limit)
        return
    raise CanonicalError(f"{_where(path)}: {type(value).__name__} is not JSON")


def check_canonical(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise CanonicalError unless `value` has a canonical JSON form nested at most
    `max_depth` levels (`max_depth` may only tighten MAX_DEPTH)."""
    limit = min(max_depth, MAX_DEPTH)
    _check(value, "", limit, limit)


def canonical_json(value: Any) -> bytes:
    """Encode `value` as canonical JSON bytes."""
    _check(value, "", MAX_DEPTH, MAX_DEPTH)
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
