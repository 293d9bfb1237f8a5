"""Zero-DB command layer: one module per command family, gathered into one dispatch table.

A handler takes the client's Session and the request (command name first) and returns the
encoded reply, or None when the reply comes later (WAIT).
"""

from __future__ import annotations

from collections.abc import Callable

from zerostack.zdb.commands import admin, namespace, read, scan, system, wait, write
from zerostack.zdb.commands.rules import refusal
from zerostack.zdb.commands.session import DEFAULT_NAMESPACE, ServerState, Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import error

Handler = Callable[[Session, list[bytes]], bytes | None]

COMMANDS: dict[bytes, Handler] = {}
for _family in (system, write, read, scan, namespace, admin, wait):
    COMMANDS.update(_family.HANDLERS)

wait.WATCHABLE.update(COMMANDS)
wait.WATCHABLE.add(b"*")

HANDLERS: dict[bytes, Handler] = {}
"""Dispatch table: upper- and lower-case names, so common spellings need no .upper()."""
for _name, _handler in COMMANDS.items():
    HANDLERS[_name] = _handler
    HANDLERS[_name.lower()] = _handler

def lookup(name: bytes) -> Handler | None:
    """The handler for a command name in any letter case."""
    handler = HANDLERS.get(name)
    if handler is None:
        handler = HANDLERS.get(name.upper())
    return handler


NOT_SUPPORTED = error("Command not supported")
MISSING_ARGUMENTS = error("Missing arguments")
INTERNAL_ERROR = error("Internal Error")


def execute(session: Session, request: list[bytes]) -> bytes | None:
    """Run one request and return its encoded reply (None: WAIT, answered later).

    The server inlines this in its batch loop for speed; both follow the same rules."""
    if not request:
        return MISSING_ARGUMENTS
    handler = lookup(request[0])
    if handler is None:
        return NOT_SUPPORTED
    try:
        return handler(session, request)
    except ZdbError as exc:
        return refusal(exc)


__all__ = ["COMMANDS", "DEFAULT_NAMESPACE", "HANDLERS", "INTERNAL_ERROR", "MISSING_ARGUMENTS",
           "NOT_SUPPORTED", "Handler", "ServerState", "Session", "execute", "lookup"]
