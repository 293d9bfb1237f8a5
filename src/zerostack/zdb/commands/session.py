"""Per-server and per-connection state the Zero-DB command handlers read and change."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from zerostack.zdb.engine import Engine, Namespace

DEFAULT_NAMESPACE: Final = "default"


@dataclass
class ServerState:
    """What every connection shares: the engine, admin settings and counters."""

    engine: Engine
    admin_password: str | None = None
    protect: bool = False  # `--protect`: 'default' is guarded by the admin password
    boot_time: int = field(default_factory=lambda: int(time.time()))
    clients_lifetime: int = 0
    commands_executed: int = 0
    commands_failed: int = 0
    commands_unauthorized: int = 0
    # `--client-output-limit`: no single reply may grow past it (0: no limit).
    reply_limit: int = 0
    sessions: set[Session] = field(default_factory=set)
    # Set by the server: called by STOP to end the process cleanly.
    on_stop: Callable[[], None] = lambda: None
    # Set by the server: called when NSDEL removes a namespace other sessions still use.
    on_namespace_removed: Callable[[str], None] = lambda name: None

    def credentials(self, ns: Namespace) -> tuple[str | None, bool]:
        """(password, public) as SELECT sees them: `--protect` guards 'default' with the
        admin password and leaves it public (read-only without the password)."""
        if self.protect and ns.name == DEFAULT_NAMESPACE and self.admin_password:
            return self.admin_password, True
        return ns.password, ns.public


class Session:
    """One client connection: its namespace, write permission and admin flag."""

    __slots__ = ("admin", "nonce", "ns", "removed", "state", "wait_for", "wait_timeout_ms",
                 "writable")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.ns: Namespace = state.engine.namespace(DEFAULT_NAMESPACE)
        password, _public = state.credentials(self.ns)
        # Every client is admin when no admin password is set (the reference's rule).
        self.admin = state.admin_password is None
        self.writable = password is None
        self.nonce: str | None = None  # AUTH SECURE CHALLENGE
        # Set by WAIT: the command (upper case, b"*" for any) whose run by another client
        # in the same namespace answers this client; the server arranges the wait.
        self.wait_for: bytes | None = None
        self.wait_timeout_ms = 0
        # Set when NSDEL removed `ns` under this client: its next request ends the connection.
        self.removed = False
