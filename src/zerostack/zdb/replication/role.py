"""A server's replication role: a primary that ships to replicas, or a replica following a
primary until it is promoted; its term (see terms.py), fencing and promotion by vote.

The command handlers reach it through `role_of(state)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from zerostack.zdb.engine import Engine, Mode
from zerostack.zdb.engine.format import FLAG_DELETED, SEQ_KEY
from zerostack.zdb.engine.raw import START, Position
from zerostack.zdb.replication import peers as peer_calls
from zerostack.zdb.replication.failover import EtcdFailover, FailoverConfig, clock
from zerostack.zdb.replication.handshake import ServerChallenge, address_text, escape, key_of
from zerostack.zdb.replication.primary import Primary
from zerostack.zdb.replication.replica import Replica
from zerostack.zdb.replication.terms import MAX_TERM, Terms

log = logging.getLogger("zerostack.zdb")

_ROLES: dict[int, ReplicationRole] = {}

SEQ_GAP = 4096
"""Sequential keys a new primary skips past the most advanced position it knows of."""
NOTHING: tuple[int, Position] = (0, START)
"""A namespace's log as counted in votes when the node holds nothing of it for certain."""
ANNOUNCE_EVERY = 1.0
"""Seconds between a primary's announcements of its term to peers that do not follow it."""


@dataclass
class ReplicationConfig:
    """Replication settings of a server beyond --replica-of and --min-replicas."""

    # Password replicas (and promoting peers) authenticate with, besides --admin.
    password: str | None = field(default=None, repr=False)
    # The other nodes of the replica set (HOST, PORT): votes and term announcements.
    peers: list[tuple[str, int]] = field(default_factory=list)
    # How the other nodes reach this one (HOST:PORT); also this node's replica name.
    advertise: str = ""
    # --min-replicas majority: computed from the replica set's size.
    majority: bool = False
    # --failover-etcd: automatic failover on an etcd lease (see failover.py).
    failover: FailoverConfig | None = None


