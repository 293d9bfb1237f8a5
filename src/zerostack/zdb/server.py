"""The Zero-DB network server: asyncio protocol over TCP and unix sockets, wiring RESP parsing,
the command table and the storage engine together.

Replies to everything one read brought in are written with a single transport.write, and
all replies of one event-loop pass go out after a single engine.flush_all(). A client's
requests are executed only while its unsent replies stay under `output_pause`, so a client
that never reads cannot make the server build replies without bound.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import CLOCK_BOOTTIME, clock_gettime
from typing import Any, Final, cast

from zerostack.zdb import native
from zerostack.zdb.commands import (
    HANDLERS,
    INTERNAL_ERROR,
    MISSING_ARGUMENTS,
    NOT_SUPPORTED,
    READ_ONLY_HANDLERS,
    Handler,
    ServerState,
    Session,
    deferred,
    lookup,
)
from zerostack.zdb.commands.read import GET_RUN, cmd_get, reply_get, reply_get_run
from zerostack.zdb.commands.rules import MAX_KEY_LENGTH, refusal
from zerostack.zdb.commands.system import note_failure, note_flush_failure
from zerostack.zdb.commands.write import cmd_set
from zerostack.zdb.engine import Engine, EngineConfig, ZdbError
from zerostack.zdb.protocol import ProtocolViolation, RequestParser, error
from zerostack.zdb.replication import ReplicationConfig, ReplicationRole

log: Final = logging.getLogger("zerostack.zdb")

TIMEOUT: Final = error("Timeout")
NAMESPACE_GONE: Final = error("Your active namespace is not available anymore (probably removed).")
NOT_CONFIRMED: Final = error("Write stored on the primary but not confirmed by enough replicas")
WRITE_NAMES: Final = frozenset({b"SET", b"SETX", b"DEL"})
# Commands whose reply can come later (a job or WAIT): with --min-replicas they run only
# after the writes before them were confirmed, so no reply overtakes a write's.
LATER_NAMES: Final = frozenset({b"WAIT", b"REPLWAIT", b"PROMOTE", b"COMPACT"})
# Bytes one read of a client's socket takes at most between two large arguments received
# straight into their buffers (see ArgumentReceiver): the CRLF of one and the next
# request's header, with little of the next value: its bytes read here are copied twice
# more on their way to its own buffer.
READ_BUFFER: Final = 4 * 1024


def log_event(event: str, level: int = logging.INFO, **fields: object) -> None:
    """One structured line: `event=... key=value ...`. Callers never pass secrets."""
    if not log.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    log.log(level, " ".join(parts))


def setup_logging(level: int = logging.INFO) -> None:
    """key=value lines on stderr, with a UTC timestamp and the level."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("ts=%(asctime)s level=%(levelname)s %(message)s",
                                  datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@dataclass
class ServerConfig:
    """How to listen and what to serve; `engine` says where and how data is stored."""

    engine: EngineConfig
    listen: str = "0.0.0.0"
    port: int = 9900
    socket_path: Path | None = None  # when set, listen on this unix socket instead of TCP
    admin_password: str | None = field(default=None, repr=False)
    protect: bool = False
    replica_of: tuple[str, int] | None = None  # follow this primary (read-only until promoted)
    primary_auth: str | None = field(default=None, repr=False)
    min_replicas: int = 0          # acknowledge writes once this many replicas hold them
    min_replicas_timeout: float = 10.0
    # Replication password, replica set (--peers), advertised address, majority.
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    # Stop executing a client's requests while more reply bytes than this wait to be sent
    # to it; resume as its socket drains.
    output_pause: int = 1024 * 1024
    # Disconnect a client once more reply bytes than this wait for it (0: never). Only a
    # single reply larger than output_pause can get there (a GET of a large value); MGET
    # refuses to build a reply past it.
    output_limit: int = 64 * 1024 * 1024


