"""Replica side of Zero-DB replication: connect to the primary, check where the local files
stop agreeing with it, then apply the shipped settings and data entries as they come.

A replica restarted or cut off resumes from its own files' end position (per namespace); if
its files went further than the primary's (an old primary re-joining), the diverging tail is
cut back to the last entry both hold, and the logs say so.

A namespace the primary rewrote (compaction) is copied again next to the old files, which
stay in place until the copy reaches the end the rewritten files had; then the copy is
swapped in. Meanwhile the replica confirms nothing of that namespace and counts in votes
with its old files, of the namespace's previous generation (see terms.py): a failover in
that window promotes a node whose old files hold every write a majority confirmed before
the rewrite, or one that holds the new files complete.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import hiredis

from zerostack.zdb.engine import Engine, Mode, Namespace, ZdbError
from zerostack.zdb.engine.raw import (
    START,
    Position,
    adopt_layout,
    apply_entries,
    apply_settings,
    drop_copy,
    install_copy,
    last_entries,
    start_copy,
    truncate_to,
)
from zerostack.zdb.protocol import encode_request
from zerostack.zdb.replication import frames
from zerostack.zdb.replication.handshake import ClientHandshake, Unproven, address_text, escape
from zerostack.zdb.replication.terms import Terms

log = logging.getLogger("zerostack.zdb")

READ_SIZE = 1 << 20
SILENCE = 15.0           # seconds without a frame before the link counts as dead
RETRY_MIN, RETRY_MAX = 0.2, 2.0
STOP_WAIT = 5.0          # seconds a stopped link gets to end before the next one starts
PROBE = 4096             # newest local entries compared with the primary when they diverge
PROBE_BATCH = 256


class ReplicationError(Exception):
    """The replication link cannot go on (refused by the primary, diverged files...)."""


class PrimaryUnproven(ReplicationError):
    """The server this replica was pointed at did not prove it knows the password."""


@dataclass(eq=False)
class Copy:
    """A rewritten namespace being copied next to the old files (see the module doc)."""

    ns: Namespace
    end: Position        # where the rewritten files ended: complete once copied up to it
    primary: tuple[str, int, int]  # host, port and term of the primary that rewrote it
    generation: int      # the namespace's generation once the copy is swapped in


class Replica:
    """Follows a primary; runs as a task of the replica server's event loop."""

    def __init__(self, engine: Engine, host: str, port: int, password: str | None,
                 name: str, terms: Terms | None = None) -> None:
        self.engine = engine
        self.terms = terms if terms is not None else Terms(engine.config.index_dir)
        self.link_term = 0  # the term of the primary this link follows
        self.host = host
        self.port = port
        self.password = password
        self.name = name
        self.state = "connecting"
        self.error = ""
        self.lag_bytes = -1          # as last reported by the primary (-1: not yet)
        self.lag_seconds = -1.0
        self.last_contact = 0.0
        self.applied_bytes = 0
        self.truncations = 0
        self._task: asyncio.Task[None] | None = None
        self._gen = 0  # bumped whenever the running link must end
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()
        self._silent = False
        self._watchdog: asyncio.TimerHandle | None = None
        # Namespaces rewritten by the primary, copied aside until complete.
        self.copies: dict[str, Copy] = {}
        # Set by the server: sessions still using a namespace the primary deleted.
        self.on_namespace_removed: Callable[[str], None] = lambda name: None

    def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self.state = "connecting"
        self._task = asyncio.get_running_loop().create_task(self._run(self._gen))

    def retarget(self, host: str, port: int) -> None:
        """Follow another primary from now on: the current link ends, a new one starts
        once it has (never two at once)."""
        self.host, self.port = host, port
        old = self._end_link()
        self.state = "connecting"
        self._task = asyncio.get_running_loop().create_task(self._run(self._gen, after=old))

    def _end_link(self) -> asyncio.Task[None] | None:
        """Make the running link task end: a new generation, its connection closed (a
        cancellation alone can be lost while a read completes), and cancelled."""
        self._gen += 1
        if self._writer is not None:
            self._writer.close()
        old, self._task = self._task, None
        if old is not None:
            old.cancel()
        return old

    async def stop(self) -> None:
        task = self._end_link()
        if task is not None:
            await asyncio.wait([task], timeout=STOP_WAIT)
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()  # the follower already died: stopping still works
                log.error("event=zdb.replication.follower.failed error=%s detail=\"%s\"",
                          type(exc).__name__, str(exc)[:200].replace('"', "'"))
        self._close()
        self.state = "stopped"

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _run(self, gen: int, after: asyncio.Task[None] | None = None) -> None:
        if after is not None:  # the previous link closes its connection first
            await asyncio.wait([after], timeout=STOP_WAIT)
        delay = RETRY_MIN
        while gen == self._gen:
            started = time.monotonic()
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except PrimaryUnproven as exc:
                said = escape(str(exc), 400)
                level = logging.INFO if said == self.error else logging.WARNING  # news only
                self.error = said
                log.log(level, "event=zdb.replication.primary.unproven primary=%s:%d "
                        "reason=\"%s\"", escape(self.host, 80), self.port, self.error)
            except (OSError, EOFError, TimeoutError, ReplicationError, ZdbError,
                    hiredis.ProtocolError) as exc:
                self.error = escape(str(exc) or type(exc).__name__, 400)  # may quote the server
                level = logging.WARNING if self.state != "connecting" else logging.INFO
                log.log(level, "event=zdb.replication.link.down primary=%s:%d state=%s "
                        "error=\"%s\"", escape(self.host, 80), self.port, self.state,
                        self.error)
            except Exception as exc:
                # An unexpected failure (a bug, a frame cut in an unforeseen place) must not
                # end following for good: log it with its type and reconnect like any drop.
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("event=zdb.replication.link.failed primary=%s:%d state=%s",
                              self.host, self.port, self.state)
            finally:
                if gen == self._gen:
                    self._close()
                    if self.state != "stopped":
                        self.state = "connecting"
            if time.monotonic() - started > 5:
                delay = RETRY_MIN
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    # -- a RESP client just big enough for the handshake ---------------------------------

    async def _read_reply(self) -> object:
        assert self._reader is not None
        while True:
            reply = self._parser.gets()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    hint = ""
                    if ("Permission denied" in str(reply) or "Access denied" in str(reply)) \
                            and "is not at" not in str(reply):
                        hint = " (give the primary's admin password with --primary-auth)"
                    raise ReplicationError(f"primary refused: {reply}{hint}")
                return reply
            data = await asyncio.wait_for(self._reader.read(READ_SIZE), SILENCE)
            if not data:
                raise EOFError("primary closed the connection")
            self._parser.feed(data)

    async def _call(self, *args: bytes | str | int) -> object:
        assert self._writer is not None
        self._writer.write(encode_request(*args))
        return await self._read_reply()

    # -- the link ------------------------------------------------------------------------

    async def _follow(self) -> None:
        self.state = "connecting"
        self._parser = hiredis.Reader()
        if not self.password:
            raise PrimaryUnproven("no password to authenticate the primary with (give "
                                  "--replication-password or --primary-auth): not following")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), SILENCE)
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self._authenticate(sock)
        info = await self._call(b"REPLINFO", self.terms.term)
        if not isinstance(info, list) or len(info) < 3:
            raise ReplicationError(f"unexpected REPLINFO reply {info!r:.200}")
        datasize, mode = int(info[0]), Mode(bytes(info[1]).decode())
        term = int(info[2])
        if term < self.terms.term:
            raise ReplicationError(f"the primary's term {term} is older than this node's "
                                   f"term {self.terms.term}: it was replaced; not following it")
        self.link_term = term
        self.terms.see(term)
        adopt_layout(self.engine, datasize, mode)
        self.state = "checking"
        positions: dict[str, Position] = {}
        for name in list(self.engine.namespaces):
            positions[name] = await self._agree(name)
        self.terms.follow(term)  # our files are a prefix of this primary's log now
        self.state = "syncing"
        args: list[bytes | str | int] = [b"REPLSYNC", self.name, term]
        for name, (fid, off) in positions.items():
            args += [name.encode("utf-8", "surrogateescape"), fid, off]
        writer.write(encode_request(*args))
        log.info("event=zdb.replication.link.up primary=%s:%d namespaces=%d",
                 self.host, self.port, len(positions))
        self.error = ""
        await self._stream()

    async def _authenticate(self, sock: socket.socket | None) -> None:
        """The REPLAUTH handshake: the primary proves it knows the password before this
        replica proves it does; the password itself is never sent."""
        if sock is None or not self.password:
            raise PrimaryUnproven("no socket address or password to authenticate with")
        handshake = ClientHandshake(self.password, address_text(sock.getpeername()))
        assert self._writer is not None
        self._writer.write(encode_request(*handshake.challenge()))
        try:
            reply = await self._read_reply()
        except ReplicationError as exc:
            raise PrimaryUnproven(f"{self.host}:{self.port} refused the challenge: "
                                  f"{exc}") from exc
        try:
            proof = handshake.answer(reply)
        except Unproven as exc:
            raise PrimaryUnproven(f"{exc}: not following it") from exc
        if await self._call(*proof) != b"OK":
            raise ReplicationError("unexpected REPLAUTH PROOF reply")

    async def _agree(self, name: str) -> Position:
        """The position up to which namespace `name` holds the same entries as the primary;
        the local tail past it is cut."""
        copy = self.copies.get(name)
        if copy is not None:
            here = copy.ns.position()
            newest = last_entries(copy.ns, 1)
            if not newest:
                if copy.primary == (self.host, self.port, self.link_term):
                    return here  # nothing copied yet from the same primary: start it
            else:
                heads = await self._heads(name, [newest[0][0]])
                if heads is not None and heads[0] == newest[0][1]:
                    copy.primary = (self.host, self.port, self.link_term)
                    return here  # the primary's log goes on from the copy: go on copying
            self.drop_copy(name)  # this primary's log is another one: compare the old files
        ns = self.engine.namespace(name)
        here = ns.position()
        if here == START:
            return here
        newest = last_entries(ns, 1)
        if not newest:
            common = START
        else:
            heads = await self._heads(name, [newest[0][0]])
            if heads is None:
                return here  # the primary has no such namespace: it will say DROP
            if heads[0] == newest[0][1]:
                common = newest[0][2]
            else:
                common = await self._search(name, last_entries(ns, PROBE))
        if common != here:
            dropped = truncate_to(self.engine, name, common)
            if dropped:  # not only an empty file started before a crash
                self.truncations += 1
            log.log(logging.WARNING if dropped else logging.INFO,
                    "event=zdb.replication.diverged namespace=%s local_end=%d:%d "
                    "common=%d:%d entries_dropped=%d", name, here[0], here[1],
                    common[0], common[1], dropped)
        return self.engine.namespace(name).position()

    async def _search(self, name: str, entries: list[tuple[Position, bytes, Position]]
                      ) -> Position:
        for i in range(0, len(entries), PROBE_BATCH):
            batch = entries[i:i + PROBE_BATCH]
            heads = await self._heads(name, [pos for pos, _h, _e in batch])
            if heads is None:
                return START
            for (_pos, head, end), theirs in zip(batch, heads, strict=True):
                if theirs == head:
                    return end
        return START  # nothing in common near the end: copy the namespace again

    async def _heads(self, name: str, where: list[Position]) -> list[bytes | None] | None:
        args: list[bytes | str | int] = [b"REPLHEAD", name.encode("utf-8", "surrogateescape")]
        for fid, off in where:
            args += [fid, off]
        try:
            reply = await self._call(*args)
        except ReplicationError as exc:
            if "Namespace not found" in str(exc):
                return None
            raise
        if not isinstance(reply, list) or len(reply) != len(where):
            raise ReplicationError(f"unexpected REPLHEAD reply for {name}")
        return [None if r is None else bytes(r) for r in reply]

    async def _stream(self) -> None:
        assert self._reader is not None and self._writer is not None
        self.state = "online"
        gen = self._gen
        # One timer watches for silence (not one per read: reads are the hot path).
        self._silent = False
        self.last_contact = time.time()
        self._watchdog = asyncio.get_running_loop().call_later(SILENCE, self._watch,
                                                               self._writer)
        try:
            await self._receive(gen)
        finally:
            self._watchdog.cancel()

    def _watch(self, writer: asyncio.StreamWriter) -> None:
        quiet = time.time() - self.last_contact
        if quiet < SILENCE:
            self._watchdog = asyncio.get_running_loop().call_later(SILENCE - quiet,
                                                                   self._watch, writer)
            return
        self._silent = True
        writer.close()  # the pending read ends

    async def _receive(self, gen: int) -> None:
        assert self._reader is not None and self._writer is not None
        parser = self._parser
        while True:
            data = await self._reader.read(READ_SIZE)
            if self._silent:
                raise TimeoutError(f"nothing from the primary for {SILENCE:.0f} s")
            if gen != self._gen:
                raise ReplicationError("this replica follows another primary now")
            if not data:
                raise EOFError("primary closed the connection")
            self.last_contact = time.time()
            parser.feed(data)
            changed: set[str] = set()
            while True:
                message = parser.gets()
                if message is False:
                    break
                if isinstance(message, hiredis.ReplyError):
                    raise ReplicationError(f"primary refused: {message}")
                if self.terms.term != self.link_term:
                    break  # answered below: nothing more is applied for an older term
                if isinstance(message, bytes):  # a status line: nothing to apply
                    continue
                self._apply(message, changed)
            if self.terms.term != self.link_term:
                # We voted in a newer term: confirm nothing more for this primary; tell it.
                self._writer.write(encode_request(b"REPLACK", self.terms.term))
                raise ReplicationError(f"this node has seen term {self.terms.term}, newer than "
                                       f"the primary's term {self.link_term}")
            if changed:
                self.engine.flush_all()
                args: list[bytes | str | int] = [b"REPLACK", self.link_term]
                for name in changed:
                    if name in self.copies:
                        continue  # holds none of the rewritten namespace yet
                    ns = self.engine.namespaces.get(name)
                    fid, off = ns.position() if ns is not None else START
                    args += [name.encode("utf-8", "surrogateescape"),
                             self.terms.generation(name)[0], fid, off]
                self._writer.write(encode_request(*args))

    def _apply(self, message: list[bytes], changed: set[str]) -> None:
        kind = message[0]
        name = message[1].decode("utf-8", "surrogateescape") if len(message) > 1 else ""
        engine = self.engine
        if kind == frames.DATA:
            copy = self.copies.get(name)
            ns = engine.namespace(name) if copy is None else copy.ns
            pos = (int(message[2]), int(message[3]))
            apply_entries(ns, pos, message[4])
            self.applied_bytes += len(message[4])
            changed.add(name)
            if copy is not None:
                ns.write_out()  # (a copy is not the engine's: nothing else writes it out)
                if ns.position() >= copy.end:
                    self._install(name, copy)
        elif kind == frames.NS:
            found = engine.namespaces.get(name)
            if found is None:
                found = engine.create_namespace(name)
                log.info("event=zdb.replication.namespace.create namespace=%s", name)
            mode, password = message[2].decode(), message[3].decode("utf-8", "surrogateescape")
            apply_settings(found, mode, password, int(message[4]), message[5] == b"1",
                           message[6] == b"1", message[7] == b"1", message[8] == b"1")
            if len(message) >= 12:
                # The generation of the primary's files: ours (or the copy being made)
                # are a prefix of them since the link started.
                generation, base = int(message[9]), (int(message[10]), int(message[11]))
                copy = self.copies.get(name)
                if copy is not None:
                    copy.generation = generation
                else:
                    self.terms.set_generation(name, generation, base)
            changed.add(name)
        elif kind == frames.JUMP:
            copy = self.copies.get(name)
            ns = engine.namespace(name) if copy is None else copy.ns
            while ns.position()[0] < int(message[2]):
                ns.jump()
            changed.add(name)
            if copy is not None and ns.position() >= copy.end:
                self._install(name, copy)
        elif kind == frames.DROP:
            self.drop_copy(name)
            if name in engine.namespaces:
                engine.delete_namespace(name)
                self.on_namespace_removed(name)
                log.info("event=zdb.replication.namespace.delete namespace=%s", name)
        elif kind == frames.RESET:
            self.drop_copy(name)
            end = (int(message[2]), int(message[3])) if len(message) >= 4 else START
            generation = int(message[4]) if len(message) >= 5 else \
                self.terms.generation(name)[0] + 1
            found = engine.namespaces.get(name)
            if found is not None and end > START and found.position() > START:
                # Keep the old files until the rewritten namespace is copied completely:
                # until then they (of the previous generation) are this node's log.
                self.copies[name] = Copy(start_copy(engine, name), end,
                                         (self.host, self.port, self.link_term), generation)
                log.info("event=zdb.replication.namespace.recopy namespace=%s end=%d:%d",
                         name, end[0], end[1])
            elif found is not None:
                found.flush()  # flushed (or rewritten empty): nothing to keep
                # (holds nothing of the new generation until it reaches `end`)
                self.terms.set_generation(name, generation, end)
                log.info("event=zdb.replication.namespace.reset namespace=%s", name)
            changed.add(name)
        elif kind == frames.LAG:
            self.lag_bytes = int(message[1])
            self.lag_seconds = int(message[2]) / 1000
            changed.update(engine.namespaces)  # answer with every position: a heartbeat
        else:
            raise ReplicationError(f"unknown replication frame {kind!r}")

    def _install(self, name: str, copy: Copy) -> None:
        del self.copies[name]
        install_copy(self.engine, name, copy.ns)
        # (before anything of the new generation is confirmed; a crash between the two
        # leaves new files counted in votes with the old generation: see the docs)
        self.terms.set_generation(name, copy.generation, copy.end)
        fid, off = self.engine.namespace(name).position()
        log.info("event=zdb.replication.namespace.recopied namespace=%s position=%d:%d",
                 name, fid, off)

    def drop_copy(self, name: str) -> None:
        copy = self.copies.pop(name, None)
        if copy is not None:
            drop_copy(self.engine, name, copy.ns)
            log.info("event=zdb.replication.namespace.recopy_dropped namespace=%s", name)

    def drop_copies(self) -> None:
        """Keep the old files of every namespace being copied again (this node is
        promoted, or stops)."""
        for name in list(self.copies):
            self.drop_copy(name)

    # -- INFO ----------------------------------------------------------------------------

    def info_lines(self) -> list[str]:
        age = time.time() - self.last_contact if self.last_contact else -1.0
        lines = [f"primary: {self.host}:{self.port}",
                 f"link: {self.state}",
                 f"last_contact_age: {age:.3f}",
                 f"lag_bytes: {self.lag_bytes}",
                 f"lag_seconds: {self.lag_seconds:.3f}",
                 f"applied_bytes: {self.applied_bytes}",
                 f"truncations: {self.truncations}"]
        if self.error:
            lines.append(f"link_error: {self.error}")
        for name, ns in self.engine.namespaces.items():
            fid, off = ns.position()
            lines.append(f"position_{name}: {fid}:{off}")
        for name, copy in self.copies.items():
            (fid, off), (efid, eoff) = copy.ns.position(), copy.end
            lines.append(f"recopy_{name}: {fid}:{off} of {efid}:{eoff}")
        return lines