class ReplicationRole:
    """Owns the Primary (always there: a promoted replica serves replicas too), the Replica
    task while this server follows a primary, and the term state."""

    def __init__(self, engine: Engine, replica_of: tuple[str, int] | None = None,
                 primary_auth: str | None = None, min_replicas: int = 0,
                 min_replicas_timeout: float = 10.0, name: str = "",
                 options: ReplicationConfig | None = None) -> None:
        self.engine = engine
        self.options = options or ReplicationConfig()
        self.name = self.options.advertise or name
        self.auth = primary_auth or self.options.password
        self.terms = Terms(engine.config.index_dir)
        if self.options.majority:
            min_replicas = (len(self.options.peers) + 1) // 2
        self.busy: set[str] = set()
        self.primary = Primary(engine, self.busy, min_replicas, min_replicas_timeout)
        self.replica: Replica | None = None
        self.fenced = ""  # why this server refuses writes although it is not a replica
        self.replaced = ""  # set when a fenced primary turned into a replica: why
        self.repl_sessions: set[object] = set()
        # REPLAUTH CHALLENGE answered, waiting for the client's proof (one per session).
        self.challenges: dict[object, ServerChallenge] = {}
        self._auth_logged = 0.0
        self._auth_quiet = 0
        # Lease mode: why this primary takes no writes now (not holding the etcd key, or
        # its lease may be about to end), and until when it may (CLOCK_BOOTTIME; 0: none).
        self.lease_hold = ""
        self.write_deadline = 0.0
        self.failover: EtcdFailover | None = None
        if self.options.failover is not None:
            self.failover = EtcdFailover(self, self.options.failover)
            self.lease_hold = "this node does not hold the etcd key of its replica set yet"
        if replica_of is not None:
            self.replica = self._new_replica(replica_of[0], replica_of[1])
        elif self.terms.fresh:
            self.terms.become_primary(1, {})
        elif not self.terms.is_primary_of_term:
            self.fenced = (f"this server was not the primary of term {self.terms.term} when it "
                           "stopped; restart it with --replica-of the current primary, or "
                           "PROMOTE it")
        self.primary.term = self.terms.term
        self.primary.terms = self.terms
        self.primary.on_higher_term = self.learn_term
        nodes = len(self.options.peers) + 1
        self.primary.seq_k = nodes - 1 - nodes // 2 if self.options.peers else 0
        self.promoted_at = 0.0
        self._promoting = False
        self._announcer: asyncio.Task[None] | None = None
        # Set by the server: switch the command table when the role changes; find the
        # transport and peer address of a client session (for REPLSYNC).
        self.on_role_change: Callable[[], None] = lambda: None
        self.connection_of: Callable[[object], tuple[asyncio.Transport, str] | None] = \
            lambda session: None
        # Set by the server: let clients held while a namespace was compacted go on.
        self.on_namespace_free: Callable[[str], None] = lambda name: None
        # Set by the server: sessions still using a namespace the primary deleted.
        self.on_namespace_removed: Callable[[str], None] = lambda name: None

    def _new_replica(self, host: str, port: int) -> Replica:
        replica = Replica(self.engine, host, port, self.auth, self.name, self.terms)
        replica.on_namespace_removed = lambda name: self.on_namespace_removed(name)
        return replica

    @property
    def is_replica(self) -> bool:
        return self.replica is not None

    @property
    def accepts_writes(self) -> bool:
        return self.replica is None and not self.fenced and not self.lease_hold

    def set_lease_gate(self, deadline: float, hold: str) -> None:
        """Lease mode: accept writes until `deadline` (hold empty), or not (hold: why)."""
        before = self.accepts_writes
        self.write_deadline = deadline if not hold else 0.0
        self.lease_hold = hold
        if self.accepts_writes != before:
            log.warning("event=zdb.failover.writes state=%s reason=\"%s\"",
                        "open" if self.accepts_writes else "held",
                        (hold or "holds the etcd key").replace('"', "'")[:200])
            self.on_role_change()

    def lease_check(self) -> None:
        """Called by the server before a batch of requests once `write_deadline` passed:
        stop taking writes at once."""
        if self.failover is not None and self.write_deadline and clock() >= self.write_deadline:
            self.failover.gate()

    def register(self, state: object) -> None:
        _ROLES[id(state)] = self
        # Derive the keys now rather than in the event loop at the first handshake.
        self.keys(getattr(state, "admin_password", None))
        if self.auth:
            key_of(self.auth)

    def unregister(self, state: object) -> None:
        _ROLES.pop(id(state), None)

    def start(self) -> None:
        if self.replica is not None:
            self.replica.start()
        if self.failover is not None:
            self.failover.start()
        if self.options.peers:
            self._announcer = asyncio.get_running_loop().create_task(self._announce())

    async def stop(self) -> None:
        if self.failover is not None:
            await self.failover.stop()
        if self._announcer is not None:
            self._announcer.cancel()
            try:
                await self._announcer
            except asyncio.CancelledError:
                pass
        if self.replica is not None:
            await self.replica.stop()
            self.replica.drop_copies()
        await self.primary.stop()

    # -- authentication of replication links (handshake.py) -----------------------------

    def keys(self, admin_password: str | None) -> list[bytes]:
        """The keys of the passwords a replication link may prove: the replication
        password and the admin password."""
        return [key_of(p) for p in (self.options.password, admin_password) if p]

    def own_addresses(self, transport: object) -> set[str]:
        """The addresses a client may have dialed to reach this connection: its local
        socket address, and the address this server advertises (for a port forward)."""
        get = getattr(transport, "get_extra_info", None)
        found = {address_text(get("sockname"))} if get is not None else set()
        host, _, port = self.options.advertise.rpartition(":")
        if host and port.isdigit():
            found.add(address_text((host.strip("[]"), int(port))))
        found.discard("")
        return found

    def auth_refused(self, peer: str, why: str) -> None:
        """Log a refused REPLAUTH (at most one line a second, the others counted)."""
        now = time.monotonic()
        if now - self._auth_logged < 1.0:
            self._auth_quiet += 1
            return
        log.warning("event=zdb.replication.auth.refused peer=%s reason=\"%s\" "
                    "suppressed=%d", escape(peer, 80), escape(why), self._auth_quiet)
        self._auth_logged, self._auth_quiet = now, 0

    # -- terms ---------------------------------------------------------------------------

    def learn_term(self, term: int, source: str) -> None:
        """Another node has seen `term`: when it is newer, stop writing at once."""
        if not self.terms.see(term):
            return
        self.primary.term = self.terms.term
        if self.replica is None and not self.fenced:
            self.fence(f"term {term} is newer than this primary's term "
                       f"{self.terms.state.primary_term} (learned from {source}): another "
                       "server was promoted; write to it")

    def fence(self, reason: str) -> None:
        self.fenced = reason
        self.primary.fence()
        log.warning("event=zdb.replication.fenced reason=\"%s\"", reason.replace('"', "'"))
        self.on_role_change()

    def follow(self, host: str, port: int) -> None:
        """Follow the primary at host:port from now on (a vote, or an announcement of a
        newer term): a replica switches over, a fenced primary turns into a replica."""
        if self.replica is not None:
            if (self.replica.host, self.replica.port) == (host, port):
                return
            self.replica.retarget(host, port)
            log.info("event=zdb.replication.follow primary=%s:%d", host, port)
            return
        if not self.fenced:
            return
        self.replica = self._new_replica(host, port)
        self.replaced = (f"this server was replaced as primary in term {self.terms.term}; "
                         f"write to the primary at {host}:{port}")
        self.fenced = ""
        self.primary.detach_all()
        self.on_role_change()
        self.replica.start()
        log.warning("event=zdb.replication.demoted primary=%s:%d term=%d", host, port,
                    self.terms.term)

    def positions(self) -> dict[str, tuple[int, Position]]:
        """Where each namespace's log stands, for votes: the generation of its files (how
        many times the primary rewrote it, see terms.py) and the position in them.

        Files of a generation that stop short of where the rewrite ended (a namespace
        being copied from its start) hold nothing for certain: NOTHING. A namespace whose
        rewrite is being copied aside counts with its old files (their generation and
        position): they stay its log until the copy is complete, and they alone hold what
        this node confirmed before the rewrite."""
        out: dict[str, tuple[int, Position]] = {}
        for name, ns in self.engine.namespaces.items():
            generation, base = self.terms.generation(name)
            pos = ns.position()
            out[name] = (generation, pos) if pos >= base else NOTHING
        return out

    def vote(self, term: int, candidate: str, log_term: int,
             positions: dict[str, tuple[int, Position]]) -> tuple[bool, str]:
        """REPLVOTE: grant `candidate` this node's vote for `term` when its log is at
        least as advanced as ours: its log term, then every namespace's generation and
        position (a later generation holds everything written before its rewrite, so it
        is ahead of any position in an older one; positions of one generation compare as
        they are)."""
        if term < self.terms.term:
            return False, f"term {term} is older than this node's term {self.terms.term}"
        if term == self.terms.term and self.terms.state.voted_for not in ("", candidate):
            return False, f"this node already voted in term {term}"
        if term > self.terms.term:
            self.learn_term(term, f"a vote request from {candidate}")
        mine = self.terms.state.log_term
        if log_term < mine:
            return False, f"the candidate's log is of term {log_term}, this node's of {mine}"
        if log_term == mine:
            for name, held in self.positions().items():
                theirs = positions.get(name, NOTHING)
                if held != NOTHING and theirs < held:
                    return False, (f"the candidate holds less of namespace {name} "
                                   f"(generation {theirs[0]} at {theirs[1]} < generation "
                                   f"{held[0]} at {held[1]})")
        self.terms.state.voted_for = candidate
        self.terms.save()
        host, port = _split(candidate)
        if port:
            self.follow(host, port)
        return True, "granted"

    def announced(self, term: int, leader: str) -> int:
        """REPLLEADER term address: the primary of `term` is at `address`. Returns our term
        (a sender of an older term learns it has been replaced)."""
        if term < self.terms.term:
            return self.terms.term
        self.learn_term(term, f"the primary at {leader}")
        host, port = _split(leader)
        if port and leader != self.name:
            self.follow(host, port)
        return self.terms.term

    async def _announce(self) -> None:
        """While primary of the current term, tell peers that do not follow us about it:
        an old primary learns it was replaced and turns into our replica."""
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY)
            if not self.accepts_writes:
                continue
            following = {f.name for f in self.primary.followers}
            term = self.terms.term
            for host, port in self.options.peers:
                if f"{host}:{port}" in following:
                    continue
                if not self.accepts_writes or self.terms.term != term:
                    break  # replaced meanwhile: announce nothing more
                try:
                    theirs = await peer_calls.announce(host, port, self.auth, term, self.name)
                except (OSError, TimeoutError, EOFError, peer_calls.PeerError):
                    continue
                if theirs > self.terms.term:
                    self.learn_term(theirs, f"peer {host}:{port}")

    # -- promotion -----------------------------------------------------------------------

    async def promote(self, force: bool = False) -> str | None:
        """Become the primary of a new term; None on success, else why not.

        Without `force`, a majority of the replica set (this node and --peers) must vote
        for the new term, each only if this node's log is at least as advanced as its own.
        """
        if self.accepts_writes:
            return "This server is already a primary"
        if self._promoting:
            return "A promotion is already running"
        peers = self.options.peers
        if not force and not peers:
            return ("No replica set is configured (--peers): a safe promotion cannot count "
                    "votes; use PROMOTE FORCE (may lose writes)")
        if self.terms.term >= MAX_TERM:
            return f"The term cannot grow past {MAX_TERM}"
        self._promoting = True
        try:
            term = self.terms.term + 1
            self.terms.see(term)
            self.terms.state.voted_for = self.name
            self.terms.save()
            self.primary.term = term
            replica = self.replica
            if replica is not None:
                await replica.stop()
            votes = 1
            nodes = len(peers) + 1
            need = nodes // 2 + 1
            if not force:
                votes, reasons = await self._ask_votes(term, need)
                if votes < need:
                    if replica is not None:
                        replica.start()
                    return (f"Promotion refused: {votes} of {nodes} nodes agreed to term "
                            f"{term}, {need} needed ({'; '.join(reasons)[:400]})")
            if replica is not None:
                replica.drop_copies()  # its old files are the namespaces' log now
            floors = self._skip_sequential()
            self.terms.become_primary(term, floors)
            self.primary.term = term
            self.primary.fenced = False
            self.replica = None
            self.fenced = self.replaced = ""
            self.promoted_at = time.time()
            self.on_role_change()
            positions = " ".join(f"{n}@{ns.position()[0]}:{ns.position()[1]}"
                                 for n, ns in self.engine.namespaces.items())
            former = f"{replica.host}:{replica.port}" if replica is not None else "-"
            log.warning("event=zdb.replication.promoted term=%d votes=%d/%d force=%s "
                        "former_primary=%s positions=\"%s\"", term, votes, nodes,
                        "yes" if force else "no", former, positions)
            return None
        finally:
            self._promoting = False

    async def _ask_votes(self, term: int, need: int) -> tuple[int, list[str]]:
        """Ask every peer at once; stop waiting as soon as `need` votes (ours included)
        are in, or enough refusals made that impossible."""
        peers = self.options.peers
        mine = self.positions()
        votes, refused, reasons = 1, 0, []

        async def ask(h: str, p: int) -> tuple[str, bool, int, str]:
            try:
                granted, their_term, why = await peer_calls.request_vote(
                    h, p, self.auth, term, self.name, self.terms.state.log_term, mine)
            except (OSError, TimeoutError, EOFError, peer_calls.PeerError) as exc:
                return f"{h}:{p}", False, 0, f"{type(exc).__name__} {exc}".strip()
            return f"{h}:{p}", granted, their_term, why

        pending = {asyncio.ensure_future(ask(h, p)) for h, p in peers}
        try:
            while pending and votes < need and len(peers) + 1 - refused >= need:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    who, granted, their_term, why = task.result()
                    if granted:
                        votes += 1
                    else:
                        refused += 1
                        reasons.append(f"{who}: {why}")
                        if their_term > term:
                            self.terms.see(their_term)
        finally:
            for task in pending:
                task.cancel()
        return votes, reasons

    def _skip_sequential(self) -> dict[str, int]:
        """Move every sequential namespace past any key the old primary may have handed
        out: SEQ_GAP slots beyond the newest one here, filled with deleted entries."""
        floors: dict[str, int] = {}
        for name, ns in self.engine.namespaces.items():
            if ns.mode is not Mode.SEQ:
                continue
            start = ns.next_internal_id()
            floor = start + SEQ_GAP
            stamp = int(time.time())
            while ns.next_internal_id() < floor:
                key = SEQ_KEY.pack(ns.next_internal_id())
                ns.replay_raw(key, 0, stamp, b"")
                ns.replay_raw(key, FLAG_DELETED, stamp, b"")
            floors[name] = floor
            log.info("event=zdb.replication.seq_skip namespace=%s from=%d to=%d", name, start,
                     floor)
        self.engine.flush_all()
        return floors

    def info_text(self) -> str:
        role = "replica" if self.replica else "primary"
        lines = ["# replication", f"role: {role}", f"term: {self.terms.term}",
                 f"log_term: {self.terms.state.log_term}"]
        if self.fenced:
            lines.append(f"fenced: {self.fenced}")
        if self.lease_hold and self.replica is None and not self.fenced:
            lines.append(f"writes_held: {self.lease_hold}")
        if self.failover is not None:
            lines += self.failover.info_lines()
        if self.promoted_at:
            lines.append(f"promoted_at: {int(self.promoted_at)}")
        if self.replica is not None:
            lines += self.replica.info_lines()
        lines += self.primary.info_lines()
        return "\n".join(lines) + "\n"


def _split(address: str) -> tuple[str, int]:
    host, _sep, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "", 0
    return host.strip("[]"), int(port)


def role_of(state: object) -> ReplicationRole | None:
    return _ROLES.get(id(state))
