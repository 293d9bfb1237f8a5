"""Primary side of Zero-DB replication: ship every namespace's settings and data log to the
connected replicas, track the positions they acknowledge, and answer durability waits.

Shipping reads the primary's own data files from each replica's position (log shipping), so
a replica that was away resumes where it stopped, and nothing is kept in memory per write.

With --min-replicas, replies wait by group commit: the batches of writes of one event-loop
pass form one group (sealed after the engine flush, with the positions reached then), the
data is shipped at once, and a replica's confirmation releases every group it covers, in
order. One timer (for the oldest group) answers the groups nobody confirmed in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from zerostack.zdb.engine import Engine, Namespace
from zerostack.zdb.engine.raw import START, Position, distance, read_entries, settings
from zerostack.zdb.replication import frames
from zerostack.zdb.replication.terms import Terms

log = logging.getLogger("zerostack.zdb")

FRAME_LIMIT = 1 << 20        # data bytes per DATA frame
PUMP_BUDGET = 8 << 20        # data bytes shipped to one replica per pass
HIGH_WATER = 16 << 20        # stop shipping while this much waits in the socket buffer
TICK = 0.1                   # seconds between passes without writes (catch-up, lag)
LAG_EVERY = 10               # ticks between LAG reports to replicas
SAMPLES = 3000               # position samples (one per tick) to measure lag in seconds
SHIP_DELAY = 0.004           # gather this long before shipping, unless a write waits on it
SEQ_WINDOW = 2048            # sequential keys a primary may hand out past what enough
                             # replicas confirmed (see role.SEQ_GAP, which must be larger)
SEQ_SAMPLES = 20000          # (position, next key) samples kept per sequential namespace

Positions = dict[str, Position]
Confirmed = dict[str, tuple[int, Position]]
"""What a replica confirms: per namespace, the generation of its files and its position."""


@dataclass(eq=False)
class Follower:
    """One connected replica: where it was shipped to and what it acknowledged."""

    name: str
    peer: str
    transport: asyncio.Transport
    session: object
    sent: Positions
    acked: Positions
    connected_at: float = field(default_factory=time.time)
    last_ack: float = field(default_factory=time.time)
    shipped: dict[str, tuple[object, ...]] = field(default_factory=dict)
    ns_ids: dict[str, int] = field(default_factory=dict)
    lag_bytes: int = 0
    lag_seconds: float = 0.0
    ignored_acks: int = 0
    # Data was shipped and this replica has not answered since: with writes waiting for
    # replicas, what is written meanwhile goes in the next send, once it answers.
    in_flight: bool = False


@dataclass(eq=False)
class _Group:
    """Batches of writes flushed in one event-loop pass, released together."""

    target: list[tuple[str, Namespace, Position]]  # where each written namespace stood
    deadline: float                                # loop time: answer "not confirmed"
    callbacks: list[Callable[[bool], None]]


@dataclass(eq=False)
class _Waiter:
    target: Positions
    count: int
    future: asyncio.Future[int]


class Primary:
    """Replication state of a server that accepts writes."""

    def __init__(self, engine: Engine, busy: set[str], min_replicas: int = 0,
                 min_replicas_timeout: float = 10.0) -> None:
        self.engine = engine
        self.busy = busy  # namespaces being compacted: their files are not readable now
        self.min_replicas = min_replicas
        self.min_replicas_timeout = min_replicas_timeout
        self.followers: list[Follower] = []
        self._waiters: list[_Waiter] = []
        # --min-replicas: batches held in this pass (not sealed yet), and the sealed
        # groups in the order they were flushed; one timer for the oldest one.
        self._open: list[Callable[[bool], None]] = []
        self._open_names: set[str] = set()
        self._groups: deque[_Group] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._samples: deque[tuple[float, Positions]] = deque(maxlen=SAMPLES)
        self._ticker: asyncio.Task[None] | None = None
        self._ship_timer: asyncio.TimerHandle | None = None
        self.term = 0  # set by the role: the term this primary ships in
        # Set by the role: where each namespace's generation is kept (see terms.py);
        # without it (tests of this class alone) generations are counted in memory.
        self.terms: Terms | None = None
        self._generations: dict[str, tuple[int, Position]] = {}
        # Replicas that must have confirmed a sequential key before this primary hands out
        # keys more than SEQ_WINDOW past it (0: no limit; set by the role from --peers).
        self.seq_k = 0
        self._seq_samples: dict[str, deque[tuple[Position, int]]] = {}
        self.fenced = False
        # Set by the role: a replica told us about a newer term (term, who said so).
        self.on_higher_term: Callable[[int, str], None] = lambda term, source: None
        # Set by the server: flush, seal and call notify() at the end of this pass.
        self.ship_due: Callable[[], None] = self._ship_soon

    # -- replicas ------------------------------------------------------------------------

    def attach(self, session: object, transport: asyncio.Transport, peer: str, name: str,
               positions: Positions) -> Follower:
        """Start shipping to a replica that holds `positions` (checked by it beforehand)."""
        self.detach(session)
        f = Follower(name=name, peer=peer, transport=transport, session=session,
                     sent=dict(positions), acked=dict(positions))
        for ns_name in positions:
            ns = self.engine.namespaces.get(ns_name)
            if ns is not None:
                f.ns_ids[ns_name] = id(ns)
        self.followers.append(f)
        log.info("event=zdb.replication.replica.attach replica=%s peer=%s namespaces=%d",
                 name, peer, len(positions))
        self.start()
        asyncio.get_running_loop().call_soon(self.pump, f)
        return f

    def fence(self) -> None:
        """A newer term exists: confirm nothing more, answer waiting writes now (they were
        not confirmed) and drop every replica (they go and find the new primary)."""
        self.fenced = True
        for w in self._waiters:
            if not w.future.done():
                w.future.set_result(0)
        self._fail_all()
        self.detach_all()

    def detach_all(self) -> None:
        for f in list(self.followers):
            self.drop(f, "this server is no longer the primary")

    def drop(self, f: Follower, reason: str) -> None:
        """Disconnect one replica (its error or lie affects nobody else)."""
        if f in self.followers:
            self.followers.remove(f)
        log.warning("event=zdb.replication.replica.dropped replica=%s peer=%s reason=\"%s\"",
                    f.name, f.peer, reason.replace('"', "'")[:300])
        if not f.transport.is_closing():
            f.transport.write(b"-" + reason.replace("\r", " ").replace("\n", " ").encode()
                              + b"\r\n")
            f.transport.close()

    def detach(self, session: object) -> None:
        for f in [f for f in self.followers if f.session is session]:
            self.followers.remove(f)
            log.info("event=zdb.replication.replica.detach replica=%s peer=%s", f.name, f.peer)

    def is_follower(self, session: object) -> bool:
        return any(f.session is session for f in self.followers)

    def generation(self, name: str) -> tuple[int, Position]:
        """(generation, end of the rewrite) of namespace `name` (see terms.py)."""
        if self.terms is not None:
            return self.terms.generation(name)
        return self._generations.get(name, (0, START))

    def _rewritten(self, name: str, end: Position) -> int:
        """Namespace `name` was flushed or compacted and now ends at `end`: its next
        generation starts (recorded before any replica hears of it)."""
        generation = self.generation(name)[0] + 1
        if self.terms is not None:
            self.terms.set_generation(name, generation, end)
        else:
            self._generations[name] = (generation, end)
        return generation

    def deleted(self, name: str) -> None:
        """Namespace `name` was deleted: one created later under that name is another log,
        a new generation from its start (older files of that name count for less)."""
        self._rewritten(name, START)

    def ack(self, session: object, term: int, positions: Confirmed) -> None:
        """A replica wrote these positions out: wake the writes waiting for it.

        Only positions this primary shipped to that replica, in the namespace's current
        generation, count; an acknowledgement in another term disconnects the replica (a
        newer term also fences this primary)."""
        for f in list(self.followers):
            if f.session is not session:
                continue
            if term != self.term:
                if term > self.term:
                    self.on_higher_term(term, f"replica {f.name}")
                self.drop(f, f"acknowledged in term {term}, this primary's term is {self.term}")
                return
            for name, (generation, pos) in positions.items():
                # Beyond what was shipped (a lie, or an acknowledgement crossing a DROP on
                # the way), or of the files before a flush or compaction (sent before the
                # replica read the RESET: its position in the old files may well lie
                # inside what was shipped of the new ones): not counted.
                if name in f.sent and pos <= f.sent[name] and \
                        generation == self.generation(name)[0]:
                    f.acked[name] = pos
                else:
                    f.ignored_acks += 1
            f.last_ack = time.time()
            if f.in_flight:
                # It answered what it read: what was written meanwhile is the next batch,
                # shipped at the end of this event-loop pass with the writes made in it.
                f.in_flight = False
                if self.durable:
                    self.ship_due()
        if self.fenced:
            return
        if self._groups:
            self._release()
        if self._waiters:
            for w in list(self._waiters):
                if not w.future.done():
                    n = self.count_acked(w.target)
                    if n >= w.count:
                        w.future.set_result(n)

    def seq_refusal(self, ns: Namespace) -> str | None:
        """Why sequential namespace `ns` may not hand out its next key now (None: it may).

        A key is handed out only while it is less than SEQ_WINDOW past the newest key that
        `seq_k` replicas confirmed: whichever replica a majority promotes holds at least
        that much, and skips SEQ_GAP > SEQ_WINDOW keys, so no key is handed out twice."""
        if self.seq_k <= 0:
            return None
        samples = self._seq_samples.get(ns.name)
        if samples is None:
            samples = self._seq_samples[ns.name] = deque(maxlen=SEQ_SAMPLES)
        pos, nxt = ns.position(), ns.next_internal_id()
        if not samples or samples[-1][0] != pos:
            samples.append((pos, nxt))
        confirmed: list[int] = []
        for f in self.followers:
            acked = f.acked.get(ns.name)
            if acked is None:
                continue
            best = 0
            for p, n in reversed(samples):
                if p <= acked:
                    best = n
                    break
            confirmed.append(best)
        confirmed.sort(reverse=True)
        floor = confirmed[self.seq_k - 1] if len(confirmed) >= self.seq_k else 0
        if nxt < floor + SEQ_WINDOW:
            return None
        return (f"Sequential namespace {ns.name} is {nxt - floor} keys ahead of what "
                f"{self.seq_k} replica(s) confirmed (at most {SEQ_WINDOW}); retry when they "
                "catch up")

    def reset(self, name: str) -> None:
        """Namespace `name` was flushed or rewritten (compaction): replicas start it over."""
        self._seq_samples.pop(name, None)
        ns = self.engine.namespaces.get(name)
        end = ns.position() if ns is not None else START
        generation = self._rewritten(name, end)
        if ns is not None:
            # Writes held before the rewrite are in the new files: a replica holds them
            # once it copied the namespace again up to where it ends now.
            for g in self._groups:
                g.target = [(n, o, end if n == name else p) for n, o, p in g.target]
        for f in self.followers:
            f.sent[name] = START
            f.acked[name] = START
            f.shipped.pop(name, None)
            if not f.transport.is_closing():
                f.transport.write(frames.frame(frames.RESET, name, end[0], end[1], generation))
        self._ship_now()

    # -- shipping ------------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """Someone waits for replicas to confirm: ship at once (see notify)."""
        return bool(self.min_replicas or self._waiters)

    def notify(self) -> None:
        """New entries may be there (called after the engine flushed a batch).

        Under load many small batches are gathered into one send per SHIP_DELAY: fewer,
        larger socket writes cost the primary less. Writes someone waits for go at once
        to every replica that confirmed everything shipped to it; to the others as soon
        as they confirm (group commit: one batch in flight per replica, and whatever is
        written meanwhile joins the next one)."""
        if self.durable:
            if self._ship_timer is not None:
                self._ship_timer.cancel()
                self._ship_timer = None
            for f in list(self.followers):
                if not f.in_flight:
                    self.pump(f)
        elif self._ship_timer is None:
            self._ship_timer = asyncio.get_running_loop().call_later(SHIP_DELAY, self._ship_now)

    def _ship_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self.notify)

    def _ship_now(self) -> None:
        if self._ship_timer is not None:
            self._ship_timer.cancel()
            self._ship_timer = None
        for f in list(self.followers):
            self.pump(f)

    def pump(self, f: Follower) -> None:
        """Ship what `f` has not got yet; a failure drops that replica only."""
        if f not in self.followers:
            return
        try:
            self._pump(f)
        except Exception as exc:
            self.drop(f, f"shipping failed: {type(exc).__name__}: {exc}")

    def _pump(self, f: Follower) -> None:
        t = f.transport
        if t.is_closing() or t.get_write_buffer_size() > HIGH_WATER:
            return
        namespaces = self.engine.namespaces
        out: list[bytes] = []
        for name in [n for n in f.sent if n not in namespaces]:
            out.append(frames.frame(frames.DROP, name))
            self._forget(f, name)
        budget = PUMP_BUDGET
        for name, ns in namespaces.items():
            if name in self.busy:
                continue
            if f.ns_ids.get(name) != id(ns):
                if name in f.ns_ids:  # deleted and created again since the last pass
                    out.append(frames.frame(frames.DROP, name))
                    self._forget(f, name)
                f.ns_ids[name] = id(ns)
            generation, (bfid, boff) = self.generation(name)
            current = (*settings(ns), generation, bfid, boff)
            if f.shipped.get(name) != current:
                out.append(frames.frame(frames.NS, name, *_settings_args(current)))
                f.shipped[name] = current
            if budget > 0:
                budget = self._ship(f, name, ns, out, budget)
        if out:
            t.writelines(out)
        if budget <= 0 and t.get_write_buffer_size() <= HIGH_WATER:
            # More to copy (a replica catching up): go on after other clients were served.
            asyncio.get_running_loop().call_soon(self.pump, f)

    def _ship(self, f: Follower, name: str, ns: Namespace, out: list[bytes], budget: int) -> int:
        pos = f.sent.get(name, START)
        end = ns.position()
        bname = name.encode("utf-8", "surrogateescape")
        while pos < end and budget > 0:
            chunk = read_entries(ns, pos, FRAME_LIMIT)
            if not chunk:
                if pos[0] >= end[0]:
                    break
                pos = (pos[0] + 1, START[1])
                out.append(frames.frame(frames.JUMP, bname, pos[0]))
                continue
            out.extend(frames.data_frame(bname, pos[0], pos[1], chunk))
            pos = (pos[0], pos[1] + len(chunk))
            budget -= len(chunk)
        if pos != f.sent.get(name):
            f.in_flight = True
        f.sent[name] = pos
        return budget

    @staticmethod
    def _forget(f: Follower, name: str) -> None:
        for d in (f.sent, f.acked, f.shipped, f.ns_ids):
            d.pop(name, None)

    # -- background: catch-up passes, lag ------------------------------------------------

    def start(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ship_timer is not None:
            self._ship_timer.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        for w in self._waiters:
            if not w.future.done():
                w.future.cancel()

    async def _tick(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(TICK)
            if not self.followers:
                self._samples.clear()
                continue
            try:
                self._samples.append((time.time(), self.snapshot()))
                self._ship_now()
                n += 1
                if n % LAG_EVERY == 0:
                    self._report_lag()
            except Exception as exc:  # keep the ticker alive; the next pass retries
                log.error("event=zdb.replication.tick.failed error=%s detail=%s",
                          type(exc).__name__, str(exc)[:200])

    def _report_lag(self) -> None:
        for f in self.followers:
            self.measure(f)
            if not f.transport.is_closing():
                f.transport.write(frames.frame(frames.LAG, f.lag_bytes,
                                               int(f.lag_seconds * 1000)))

    def measure(self, f: Follower) -> None:
        """Refresh f.lag_bytes (data not yet acknowledged) and f.lag_seconds (age of the
        newest primary state the replica has fully acknowledged, 0 when caught up)."""
        total = 0
        for name, ns in self.engine.namespaces.items():
            if name not in self.busy:
                total += distance(ns, f.acked.get(name, START), ns.position())
        f.lag_bytes = total
        if total == 0:
            f.lag_seconds = 0.0
            return
        now = time.time()
        for at, positions in reversed(self._samples):
            if self._covers(f.acked, positions):
                f.lag_seconds = max(0.0, now - at)
                return
        # Behind everything remembered (5 minutes): the oldest sample's age is a lower bound.
        f.lag_seconds = now - self._samples[0][0] if self._samples else 0.0

    # -- durability: group commit for --min-replicas --------------------------------------

    def hold(self, callback: Callable[[bool], None], names: set[str]) -> None:
        """A batch of writes to namespaces `names` was made in this pass: call
        `callback(True)` once min_replicas replicas hold it, `callback(False)` when they
        did not within min_replicas_timeout seconds (or this primary was fenced). The
        server calls seal() after its engine flush, which ships the data."""
        self._open.append(callback)
        self._open_names |= names

    def seal(self) -> None:
        """The engine flushed: the batches held in this pass form one group, confirmed
        when replicas hold the positions their namespaces reached now."""
        if not self._open:
            return
        callbacks, self._open = self._open, []
        names, self._open_names = self._open_names, set()
        if self.fenced:
            for cb in callbacks:
                cb(False)
            return
        namespaces = self.engine.namespaces
        target = [(n, ns, ns.position()) for n in names if (ns := namespaces.get(n)) is not None]
        loop = asyncio.get_running_loop()
        group = _Group(target, loop.time() + self.min_replicas_timeout, callbacks)
        if not self._groups and self._held_by(group) >= self.min_replicas:
            for cb in callbacks:
                cb(True)
            return
        self._groups.append(group)
        if self._expiry is None:
            self._expiry = loop.call_at(group.deadline, self._expire)

    def _held_by(self, group: _Group) -> int:
        """How many replicas hold every write of `group` (a namespace deleted or created
        anew since then no longer holds those writes anywhere: it counts as held)."""
        namespaces = self.engine.namespaces
        live = [(n, p) for n, ns, p in group.target if namespaces.get(n) is ns]
        count = 0
        for f in self.followers:
            acked = f.acked
            for n, p in live:
                if acked.get(n, START) < p:
                    break
            else:
                count += 1
        return count

    def _release(self) -> None:
        """Answer the groups, oldest first, that enough replicas hold now. Groups are
        sealed in flush order, so a group that is not held yet stops the walk: the ones
        after it reach further."""
        groups, need = self._groups, self.min_replicas
        while groups and self._held_by(groups[0]) >= need:
            for cb in groups.popleft().callbacks:
                cb(True)

    def _expire(self) -> None:
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        groups = self._groups
        while groups and groups[0].deadline <= now:
            group = groups.popleft()
            ok = not self.fenced and self._held_by(group) >= self.min_replicas
            for cb in group.callbacks:
                cb(ok)
        self._release()  # groups held behind the expired ones
        if groups:
            self._expiry = loop.call_at(groups[0].deadline, self._expire)

    def _fail_all(self) -> None:
        groups, self._groups = list(self._groups), deque()
        callbacks, self._open = self._open, []
        self._open_names = set()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for group in groups:
            callbacks += group.callbacks
        if callbacks:
            # Answered once the caller (fencing) is done: the server has switched to
            # refusing writes by then, so what these clients sent next is refused.
            asyncio.get_running_loop().call_soon(_answer_all, callbacks, False)

    # -- durability ----------------------------------------------------------------------

    def snapshot(self) -> Positions:
        """Every namespace's end position right now."""
        return {name: ns.position() for name, ns in self.engine.namespaces.items()
                if name not in self.busy}

    @staticmethod
    def _covers(acked: Positions, target: Positions) -> bool:
        return all(acked.get(name, START) >= pos for name, pos in target.items())

    def count_acked(self, target: Positions) -> int:
        if self.fenced:
            return 0
        return sum(1 for f in self.followers if self._covers(f.acked, target))

    async def wait_acked(self, count: int, timeout: float, target: Positions | None = None) -> int:
        """Wait until `count` replicas acknowledged `target` (default: everything written so
        far) or `timeout` seconds passed; returns how many did."""
        if target is None:
            target = self.snapshot()
        done = self.count_acked(target)
        if done >= count or timeout <= 0:
            return done
        w = _Waiter(target, count, asyncio.get_running_loop().create_future())
        self._waiters.append(w)
        try:
            return await asyncio.wait_for(asyncio.shield(w.future), timeout)
        except TimeoutError:
            return self.count_acked(target)
        finally:
            self._waiters.remove(w)

    # -- INFO ----------------------------------------------------------------------------

    def info_lines(self) -> list[str]:
        lines = [f"connected_replicas: {len(self.followers)}",
                 f"min_replicas: {self.min_replicas}"]
        for i, f in enumerate(self.followers):
            self.measure(f)
            acked = ",".join(f"{n}@{p[0]}:{p[1]}" for n, p in sorted(f.acked.items()))
            lines.append(f"replica{i}: name={f.name} peer={f.peer} lag_bytes={f.lag_bytes} "
                         f"lag_seconds={f.lag_seconds:.3f} "
                         f"last_ack_age={time.time() - f.last_ack:.3f} acked={acked}")
        return lines


def _answer_all(callbacks: list[Callable[[bool], None]], ok: bool) -> None:
    for cb in callbacks:
        cb(ok)


def _settings_args(current: tuple[object, ...]) -> list[bytes | str | int]:
    mode, password, maxsize, public, worm, locked, frozen, generation, bfid, boff = current
    return [str(mode), str(password), int(maxsize),  # type: ignore[call-overload]
            int(bool(public)), int(bool(worm)), int(bool(locked)), int(bool(frozen)),
            int(generation), int(bfid), int(boff)]  # type: ignore[call-overload]
