"""Server-wide queries: PING, TIME, INFO (the reference's commands_system)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from zerostack import __version__
from zerostack.zdb import native
from zerostack.zdb.commands.session import IoErrors, ServerState, Session
from zerostack.zdb.engine import Namespace
from zerostack.zdb.engine.format import DATA_VERSION, INDEX_VERSION
from zerostack.zdb.protocol import PONG, bulk, error
from zerostack.zdb.replication.role import role_of

MB: Final = 1024 * 1024

# Commands that only read files: an I/O error while serving them is a read failure.
READ_COMMANDS: Final = frozenset({
    b"GET", b"MGET", b"EXISTS", b"CHECK", b"LENGTH", b"KEYTIME", b"KEYCUR", b"SCAN", b"SCANX",
    b"RSCAN", b"HISTORY", b"DATA", b"INFO", b"NSINFO", b"DBSIZE", b"SELECT", b"NSLIST",
})


def cmd_ping(s: Session, args: list[bytes]) -> bytes:
    return PONG


def cmd_time(s: Session, args: list[bytes]) -> bytes:
    """TIME: [seconds, microseconds], both as bulk strings like Redis."""
    now = time.time_ns() // 1000
    sec, usec = b"%d" % (now // 1_000_000), b"%d" % (now % 1_000_000)
    return b"*2\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(sec), sec, len(usec), usec)


def _under(path: str | bytes | None, root: Path) -> bool:
    if path is None:
        return False
    text = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
    return Path(text).is_relative_to(root)


def note_failure(s: Session, command: bytes, exc: Exception) -> None:
    """Count an I/O error met while serving `command` for this client's namespace: on its
    index files when the error names one of them, else on its data files (where nearly
    all of the I/O goes)."""
    if not isinstance(exc, OSError):
        return
    ns = s.ns
    on_index = _under(exc.filename, ns.index_root)
    _count_error(s.state, ns.name, on_index, command.upper() in READ_COMMANDS)


def note_flush_failure(state: ServerState, namespaces: Iterable[Namespace]) -> None:
    """Count a failed write-out of buffered writes (data is written out first)."""
    for ns in namespaces:
        _count_error(state, ns.name, False, False)


def _count_error(state: ServerState, name: str, on_index: bool, read: bool) -> None:
    errors = state.io_errors.setdefault(name, IoErrors())
    now = int(time.time())
    disk = state.disk
    if on_index:
        errors.index += 1
        errors.index_last = now
        if read:
            disk.index_read_failed += 1
        else:
            disk.index_write_failed += 1
    else:
        errors.data += 1
        errors.data_last = now
        if read:
            disk.data_read_failed += 1
        else:
            disk.data_write_failed += 1


def count_disk(state: ServerState) -> None:
    """Add the growth of every namespace's files since they were last counted to the bytes
    written. Called by INFO, and before FLUSH, NSDEL and COMPACT replace files."""
    disk = state.disk
    seen = disk.seen
    for name, ns in state.engine.namespaces.items():
        isize, dsize = ns.file_sizes()
        before = seen.get(name)
        if before is None or before[0] is not ns:
            before = (ns, 0, 0)  # created since: all of its files were written
        _, iwas, dwas = before
        # Smaller than before: the files were replaced, and all of them were written.
        disk.index_written += isize - iwas if isize >= iwas else isize
        disk.data_written += dsize - dwas if dsize >= dwas else dsize
        seen[name] = (ns, isize, dsize)


def storage_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io): page-cache
    misses of the mapped data and index files; 0 where the kernel does not report it."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _bytes_and_mb(name: str, value: int) -> list[str]:
    return [f"{name}_bytes: {value}", f"{name}_mb: {value / MB:.2f}"]


def info_text(s: Session) -> str:
    """INFO: the reference's fields (same names, types and meanings) plus native_build,
    clients_connected and namespaces."""
    state = s.state
    now = int(time.time())
    count_disk(state)
    disk = state.disk
    lines = [
        "# server",
        "server_name: 0-db (zdb)",
        f"server_revision: zerostack-{__version__}",
        f"engine_revision: zerostack-{__version__}",
        f"instance_id: {state.instance_id}",
        f"boot_time: {state.boot_time}",
        f"uptime: {now - state.boot_time}",
        f"native_build: {'yes' if native.compiled() else 'no'}",
        "",
        "# clients",
        f"clients_lifetime: {state.clients_lifetime}",
        f"clients_connected: {len(state.sessions)}",
        "",
        "# internals",
        "sequential_key_size: 8",
        f"data_version: {DATA_VERSION}",
        f"index_version: {INDEX_VERSION}",
        f"namespaces: {len(state.engine.namespaces)}",
        "",
        "# stats",
        f"commands_executed: {state.commands_executed}",
        f"commands_failed: {state.commands_failed}",
        f"commands_unauthorized: {state.commands_unauthorized}",
        f"index_disk_read_failed: {disk.index_read_failed}",
        f"index_disk_write_failed: {disk.index_write_failed}",
        f"data_disk_read_failed: {disk.data_read_failed}",
        f"data_disk_write_failed: {disk.data_write_failed}",
        *_bytes_and_mb("index_disk_read", disk.index_loaded),
        *_bytes_and_mb("index_disk_write", disk.index_written),
        *_bytes_and_mb("data_disk_read", storage_read_bytes()),
        *_bytes_and_mb("data_disk_write", disk.data_written),
        *_bytes_and_mb("network_rx", state.network_rx),
        *_bytes_and_mb("network_tx", state.network_tx),
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
