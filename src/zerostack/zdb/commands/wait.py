"""WAIT: block a client until another client of its namespace runs a given command."""

from __future__ import annotations

from zerostack.zdb.commands.rules import atoll
from zerostack.zdb.commands.session import Session
from zerostack.zdb.protocol import error

DEFAULT_TIMEOUT_MS = 5000
MAX_TIMEOUT_MS = 30 * 60 * 1000

WATCHABLE: set[bytes] = set()
"""Upper-case names WAIT accepts (b"*" = any command); filled by the command registry."""


def cmd_wait(s: Session, args: list[bytes]) -> bytes | None:
    """WAIT command|* [timeout-ms]: `+COMMAND` when it runs, `-Timeout` otherwise.

    Returns None (no reply yet) after recording the wait on the session; the server
    answers later."""
    if len(args) not in (2, 3):
        return error("Invalid arguments")
    name = args[1].upper()
    if name not in WATCHABLE:
        return error("Unknown command to watch")
    timeout = DEFAULT_TIMEOUT_MS
    if len(args) == 3:
        if len(args[2]) > 16:
            return error("Invalid timeout")
        timeout = atoll(args[2])
        if timeout < 100 or timeout > MAX_TIMEOUT_MS:
            return error("Invalid timeout")
    s.wait_for = name
    s.wait_timeout_ms = timeout
    return None


HANDLERS = {b"WAIT": cmd_wait}
