"""Walking a namespace: SCAN, RSCAN, KEYCUR and HISTORY (the reference's commands_scan / _history)."""

from __future__ import annotations

from zerostack.zdb.commands.rules import FROZEN, INVALID_ARGUMENTS, arity
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import NIL, error

SCAN_BATCH = 100
"""Entries per SCAN reply. The reference fills a reply for a time slice; a fixed count keeps
replies predictable and short enough not to stall other clients."""

KEY_NOT_FOUND = error("Key not found")


def _scan(s: Session, args: list[bytes], reverse: bool) -> bytes:
    if len(args) > 2:
        return error("Unexpected arguments")
    if s.ns.frozen:
        return FROZEN
    cursor = args[1] if len(args) == 2 else None
    try:
        following, entries = s.ns.scan(cursor, reverse=reverse, count=SCAN_BATCH)
    except ZdbError as exc:
        return error(str(exc))
    out = [b"*2\r\n$%d\r\n%b\r\n*%d\r\n" % (len(following), following, len(entries))]
    for key, length, timestamp in entries:
        out.append(b"*3\r\n$%d\r\n%b\r\n:%d\r\n:%d\r\n" % (len(key), key, length, timestamp))
    return b"".join(out)


def cmd_scan(s: Session, args: list[bytes]) -> bytes:
    """SCAN [cursor]: [next cursor, [[key, length, timestamp], ...]] in write order."""
    return _scan(s, args, reverse=False)


def cmd_rscan(s: Session, args: list[bytes]) -> bytes:
    """RSCAN [cursor]: like SCAN, newest first."""
    return _scan(s, args, reverse=True)


def cmd_keycur(s: Session, args: list[bytes]) -> bytes:
    """KEYCUR key: an opaque cursor positioned at that key, for SCAN/RSCAN."""
    bad = arity(args, 2)
    if bad is not None:
        return bad
    cursor = s.ns.keycur(args[1])
    if cursor is None:
        return KEY_NOT_FOUND
    return b"$%d\r\n%b\r\n" % (len(cursor), cursor)


def cmd_history(s: Session, args: list[bytes]) -> bytes:
    """HISTORY key [cursor]: [older cursor or nil, timestamp, value], newest first."""
    if len(args) not in (2, 3):
        return INVALID_ARGUMENTS
    if s.ns.frozen:
        return FROZEN
    try:
        found = s.ns.history(args[1], args[2] if len(args) == 3 else None)
    except ZdbError as exc:
        return error(str(exc))
    if found is None:
        return KEY_NOT_FOUND
    older, timestamp, value = found
    head = NIL if older is None else b"$%d\r\n%b\r\n" % (len(older), older)
    stamp = b"%d" % timestamp
    return b"*3\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (head, len(stamp), stamp, len(value), value)


HANDLERS = {
    b"SCAN": cmd_scan,
    b"SCANX": cmd_scan,
    b"RSCAN": cmd_rscan,
    b"KEYCUR": cmd_keycur,
    b"HISTORY": cmd_history,
}
