"""Per-server and per-connection state the Zero-DB command handlers read and change."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from zerostack.zdb.engine import Engine, Namespace

DEFAULT_NAMESPACE: Final = "default"


@dataclass
class IoErrors:
    """I/O errors met while serving one namespace: count and time of the last one, for its
    index files and its data files (NSINFO's stats_* lines)."""

    index: int = 0
    index_last: int = 0
    data: int = 0
    data_last: int = 0


@dataclass
class DiskCounters:
    """INFO's disk figures. Bytes written are the growth of the files; index bytes read
    are what the start-up replay read; the failures are I/O errors met serving requests."""

    index_read_failed: int = 0
    index_write_failed: int = 0
    data_read_failed: int = 0
    data_write_failed: int = 0
    index_loaded: int = 0
    index_written: int = 0
    data_written: int = 0
    # namespace name -> (the namespace, its index and data bytes when last counted)
    seen: dict[str, tuple[Namespace, int, int]] = field(default_factory=dict)


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
    # A random id for this run of the server (INFO's instance_id, like the reference's).
    instance_id: int = field(default_factory=lambda: secrets.randbits(32))
    network_rx: int = 0  # bytes received from clients
    network_tx: int = 0  # bytes of replies handed to the sockets
    io_errors: dict[str, IoErrors] = field(default_factory=dict)
    disk: DiskCounters = field(default_factory=DiskCounters)
    # `--client-output-limit`: no single reply may grow past it (0: no limit).
    reply_limit: int = 0
    sessions: set[Session] = field(default_factory=set)
    # Set by the server: called by STOP to end the process cleanly.
    on_stop: Callable[[], None] = lambda: None
    # Set by the server: called when NSDEL removes a namespace other sessions still use.
    on_namespace_removed: Callable[[str], None] = lambda name: None

    def __post_init__(self) -> None:
        # The baseline of the disk counters: what the files held when the server started.
        disk = self.disk
        for name, ns in self.engine.namespaces.items():
            isize, dsize = ns.file_sizes()
            disk.seen[name] = (ns, isize, dsize)
            disk.index_loaded += isize

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
