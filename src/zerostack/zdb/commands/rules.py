"""Argument and permission rules shared by the command families, with the reference texts."""

from __future__ import annotations

from typing import Final

from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import error

MAX_KEY_LENGTH: Final = 255
MAX_NAMESPACE_LENGTH: Final = 128

UNEXPECTED_ARGUMENTS: Final = error("Unexpected arguments")
INVALID_ARGUMENT: Final = error("Invalid argument")
INVALID_ARGUMENTS: Final = error("Invalid arguments")
INVALID_KEY: Final = error("Invalid key")
PERMISSION_DENIED: Final = error("Permission denied")
READ_ONLY: Final = error("Namespace is in read-only mode")
LOCKED: Final = error("Namespace is temporarily locked (read-only)")
FROZEN: Final = error("Namespace is temporarily frozen (read-write disabled)")
NAMESPACE_TOO_LONG: Final = error("Namespace too long")
NAMESPACE_NOT_FOUND: Final = error("Namespace not found")


# The engine's texts for a locked or frozen namespace, and what the reference replies.
_REFERENCE_TEXTS: Final = {
    "Namespace is temporarily frozen": FROZEN,
    "Namespace is in read-only mode": LOCKED,  # raised for `lock`; session read-only is ours
}


def refusal(exc: ZdbError) -> bytes:
    """The error reply for an engine refusal, in the reference's words."""
    text = str(exc)
    return _REFERENCE_TEXTS.get(text) or error(text)


def arity(args: list[bytes], expected: int, allow_empty: bool = False) -> bytes | None:
    """None when `args` has exactly `expected` items (non-empty unless allowed), else the error."""
    if len(args) != expected:
        return UNEXPECTED_ARGUMENTS
    if not allow_empty:
        for arg in args:
            if not arg:
                return INVALID_ARGUMENT
    return None


def admin(session: Session) -> bytes | None:
    """None when the client is admin, else `-Permission denied` (and counted)."""
    if session.admin:
        return None
    session.state.commands_unauthorized += 1
    return PERMISSION_DENIED


def atoll(raw: bytes) -> int:
    """C atoll(): optional sign and leading digits, 0 when there are none."""
    text = raw.strip()
    end = 0
    if text[:1] in (b"-", b"+"):
        end = 1
    while end < len(text) and 48 <= text[end] <= 57:
        end += 1
    try:
        return int(text[:end])
    except ValueError:
        return 0
