"""Server-wide queries: PING, TIME, INFO (the reference's commands_system)."""

from __future__ import annotations

import hmac
import time

from zerostack import __version__
from zerostack.zdb import native
from zerostack.zdb.commands.session import Session
from zerostack.zdb.protocol import PONG, bulk, error
from zerostack.zdb.replication.role import role_of


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
        f"native_build: {'yes' if native.compiled() else 'no'}",
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


def cmd_hello(s: Session, args: list[bytes]) -> bytes:
    """HELLO [protover [AUTH user password] [SETNAME name]]: the handshake RESP3-first clients
    (redis-py 8) open with. Not in the reference; replies keep their RESP2 shapes, which
    RESP3 parsers read unchanged."""
    version = 2
    if len(args) >= 2:
        try:
            version = int(args[1])
        except ValueError:
            return error("Protocol version is not an integer or out of range")
        if version not in (2, 3):
            return error("NOPROTO unsupported protocol version")
    rest = args[2:]
    while rest:
        option = rest[0].upper()
        if option == b"AUTH" and len(rest) >= 3:
            password = s.state.admin_password
            if password is not None:
                if not hmac.compare_digest(rest[2], password.encode()):
                    return error("Access denied")
                s.admin = True
            rest = rest[3:]
        elif option == b"SETNAME" and len(rest) >= 2:
            rest = rest[2:]
        else:
            return error("Syntax error in HELLO option")
    role = role_of(s.state)
    # Redis's words: a client library reading `role` expects "master" or "replica".
    fields = [
        (b"server", bulk(b"zdb")),
        (b"version", bulk(__version__.encode())),
        (b"proto", b":%d\r\n" % version),
        (b"mode", bulk(b"standalone")),
        (b"role", bulk(b"replica" if role is not None and role.is_replica else b"master")),
    ]
    head = b"%%%d\r\n" % len(fields) if version == 3 else b"*%d\r\n" % (2 * len(fields))
    return head + b"".join(bulk(key) + value for key, value in fields)


HANDLERS = {b"PING": cmd_ping, b"TIME": cmd_time, b"INFO": cmd_info, b"HELLO": cmd_hello}
