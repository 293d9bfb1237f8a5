"""Zero-DB command layer: one module per command family, gathered into one dispatch table.

A handler takes the client's Session and the request (command name first) and returns the
encoded reply, or None when the reply comes later (WAIT).
"""

from __future__ import annotations

from collections.abc import Callable

from zerostack.zdb.commands import (
    admin,
    compaction,
    namespace,
    read,
    replication,
    scan,
    system,
    wait,
    write,
)
from zerostack.zdb.commands.rules import refusal
from zerostack.zdb.commands.session import DEFAULT_NAMESPACE, ServerState, Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import error

Handler = Callable[[Session, list[bytes]], bytes | None]

COMMANDS: dict[bytes, Handler] = {}
# Later families wrap some earlier commands (INFO, FLUSH, NSSET, NSDEL), so order matters.
for _family in (system, write, read, scan, namespace, admin, wait, replication, compaction):
    COMMANDS.update(_family.HANDLERS)

wait.WATCHABLE.update(COMMANDS)
wait.WATCHABLE.add(b"*")

HANDLERS: dict[bytes, Handler] = {}
"""Dispatch table: upper- and lower-case names, so common spellings need no .upper()."""
for _name, _handler in COMMANDS.items():
    HANDLERS[_name] = _handler
    HANDLERS[_name.lower()] = _handler

READ_ONLY_HANDLERS: dict[bytes, Handler] = {
    name: replication.refuse_on_replica if name.upper() in replication.WRITE_COMMANDS else h
    for name, h in HANDLERS.items()}
"""Dispatch table of a replica: writes are refused, every change comes from the primary."""


def lookup(name: bytes, table: dict[bytes, Handler] | None = None) -> Handler | None:
    """The handler for a command name in any letter case."""
    table = HANDLERS if table is None else table
    handler = table.get(name)
    if handler is None:
        handler = table.get(name.upper())
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
           "NOT_SUPPORTED", "READ_ONLY_HANDLERS", "Handler", "ServerState", "Session", "execute", "lookup"]
