"""Server-wide queries: PING, TIME, INFO (the reference's commands_system)."""

from __future__ import annotations

import time

from zerostack import __version__
from zerostack.zdb.commands.session import Session
from zerostack.zdb.protocol import PONG


def cmd_ping(s: Session, args: list[bytes]) -> bytes:
    return PONG


def cmd_time(s: Session, args: list[bytes]) -> bytes:
    """TIME: [seconds, microseconds], both as bulk strings like Redis."""
    now = time.time_ns() // 1000
    sec, usec = b"%d" % (now // 1_000_000), b"%d" % (now % 1_000_000)
    return b"*2\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(sec), sec, len(usec), usec)


def info_text(s: Session) -> str:
    state = s.state
    now = int(time.time())
    lines = [
        "# server",
        "server_name: 0-db (zdb)",
        f"server_revision: zerostack-{__version__}",
        f"engine_revision: zerostack-{__version__}",
        f"boot_time: {state.boot_time}",
        f"uptime: {now - state.boot_time}",
        "",
        "# clients",
        f"clients_lifetime: {state.clients_lifetime}",
        f"clients_connected: {len(state.sessions)}",
        "",
        "# internals",
        "sequential_key_size: 8",
        f"namespaces: {len(state.engine.namespaces)}",
        "",
        "# stats",
        f"commands_executed: {state.commands_executed}",
        f"commands_failed: {state.commands_failed}",
        f"commands_unauthorized: {state.commands_unauthorized}",
    ]
    return "\n".join(lines) + "\n"


def cmd_info(s: Session, args: list[bytes]) -> bytes:
    text = info_text(s).encode()
    return b"$%d\r\n%b\r\n" % (len(text), text)


HANDLERS = {b"PING": cmd_ping, b"TIME": cmd_time, b"INFO": cmd_info}