class Connection(asyncio.Protocol):
    """One client: parse what arrives, run each request, answer the whole batch at once.

    While a large argument is unfinished, an ArgumentReceiver stands in for the
    connection as the transport's protocol, so the argument's bytes are received straight
    into its buffer.
    """

    def __init__(self, server: ZdbServer) -> None:
        self.server = server
        self.state = server.state
        self.parser = RequestParser(keep_values=True)
        # Receives large arguments (made on the first one); `direct` while it is the
        # transport's protocol.
        self.receiver: ArgumentReceiver | None = None
        self.direct = False
        self.session = Session(server.state)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        # WAIT in progress: requests that arrived after it wait here, in order.
        self.waiting = False
        self.wait_timer: asyncio.TimerHandle | None = None
        self.pending: list[list[bytes]] = []
        self.pending_violation: str | None = None
        self.closing = False
        # Output backpressure: `unsent` reply bytes sit in the server's outbox; `draining`
        # while requests wait in `pending` for the socket to take the replies already made.
        self.unsent = 0
        self.draining = False
        self.write_paused = False
        self.output_pause = server.config.output_pause
        # Shared with the server, read on every request: held here to save lookups.
        self.busy = server.role.busy
        self.durable = server.role.primary.min_replicas

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # The transport pauses us (pause_writing) exactly when its buffer passes the bound.
        self.transport.set_write_buffer_limits(high=self.output_pause)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The reference's lack of TCP_NODELAY is what stalls its pipelined replies.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = transport.get_extra_info("peername")
            self.peer = f"{peer[0]}:{peer[1]}" if peer else "-"
        else:
            self.peer = "unix"
        self.state.sessions.add(self.session)
        self.state.clients_lifetime += 1
        self.server.connections.add(self)
        log_event("zdb.client.connect", logging.DEBUG, peer=self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.sessions.discard(self.session)
        self.server.connections.discard(self)
        self._cancel_wait()
        self.pending = []
        self.server.draining.discard(self)
        deferred.take(self.session)
        if self.server.role.primary.followers:
            self.server.role.primary.detach(self.session)
        log_event("zdb.client.disconnect", logging.DEBUG, peer=self.peer)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests until it does.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.draining:
            self.drain()
        elif self.transport is not None and not self.waiting and not self.closing:
            self.transport.resume_reading()

    def drain(self) -> None:
        """Go on with the requests held while replies were waiting to be sent."""
        if not self.draining or self.write_paused or self.waiting:
            return  # (a reply still waits: wake() goes on, then the next pass drains)
        self.draining = False
        self.server.draining.discard(self)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        requests, self.pending = self.pending, []
        violation, self.pending_violation = self.pending_violation, None
        if requests or violation:
            self.process(requests, violation)
        if not self.draining and not self.waiting and not self.closing:
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.state.network_rx += len(data)
        try:
            requests = self.parser.feed(data)
        except ProtocolViolation as exc:
            self._received(exc.requests, exc.message)
            return
        if self.parser.receiving() != self.direct:
            self._receive_directly(not self.direct)
        if len(requests) == 1 and not self.waiting and not self.draining and not len(self.busy) \
                and not self.durable:
            # One request per read, the common case without pipelining: served here,
            # without process()'s batch bookkeeping. Anything unusual goes there.
            request = requests[0]
            session = self.session
            transport = self.transport
            if request and not session.removed and transport is not None:
                server = self.server
                role = server.role
                if role.write_deadline and clock_gettime(CLOCK_BOOTTIME) >= role.write_deadline:
                    role.lease_check()  # --failover-etcd: the lease may end, stop writing
                name = request[0]
                # The two commands that carry the load are called directly.
                handler: Handler | None = None
                if name == b"GET" or name == b"get":
                    direct = 1
                elif server.writes_here and (name == b"SET" or name == b"set"):
                    direct = 2
                else:
                    direct = 0
                    handler = server.handlers.get(name)
                if direct or handler is not None:
                    try:
                        if direct == 1:
                            reply: bytes | None = cmd_get(session, request)
                        elif direct == 2:
                            reply = cmd_set(session, request)
                        else:
                            assert handler is not None
                            reply = handler(session, request)
                    except ZdbError as exc:
                        reply = refusal(exc)
                    except Exception as exc:  # a bug or an I/O failure must not kill it
                        reply = self._internal_error(request, exc)
                    if server.waiters:
                        server.notify_waiters(self, name)
                    self.state.commands_executed += 1
                    if reply is None:
                        self._later(requests, 0, None)
                    else:
                        server.send(self, reply)
                    return
        self._received(requests, None)

    def _receive_directly(self, on: bool) -> None:
        """Have the transport read into the unfinished large argument's buffer (on), or
        hand reads to data_received() again."""
        transport = self.transport
        if transport is None:
            return
        receiver = self.receiver
        if receiver is None:
            receiver = self.receiver = ArgumentReceiver(self)
        self.direct = on
        # (a transport that is reading starts again with the new protocol's callbacks)
        transport.set_protocol(receiver if on else self)

    def _received(self, requests: list[list[bytes]], violation: str | None) -> None:
        if self.waiting or self.draining:
            self.pending.extend(requests)
            if violation is not None:
                self.pending_violation = violation
            return
        self.process(requests, violation)

    # -- request processing ------------------------------------------------------------

    def process(self, requests: list[list[bytes]], violation: str | None) -> None:
        transport = self.transport
        if transport is None:
            return
        session = self.session
        if session.removed:
            self._close_with(NAMESPACE_GONE)
            return
        # Every reply of the batch is appended to one buffer, handed to the transport in
        # one write; GET, the bulk of pipelined loads, writes its reply straight into it.
        out = bytearray()
        server = self.server
        role = server.role
        if role.write_deadline and clock_gettime(CLOCK_BOOTTIME) >= role.write_deadline:
            role.lease_check()  # --failover-etcd: the lease may end, stop writing
        handlers = server.handlers
        waiters = server.waiters
        busy = self.busy
        durable = self.durable
        writes_here = server.writes_here
        # With --min-replicas: where each write's reply starts and ends in `out`, and the
        # namespaces written.
        writes: list[int] = []
        written: set[str] = set()
        failed = 0
        # Reply bytes this connection already owed before this batch: queued for the end
        # of this event-loop pass, and buffered by the transport.
        owed = self.unsent + transport.get_write_buffer_size()
        pause = self.output_pause
        executed = 0
        count = len(requests)
        index = -1
        while index + 1 < count:
            index += 1
            request = requests[index]
            if owed + len(out) > pause:
                # Replies are made only as fast as the client takes them: hold the rest.
                self._throttle(requests[index:], violation)
                violation = None
                break
            if not request:
                executed += 1
                out += MISSING_ARGUMENTS
                continue
            if busy and session.ns.name in busy:
                # Compaction has this namespace's files: hold the rest until it is done.
                self._hold(session.ns.name, requests[index:], violation)
                violation = None
                break
            name = request[0]
            if name == b"GET" or name == b"get":
                # A run of GETs (the usual pipeline) is served together, see reply_get_run.
                keys: list[bytes] = []
                at = index
                while at < count and len(keys) < GET_RUN:
                    nxt = requests[at]
                    if len(nxt) != 2 or not (nxt[0] == b"GET" or nxt[0] == b"get") \
                            or not 0 < len(nxt[1]) <= MAX_KEY_LENGTH:
                        break
                    keys.append(nxt[1])
                    at += 1
                if len(keys) > 1:
                    try:
                        done = reply_get_run(session, keys, out, pause - owed - len(out))
                    except Exception:
                        done = 0  # served one at a time below, each with its own error
                    if done:
                        executed += done
                        index += done - 1
                        if waiters:
                            for _ in range(done):
                                server.notify_waiters(self, name)
                        continue
                executed += 1
                try:
                    reply_get(session, request, out)
                except Exception as exc:  # a bug or an I/O failure must not kill it
                    out += self._internal_error(request, exc)
                if waiters:
                    server.notify_waiters(self, name)
                continue
            if writes and name.upper() in LATER_NAMES:
                # Its reply would come later, and the writes' replies wait for replicas:
                # it runs once they are answered.
                self.pending = requests[index:]
                break
            executed += 1
            handler: Handler
            if writes_here and (name == b"SET" or name == b"set"):
                handler = cmd_set
            else:
                found = handlers.get(name)
                if found is None:
                    found = lookup(name, handlers)
                    if found is None:
                        out += NOT_SUPPORTED
                        failed += 1
                        continue
                handler = found
            try:
                reply = handler(session, request)
            except ZdbError as exc:
                reply = refusal(exc)
            except Exception as exc:  # a bug or an I/O failure must not kill the connection
                reply = self._internal_error(request, exc)
            if waiters:
                server.notify_waiters(self, name)
            if reply is None:  # WAIT: answer later, keep the rest in order behind it
                self._later(requests, index, violation)
                violation = None
                break
            if durable and reply[:1] != b"-" and name.upper() in WRITE_NAMES:
                writes.append(len(out))
                out += reply
                writes.append(len(out))
                written.add(session.ns.name)
            else:
                out += reply
        state = self.state
        state.commands_executed += executed - failed
        state.commands_failed += failed
        if writes and not self.waiting:
            self._confirm(out, writes, written, violation)
            return
        if out:
            server.send(self, out)
        if violation is not None:
            log_event("zdb.client.protocol_error", logging.INFO, peer=self.peer, reply=violation)
            self._close_with(error(violation))

    def _throttle(self, requests: list[list[bytes]], violation: str | None) -> None:
        """Hold `requests` until the replies already made have been taken by the client."""
        self.pending = requests
        self.pending_violation = violation
        self.draining = True
        assert self.transport is not None
        self.transport.pause_reading()
        # The end of this pass hands the replies to the transport: if it takes them all
        # without pausing us, drain() carries on from there; otherwise resume_writing() does.
        self.server.draining.add(self)
        self.server.kick()

    def _internal_error(self, request: list[bytes], exc: Exception) -> bytes:
        note_failure(self.session, request[0], exc)
        log_event("zdb.command.failed", logging.ERROR,
                  command=request[0][:32].decode("ascii", "replace"),
                  error=type(exc).__name__, detail=str(exc)[:200])
        return INTERNAL_ERROR

    def _later(self, requests: list[list[bytes]], index: int, violation: str | None) -> None:
        """requests[index] answers later (WAIT or a job): keep the rest in order behind it."""
        self.pending = requests[index + 1 :]
        self.pending_violation = violation
        job = deferred.take(self.session)
        if job is not None:
            self._start_job(job)
        else:
            self._start_wait()

    def _close_with(self, reply: bytes) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.pause_reading()
            self.server.send(self, reply)
            self.server.send(self, None)

    # -- replies that wait: jobs (REPLWAIT, PROMOTE, COMPACT), compaction, --min-replicas --

    def _pause(self) -> None:
        self.waiting = True
        assert self.transport is not None
        self.transport.pause_reading()

    def _start_job(self, job: deferred.Job) -> None:
        self._pause()

        def done(task: asyncio.Task[bytes]) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                log_event("zdb.command.failed", logging.ERROR, error=type(exc).__name__,
                          detail=str(exc)[:200])
            self.wake(INTERNAL_ERROR if exc is not None else task.result())

        task: asyncio.Task[bytes] = asyncio.ensure_future(job())
        task.add_done_callback(done)

    def _hold(self, name: str, requests: list[list[bytes]], violation: str | None) -> None:
        self.pending = requests
        self.pending_violation = violation
        self._pause()
        self.server.held.setdefault(name, []).append(self)

    def _confirm(self, out: bytearray, writes: list[int], written: set[str],
                 violation: str | None) -> None:
        """--min-replicas: answer this batch once enough replicas hold its writes.

        The batch joins the group of this event-loop pass (group commit, see
        replication/primary.py): no task or timer of its own."""
        primary = self.server.role.primary
        self.pending_violation = violation
        self._pause()

        def confirmed(ok: bool) -> None:
            if ok:
                self.wake(out)
                return
            # Each write's reply (writes: its start and end in `out`) becomes the refusal.
            parts: list[bytes] = []
            at = 0
            for i in range(0, len(writes), 2):
                parts.append(bytes(out[at:writes[i]]))
                parts.append(NOT_CONFIRMED)
                at = writes[i + 1]
            parts.append(bytes(out[at:]))
            self.wake(b"".join(parts))

        primary.hold(confirmed, written)
        self.server.kick()  # flush, seal the group and ship at the end of this pass

    # -- WAIT --------------------------------------------------------------------------

    def _start_wait(self) -> None:
        self.waiting = True
        assert self.transport is not None
        self.transport.pause_reading()
        self.server.waiters.setdefault(self.session.ns.name, set()).add(self)
        loop = asyncio.get_running_loop()
        self.wait_timer = loop.call_later(self.session.wait_timeout_ms / 1000, self.wake, TIMEOUT)

    def _cancel_wait(self) -> None:
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        group = self.server.waiters.get(self.session.ns.name)
        if group is not None:
            group.discard(self)
            if not group:
                del self.server.waiters[self.session.ns.name]

    def wake(self, reply: bytes | bytearray | None) -> None:
        """End a WAIT with `reply` (None: nothing to send), then serve what arrived meanwhile."""
        if not self.waiting:
            return
        self._cancel_wait()
        self.waiting = False
        self.session.wait_for = None
        if self.transport is None or self.transport.is_closing():
            return
        if reply:
            self.server.send(self, reply)
        requests, self.pending = self.pending, []
        violation, self.pending_violation = self.pending_violation, None
        if requests or violation:
            self.process(requests, violation)
        if not self.waiting and not self.closing and not self.draining:
            self.transport.resume_reading()


class ArgumentReceiver(asyncio.BufferedProtocol):
    """The transport's protocol while a connection's large argument arrives: the socket is
    read straight into the part of the argument's buffer still to fill, and the reads
    between two such arguments into the server's shared read buffer, passed on to the
    connection. A stream of large values thus never passes through another buffer; the
    connection takes the transport back after a read that leaves no argument unfinished.
    Every other protocol callback goes to the connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.read_buffer = conn.server.read_buffer
        self.into_argument = False  # the last get_buffer() gave out the argument's buffer

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self.conn.parser.buffer()
        if view is None:
            # (right after a large argument: the transport reads on at once while the
            # socket has data, into the next one's buffer once its header is parsed)
            self.into_argument = False
            return self.read_buffer
        self.into_argument = True
        return view

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if not self.into_argument:
            # (copied out at once: the read buffer serves every connection)
            conn.data_received(bytes(self.read_buffer[:nbytes]))
            return
        if conn.closing:
            return
        conn.state.network_rx += nbytes
        conn.parser.filled(nbytes)

    def eof_received(self) -> bool | None:
        return self.conn.eof_received()

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)


class ZdbServer:
    """Owns the engine and the listeners; `start()` then `serve_until_stopped()`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # Replies leave only after engine.flush_all(): under --sync one fsync there covers
        # every write of the pass (group commit) and each is still durable before its reply.
        self.engine = Engine(replace(config.engine, group_commit=True))
        self.state = ServerState(
            engine=self.engine, admin_password=config.admin_password, protect=config.protect,
        )
        self.state.on_stop = self.request_stop
        self.state.reply_limit = config.output_limit
        self.state.on_namespace_removed = self._namespace_removed
        self.connections: set[Connection] = set()
        self.role = ReplicationRole(
            self.engine, config.replica_of, config.primary_auth, config.min_replicas,
            config.min_replicas_timeout, name=f"{socket.gethostname()}:{config.port}",
            options=config.replication)
        self.role.register(self.state)
        self.role.on_role_change = self._role_changed
        self.role.primary.ship_due = self.kick
        self.role.connection_of = self._connection_of
        self.role.on_namespace_free = self._namespace_free
        self.role.on_namespace_removed = self._namespace_removed
        # A replica, or a primary fenced by a newer term, refuses client writes.
        self.handlers: dict[bytes, Handler] = (
            HANDLERS if self.role.accepts_writes else READ_ONLY_HANDLERS)
        self.writes_here = self.role.accepts_writes
        # namespace name -> connections held while compaction rewrites its files
        self.held: dict[str, list[Connection]] = {}
        # namespace name -> connections blocked in WAIT on it
        self.waiters: dict[str, set[Connection]] = {}
        self._servers: list[asyncio.AbstractServer] = []
        # Reads between large arguments land here (see ArgumentReceiver) and are copied out
        # before the next read: get_buffer / buffer_updated run back to back, one
        # connection at a time.
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        # Replies waiting for the engine flush at the end of this event-loop pass (None: close).
        self._outbox: list[tuple[Connection, bytes | bytearray | None]] = []
        # Connections holding requests until their replies are sent (see Connection.drain).
        self.draining: set[Connection] = set()
        self._outbox_scheduled = False
        self._stopped: asyncio.Event | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        cfg = self.config
        if cfg.socket_path is not None:
            path = cfg.socket_path
            if path.is_socket():
                path.unlink()  # left over by a crashed run: nothing can be listening on it
            srv = await loop.create_unix_server(lambda: Connection(self), str(path))
            self._servers.append(srv)
            log_event("zdb.listen", socket=path)
        else:
            srv = await loop.create_server(lambda: Connection(self), cfg.listen, cfg.port,
                                           reuse_address=True, backlog=1024)
            self._servers.append(srv)
            # uvloop's `sockets` is a list where typeshed says tuple: the compiled module
            # would check the declared type, so read it untyped.
            listener: Any = srv
            self.port = listener.sockets[0].getsockname()[1]
            log_event("zdb.listen", addr=cfg.listen, port=self.port)
        if cfg.engine.synctime > 0:
            self._sync_task = asyncio.create_task(self._sync_loop(cfg.engine.synctime))
        self.role.start()
        if cfg.replica_of is not None:
            log_event("zdb.replication.replica", primary=f"{cfg.replica_of[0]}:{cfg.replica_of[1]}")
        log_event("zdb.ready", namespaces=len(self.engine.namespaces), mode=cfg.engine.mode.value,
                  sync="always" if cfg.engine.sync else (
                      f"{cfg.engine.synctime}s" if cfg.engine.synctime else "os"),
                  admin="yes" if cfg.admin_password else "no", protect=cfg.protect,
                  native="yes" if native.compiled() else "no")

    def send(self, conn: Connection, payload: bytes | bytearray | None) -> None:
        """Queue a reply (None: close the connection) behind one engine flush.

        Replies of every connection served in this event-loop pass go out after a single
        engine.flush_all(): acknowledged writes have reached the OS, no reply shows data
        that has not, and many clients writing at once cost one flush instead of one each
        (group commit). Replies to reads wait for the end of the pass too: written as each
        request is served, they wake a client per reply instead of once per pass, which
        measured 1.7x more CPU per GET on the pure-Python build.
        """
        self._outbox.append((conn, payload))
        if payload is not None:
            conn.unsent += len(payload)
        if not self._outbox_scheduled:
            self._outbox_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_outbox)

    def kick(self) -> None:
        """Flush the engine (and ship to replicas) at the end of this event-loop pass."""
        if not self._outbox_scheduled:
            self._outbox_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_outbox)

    def _send_outbox(self) -> None:
        self._outbox_scheduled = False
        primary = self.role.primary
        # With writes waiting for replicas, a replica that confirmed its batch gets the
        # next one now (primary.notify ships only to those), even if nothing new was written.
        ship = bool(primary.followers) and (bool(self.engine._dirty) or self.engine.config.sync
                                            or primary.durable)
        try:
            self.engine.flush_all()
            # --min-replicas: the writes held in this pass wait for the positions now.
            primary.seal()
        except OSError as exc:
            # Nothing buffered may be acknowledged: drop the connections waiting on it.
            log_event("zdb.flush.failed", logging.ERROR, error=str(exc))
            note_flush_failure(self.state, self.engine._dirty)
            for conn, _ in self._outbox:
                conn.unsent = 0
                if conn.transport is not None:
                    conn.transport.abort()
            self._outbox = []
            return
        box, self._outbox = self._outbox, []
        limit = self.config.output_limit
        sent = 0
        for conn, payload in box:
            conn.unsent = 0
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            if payload is None:
                transport.close()
                continue
            transport.write(payload)
            sent += len(payload)
            if limit and transport.get_write_buffer_size() > limit \
                    and not any(f.session is conn.session for f in primary.followers):
                # (a replica's stream is paced by the primary itself, see replication/primary)
                self._over_limit(conn, transport, limit)
        self.state.network_tx += sent
        if self.draining:
            loop = asyncio.get_running_loop()
            for conn in self.draining:
                if not conn.write_paused:
                    loop.call_soon(conn.drain)
        if ship:
            primary.notify()

    def _over_limit(self, conn: Connection, transport: asyncio.Transport, limit: int) -> None:
        """Drop a client whose unsent replies passed --client-output-limit."""
        log_event("zdb.client.output_limit", logging.WARNING, peer=conn.peer,
                  unsent=transport.get_write_buffer_size(), limit=limit,
                  reason="unsent replies passed the client output limit")
        conn.closing = True
        conn.pending = []
        transport.abort()  # drops the buffered replies at once

    async def _sync_loop(self, synctime: int) -> None:
        period = min(1.0, float(synctime))
        while True:
            await asyncio.sleep(period)
            try:
                self.engine.flush_all()
                self.engine.sync_if_due()
            except OSError as exc:
                log_event("zdb.sync.failed", logging.ERROR, error=str(exc))

    def request_stop(self) -> None:
        """End serving soon (after the current replies are written)."""
        if self._stopped is not None:
            asyncio.get_running_loop().call_soon(self._stopped.set)

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for srv in self._servers:
            await srv.wait_closed()
        if self._sync_task is not None:
            self._sync_task.cancel()
        await self.role.stop()
        self.role.unregister(self.state)
        self.engine.close()
        if self.config.socket_path is not None:
            try:
                self.config.socket_path.unlink()
            except OSError:
                pass
        log_event("zdb.stopped")

    def notify_waiters(self, source: Connection, command: bytes) -> None:
        """Answer the clients WAITing for `command` in the namespace `source` works in."""
        group = self.waiters.get(source.session.ns.name)
        if not group:
            return
        name = command.upper()
        loop = asyncio.get_running_loop()
        for conn in list(group):
            if conn is source:
                continue
            wanted = conn.session.wait_for
            if wanted == b"*" or wanted == name:
                group.discard(conn)
                # Woken outside this client's loop so replies keep their order per connection.
                loop.call_soon(conn.wake, b"+" + name + b"\r\n")

    def _namespace_removed(self, name: str) -> None:
        for conn in self.connections:
            if conn.session.ns.name == name:
                conn.session.removed = True

    def _namespace_free(self, name: str) -> None:
        for conn in self.held.pop(name, []):
            conn.wake(None)

    def _role_changed(self) -> None:
        self.handlers = HANDLERS if self.role.accepts_writes else READ_ONLY_HANDLERS
        self.writes_here = self.role.accepts_writes
        log_event("zdb.role", role="replica" if self.role.is_replica else
                  "fenced" if self.role.fenced else "primary")

    def _connection_of(self, session: object) -> tuple[asyncio.Transport, str] | None:
        for conn in self.connections:
            if conn.session is session and conn.transport is not None:
                return conn.transport, conn.peer
        return None


async def run(config: ServerConfig) -> None:
    """Serve until STOP, SIGINT or SIGTERM, then close files cleanly."""
    import signal

    server = ZdbServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, server.request_stop)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await server.serve_until_stopped()
    finally:
        await server.close()


# glibc's mallopt() parameters, and what the server sets them to (see keep_large_buffers).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 16 * 1024 * 1024
TRIM_THRESHOLD: Final = 32 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Have glibc's allocator reuse freed buffers of up to 16 MiB rather than map and unmap
    each one. By default it maps every block above a threshold that it raises only to the
    size last freed, so each 1 MiB value (and each read of it from the socket) got fresh
    zeroed pages from the kernel: page faults and page clearing were 15% of the server's
    CPU on a stream of 1 MiB SETs. Freed memory at the top of the heap above 32 MiB still
    goes back to the OS. False (nothing changed) where the C library has no mallopt."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def run_forever(config: ServerConfig) -> None:
    """Run the server on uvloop when it is installed, else on the default asyncio loop."""
    keep_large_buffers()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(config))
        return
    uvloop.run(run(config))
