"""Zero-DB command layer: one module per command family, gathered into one dispatch table.

A handler takes the client's Session and the request (command name first) and returns the
encoded reply, or None when the reply comes later (WAIT).
"""

from __future__ import annotations

from collections.abc import Callable

from zerostack.zdb.commands import admin, namespace, read, scan, system, wait, write
from zerostack.zdb.commands.session import DEFAULT_NAMESPACE, ServerState, Session

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

WRITES = frozenset({b"SET", b"SETX", b"DEL", b"FLUSH", b"NSJUMP", b"NSNEW", b"NSDEL", b"NSSET"})
"""Commands that change stored data; a batch holding one needs the engine flushed."""


def lookup(name: bytes) -> Handler | None:
    """The handler for a command name in any letter case."""
    handler = HANDLERS.get(name)
    if handler is None:
        handler = HANDLERS.get(name.upper())
    return handler


__all__ = ["COMMANDS", "DEFAULT_NAMESPACE", "HANDLERS", "WRITES", "Handler", "ServerState",
           "Session", "lookup"]
