"""Key reads: GET, MGET, EXISTS, CHECK, LENGTH, KEYTIME (the reference's commands_get / _dataset)."""

from __future__ import annotations

from typing import Final

from zerostack.zdb.commands.rules import (
    FROZEN,
    INVALID_ARGUMENT,
    INVALID_KEY,
    MAX_KEY_LENGTH,
    UNEXPECTED_ARGUMENTS,
    refusal,
)
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import BULK_HEADS, CRLF, NIL, ONE, ZERO, bulk

MISSING_ARGUMENTS: Final = b"-Missing arguments\r\n"
REPLY_TOO_LARGE: Final = b"-Reply too large: ask for fewer keys at once\r\n"


def _key(s: Session, args: list[bytes]) -> bytes | None:
    """The error reply for a malformed single-key request, or None when it is fine."""
    if len(args) != 2:
        return UNEXPECTED_ARGUMENTS
    key = args[1]
    if not key:
        return INVALID_ARGUMENT
    if len(key) > MAX_KEY_LENGTH:
        return INVALID_KEY
    if s.ns.frozen:
        return FROZEN
    return None


def cmd_get(s: Session, args: list[bytes]) -> bytes:
    if len(args) != 2 or not 0 < len(args[1]) <= MAX_KEY_LENGTH:
        return _key(s, args) or INVALID_ARGUMENT
    try:
        value = s.ns.get(args[1])
    except ZdbError as exc:
        return refusal(exc)
    if value is None:
        return NIL
    return bulk(value)


def reply_get(s: Session, args: list[bytes], out: bytearray) -> None:
    """cmd_get with its reply appended to `out`, the batch's reply buffer: a pipelined
    GET makes no reply object of its own (the server's batch loop calls this)."""
    if len(args) != 2 or not 0 < len(args[1]) <= MAX_KEY_LENGTH:
        out += _key(s, args) or INVALID_ARGUMENT
        return
    try:
        value = s.ns.get(args[1])
    except ZdbError as exc:
        out += refusal(exc)
        return
    if value is None:
        out += NIL
        return
    n = len(value)
    out += BULK_HEADS[n] if n < 1024 else b"$%d\r\n" % n
    out += value
    out += CRLF


GET_RUN: Final = 16
"""Consecutive pipelined GETs served together (see reply_get_run)."""


def reply_get_run(s: Session, keys: list[bytes], out: bytearray, budget: int) -> int:
    """GET of each of `keys` (each 1 to MAX_KEY_LENGTH bytes), the replies appended to
    `out`; returns how many were answered, fewer than asked once the replies passed
    `budget` bytes (the caller holds the rest). Their key lookups are made together."""
    try:
        values = s.ns.get_many(keys, budget)
    except ZdbError as exc:
        reply = refusal(exc)
        for _ in keys:
            out += reply
        return len(keys)
    # Joined once, then appended: one copy into `out` instead of three appends per reply.
    parts: list[bytes] = []
    for value in values:
        if value is None:
            parts.append(NIL)
            continue
        n = len(value)
        parts.append(BULK_HEADS[n] if n < 1024 else b"$%d\r\n" % n)
        parts.append(value)
        parts.append(CRLF)
    out += b"".join(parts)
    return len(values)


def cmd_mget(s: Session, args: list[bytes]) -> bytes:
    if len(args) < 2:
        return MISSING_ARGUMENTS
    if s.ns.frozen:
        return FROZEN
    get = s.ns.get
    out = [b"*%d\r\n" % (len(args) - 1)]
    # Up to 1,024 values of up to 8 MiB: stop building once past the output limit rather
    # than hold gigabytes for one reply.
    limit = s.state.reply_limit
    size = 0
    for key in args[1:]:
        value = get(key) if 0 < len(key) <= MAX_KEY_LENGTH else None
        if value is None:
            out.append(NIL)
            continue
        size += len(value)
        if limit and size > limit:
            return REPLY_TOO_LARGE
        out.append(bulk(value))
    return b"".join(out)


def cmd_exists(s: Session, args: list[bytes]) -> bytes:
    bad = _key(s, args)
    if bad is not None:
        return bad
    return ONE if s.ns.exists(args[1]) else ZERO


def cmd_check(s: Session, args: list[bytes]) -> bytes:
    """CHECK key: re-read the payload and verify its CRC; nil when the key is missing."""
    bad = _key(s, args)
    if bad is not None:
        return bad
    valid = s.ns.check(args[1])
    if valid is None:
        return NIL
    return ONE if valid else ZERO


def cmd_length(s: Session, args: list[bytes]) -> bytes:
    bad = _key(s, args)
    if bad is not None:
        return bad
    length = s.ns.length(args[1])
    return NIL if length is None else b":%d\r\n" % length


def cmd_keytime(s: Session, args: list[bytes]) -> bytes:
    bad = _key(s, args)
    if bad is not None:
        return bad
    stamp = s.ns.keytime(args[1])
    return NIL if stamp is None else b":%d\r\n" % stamp


HANDLERS: Final = {
    b"GET": cmd_get,
    b"MGET": cmd_mget,
    b"EXISTS": cmd_exists,
    b"CHECK": cmd_check,
    b"LENGTH": cmd_length,
    b"KEYTIME": cmd_keytime,
}
