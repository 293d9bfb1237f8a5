"""SET and DEL: the write commands of a namespace (the reference's commands_set / _dataset)."""

from __future__ import annotations

from typing import Any, Final

from zerostack.zdb.commands.replication import seq_refusal
from zerostack.zdb.commands.rules import (
    INVALID_ARGUMENT,
    INVALID_KEY,
    MAX_KEY_LENGTH,
    READ_ONLY,
    UNEXPECTED_ARGUMENTS,
    admin,
    atoll,
    refusal,
)
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import NIL, OK, bulk, error

KEY_TOO_LARGE: Final = error("Key too large")


def cmd_set(s: Session, args: list[bytes]) -> bytes:
    """SET key value [timestamp]: the stored key as bulk, nil when the value is unchanged."""
    n = len(args)
    if n == 3:
        timestamp = None
    elif n == 4:
        # Setting a timestamp rewrites history: only replication (admin) may do it.
        denied = admin(s)
        if denied is not None:
            return denied
        timestamp = atoll(args[3])
    else:
        return UNEXPECTED_ARGUMENTS
    if len(args[1]) > MAX_KEY_LENGTH:
        return KEY_TOO_LARGE
    if not s.writable:
        return READ_ONLY
    if not args[1]:  # a new sequential key: not past what enough replicas confirmed
        refused = seq_refusal(s)
        if refused is not None:
            return refused
    # A large value may be the bytearray it was received into (RequestParser keep_values):
    # read it untyped, it is handed over as it is.
    request: list[Any] = args
    value: bytes | bytearray = request[2]
    # The engine refuses the rest (frozen, locked, empty user key, worm, maxsize).
    try:
        stored = s.ns.set(args[1], value, timestamp)
    except ZdbError as exc:
        return refusal(exc)
    if stored is None:
        return NIL
    return bulk(stored)


def cmd_del(s: Session, args: list[bytes]) -> bytes:
    """DEL key [timestamp]: +OK, or `-Key not found`."""
    n = len(args)
    timestamp = None
    if n == 3:
        denied = admin(s)
        if denied is not None:
            return denied
        timestamp = atoll(args[2])
    elif n != 2:
        return UNEXPECTED_ARGUMENTS
    key = args[1]
    if not key:
        return INVALID_ARGUMENT
    if len(key) > MAX_KEY_LENGTH:
        return INVALID_KEY
    if not s.writable:
        return READ_ONLY
    try:
        s.ns.delete(key, timestamp)
    except ZdbError as exc:
        return refusal(exc)
    return OK


HANDLERS: Final = {b"SET": cmd_set, b"SETX": cmd_set, b"DEL": cmd_del}
