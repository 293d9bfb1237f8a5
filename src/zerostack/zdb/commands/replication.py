"""Replication commands: the link a replica opens (REPLAUTH, REPLINFO, REPLHEAD, REPLSYNC,
REPLACK), durable writes (REPLWAIT), terms between nodes (REPLVOTE, REPLLEADER), PROMOTE,
and INFO with its `# replication` section.

Every replication command needs the replication password (`--replication-password`, proven
with the REPLAUTH handshake) or the admin password (AUTH, or the REPLAUTH handshake); a
server with neither refuses them.

WAIT already means "wait for a command" in 0-db, so waiting for replicas is REPLWAIT.
"""

from __future__ import annotations

from zerostack.zdb.commands import namespace, system
from zerostack.zdb.commands.deferred import defer
from zerostack.zdb.commands.rules import atoll
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import Mode, ZdbError
from zerostack.zdb.engine.raw import entry_head, position_problem
from zerostack.zdb.protocol import NIL, OK, array, bulk, error
from zerostack.zdb.replication.handshake import PLAIN_REFUSED, ServerChallenge, escape
from zerostack.zdb.replication.role import ReplicationRole, role_of

REPLICA_READ_ONLY = error("Replica is read-only")
NOT_A_PRIMARY = error("This server is a replica: replicas follow its primary")
MAX_WAIT_MS = 30 * 60 * 1000
MAX_TERM = 1 << 62
REPLICATION_DISABLED = error("Replication is disabled: start this server with --admin or "
                             "--replication-password")

WRITE_COMMANDS: frozenset[bytes] = frozenset({
    b"SET", b"SETX", b"DEL", b"NSNEW", b"NSDEL", b"NSSET", b"FLUSH", b"NSJUMP", b"COMPACT"})
"""Commands a replica refuses: every change comes from its primary."""


def _role(s: Session) -> ReplicationRole:
    role = role_of(s.state)
    if role is None:
        raise ZdbError("Replication is not available on this server")
    return role


def refuse_on_replica(s: Session, args: list[bytes]) -> bytes:
    role = role_of(s.state)
    if role is not None and role.fenced:
        return error(f"Fenced: {role.fenced}")
    if role is not None and role.replaced:
        return error(f"Replica is read-only: {role.replaced}")
    if role is not None and role.lease_hold and role.replica is None:
        return error(f"Writes held: {role.lease_hold}")
    return REPLICA_READ_ONLY


def _repl(s: Session) -> bytes | None:
    """None when this session may use replication commands, else the refusal."""
    role = role_of(s.state)
    if role is None:
        return error("Replication is not available on this server")
    if s in role.repl_sessions:
        return None
    if s.state.admin_password is None and role.options.password is None:
        s.state.commands_unauthorized += 1
        return REPLICATION_DISABLED
    if s.state.admin_password is not None and s.admin:
        return None
    s.state.commands_unauthorized += 1
    return error("Permission denied")


def seq_refusal(s: Session) -> bytes | None:
    """For SET with an empty key: refuse a new sequential key while this primary runs too
    far ahead of its replicas (see Primary.seq_refusal); None when it may go on."""
    ns = s.ns
    if ns.mode is not Mode.SEQ:
        return None
    role = role_of(s.state)
    if role is None or not role.primary.seq_k:
        return None
    why = role.primary.seq_refusal(ns)
    return None if why is None else error(why)


def cmd_replauth(s: Session, args: list[bytes]) -> bytes:
    """REPLAUTH CHALLENGE nonce address | REPLAUTH PROOF proof: the mutual handshake that
    allows replication commands on this connection (see replication/handshake.py); the
    replication password or the admin password. A password in clear is refused."""
    role = _role(s)
    if s.state.admin_password is None and role.options.password is None:
        s.state.commands_unauthorized += 1
        return REPLICATION_DISABLED
    step = args[1].upper() if len(args) >= 2 else b""
    conn = role.connection_of(s)
    peer = conn[1] if conn is not None else "-"
    if step == b"CHALLENGE":
        challenge = ServerChallenge.parse(args)
        if isinstance(challenge, str):
            return error(challenge)
        if conn is None or challenge.address not in role.own_addresses(conn[0]):
            s.state.commands_unauthorized += 1
            role.auth_refused(peer, f"challenge for another address {challenge.address}")
            return error(f"Access denied: this server is not at {escape(challenge.address)} "
                         "(a connection relayed through another address is refused)")
        role.challenges = {k: v for k, v in role.challenges.items()
                           if k in s.state.sessions}  # forget closed connections
        role.challenges[s] = challenge
        return array([bulk(item) for item in challenge.answer(role.keys(
            s.state.admin_password))])
    if step == b"PROOF":
        pending = role.challenges.pop(s, None)  # one proof per challenge
        if pending is None:
            s.state.commands_unauthorized += 1
            return error("No REPLAUTH CHALLENGE pending on this connection: a challenge "
                         "takes one proof")
        if len(args) != 3 or not pending.check(role.keys(s.state.admin_password), args[2]):
            s.state.commands_unauthorized += 1
            role.auth_refused(peer, "wrong proof")
            return namespace.ACCESS_DENIED
        role.repl_sessions.intersection_update(s.state.sessions)  # forget closed ones
        role.repl_sessions.add(s)
        return OK
    s.state.commands_unauthorized += 1
    role.auth_refused(peer, "password in clear")
    return error(PLAIN_REFUSED)


def _term(arg: bytes) -> int | None:
    if len(arg) > 20:
        return None
    term = atoll(arg)
    return term if 0 <= term <= MAX_TERM else None


def cmd_replinfo(s: Session, args: list[bytes]) -> bytes:
    """REPLINFO term: [datasize, mode, term]: how a replica must write the same files, and
    this primary's term. A replica of a newer term fences this primary."""
    bad = _repl(s)
    if bad is not None:
        return bad
    if len(args) != 2 or (term := _term(args[1])) is None:
        return error("Invalid arguments")
    role = _role(s)
    role.learn_term(term, "a replica connecting")
    if role.is_replica:
        return NOT_A_PRIMARY
    if role.fenced:
        return error(f"Fenced: {role.fenced}")
    cfg = s.state.engine.config
    mode = cfg.mode.value.encode()
    return b"*3\r\n:%d\r\n%b:%d\r\n" % (cfg.datasize, bulk(mode), role.terms.term)


def cmd_replhead(s: Session, args: list[bytes]) -> bytes:
    """REPLHEAD ns fileid offset [fileid offset ...]: header+key of the data entries there
    (nil where there is none); a replica compares them with its own to find where it agrees."""
    bad = _repl(s)
    if bad is not None:
        return bad
    if len(args) < 4 or len(args) % 2:
        return error("Invalid arguments")
    name = args[1].decode("utf-8", "surrogateescape")
    ns = s.state.engine.namespaces.get(name)
    if ns is None:
        return namespace.NAMESPACE_NOT_FOUND
    role = role_of(s.state)
    if role is not None and name in role.busy:
        return error("Namespace is being compacted, retry later")
    out = [b"*%d\r\n" % ((len(args) - 2) // 2)]
    for i in range(2, len(args), 2):
        head = entry_head(ns, atoll(args[i]), atoll(args[i + 1]))
        out.append(NIL if head is None else bulk(head))
    return b"".join(out)


MAX_NAMESPACES = 100_000


def _positions(args: list[bytes]) -> dict[str, tuple[int, int]] | None:
    if len(args) % 3 or len(args) > 3 * MAX_NAMESPACES:
        return None
    out: dict[str, tuple[int, int]] = {}
    for i in range(0, len(args), 3):
        if len(args[i + 1]) > 20 or len(args[i + 2]) > 20:
            return None
        out[args[i].decode("utf-8", "surrogateescape")] = (atoll(args[i + 1]),
                                                            atoll(args[i + 2]))
    return out


def _confirmed(args: list[bytes]) -> dict[str, tuple[int, tuple[int, int]]] | None:
    """`ns generation fileid offset ...` (REPLACK, REPLVOTE): per namespace, the
    generation of the files (see replication/terms.py) and a position in them."""
    if len(args) % 4 or len(args) > 4 * MAX_NAMESPACES:
        return None
    out: dict[str, tuple[int, tuple[int, int]]] = {}
    for i in range(0, len(args), 4):
        if len(args[i + 1]) > 20 or len(args[i + 2]) > 20 or len(args[i + 3]) > 20:
            return None
        out[args[i].decode("utf-8", "surrogateescape")] = (
            atoll(args[i + 1]), (atoll(args[i + 2]), atoll(args[i + 3])))
    return out


def cmd_replsync(s: Session, args: list[bytes]) -> bytes:
    """REPLSYNC replica-name term [ns fileid offset ...]: turn this connection into a
    replication link shipping from those positions (other namespaces from their start).

    Every position must be where the replica can stand: the start or end of a data file
    of this primary, or the start of one of its entries."""
    bad = _repl(s)
    if bad is not None:
        return bad
    role = _role(s)
    if len(args) < 3 or (term := _term(args[2])) is None:
        return error("Invalid arguments")
    role.learn_term(term, "a replica connecting")
    if role.is_replica:
        return NOT_A_PRIMARY
    if role.fenced:
        return error(f"Fenced: {role.fenced}")
    if term != role.terms.term:
        return error(f"Replica term {term} differs from this primary's term "
                     f"{role.terms.term}: connect again")
    positions = _positions(args[3:])
    if positions is None:
        return error("Invalid arguments")
    engine = s.state.engine
    for name, pos in positions.items():
        ns = engine.namespaces.get(name)
        if ns is None or name in role.busy:
            continue  # deleted (the replica gets DROP) or compacted (RESET follows)
        problem = position_problem(ns, pos)
        if problem is not None:
            shown = name.encode("utf-8", "backslashreplace")[:64].decode("ascii", "replace")
            return error(f"Invalid replication position {pos[0]}:{pos[1]} for namespace "
                         f"{shown!r}: {problem}")
    conn = role.connection_of(s)
    if conn is None:
        return error("Replication needs a TCP or unix socket connection")
    transport, peer = conn
    role.primary.attach(s, transport, peer, args[1].decode("utf-8", "replace"), positions)
    return b""  # no reply: frames follow on this connection


def cmd_replack(s: Session, args: list[bytes]) -> bytes:
    """REPLACK term [ns generation fileid offset ...]: a replica of that term wrote these
    positions of these generations out (no reply)."""
    role = role_of(s.state)
    if role is None or not role.primary.is_follower(s):
        return error("REPLACK is only sent by replicas on a replication link")
    term = _term(args[1]) if len(args) >= 2 else None
    positions = _confirmed(args[2:])
    if term is None or positions is None:
        return error("Invalid arguments")
    role.primary.ack(s, term, positions)
    return b""


def cmd_replwait(s: Session, args: list[bytes]) -> bytes | None:
    """REPLWAIT numreplicas timeout-ms: wait until that many replicas hold every write made
    so far (like Redis WAIT); replies the number that do."""
    if len(args) != 3:
        return error("Invalid arguments")
    count, timeout = atoll(args[1]), atoll(args[2])
    if count < 0 or not 0 <= timeout <= MAX_WAIT_MS:
        return error("Invalid arguments")
    role = _role(s)
    if role.is_replica:
        return NOT_A_PRIMARY
    if role.fenced:
        return error(f"Fenced: {role.fenced}")
    primary = role.primary
    target = primary.snapshot()
    done = primary.count_acked(target)
    if done >= count or timeout == 0:
        return b":%d\r\n" % done

    async def job() -> bytes:
        return b":%d\r\n" % await primary.wait_acked(count, timeout / 1000, target)

    defer(s, job)
    return None


def cmd_promote(s: Session, args: list[bytes]) -> bytes | None:
    """PROMOTE [FORCE]: start a new term with this server as its primary. Without FORCE a
    majority of the replica set (--peers) must agree; FORCE may lose acknowledged writes."""
    bad = _repl(s)
    if bad is not None:
        return bad
    role = _role(s)
    if len(args) > 2 or (len(args) == 2 and args[1].upper() != b"FORCE"):
        return error("Invalid arguments (PROMOTE [FORCE])")
    if role.accepts_writes:
        return error("This server is already a primary")
    force = len(args) == 2

    async def job() -> bytes:
        refused = await role.promote(force)
        return OK if refused is None else error(refused)

    defer(s, job)
    return None


def _text(arg: bytes, limit: int = 300) -> str | None:
    if len(arg) > limit:
        return None
    text = arg.decode("utf-8", "replace")
    return text if text.isprintable() else None


def cmd_replvote(s: Session, args: list[bytes]) -> bytes:
    """REPLVOTE term candidate log-term [ns generation fileid offset ...]: [granted 0/1,
    our term, reason]. A node votes once per term, for a candidate whose log is at least as advanced
    as its own; a newer term fences a primary and makes a replica follow the candidate."""
    bad = _repl(s)
    if bad is not None:
        return bad
    if len(args) < 4:
        return error("Invalid arguments")
    term, candidate, log_term = _term(args[1]), _text(args[2]), _term(args[3])
    positions = _confirmed(args[4:])
    if term is None or candidate is None or log_term is None or positions is None:
        return error("Invalid arguments")
    role = _role(s)
    granted, reason = role.vote(term, candidate, log_term, positions)
    return b"*3\r\n:%d\r\n:%d\r\n%b" % (int(granted), role.terms.term, bulk(reason.encode()))


def cmd_replleader(s: Session, args: list[bytes]) -> bytes:
    """REPLLEADER term address: the primary of `term` is at address; replies our term."""
    bad = _repl(s)
    if bad is not None:
        return bad
    if len(args) != 3:
        return error("Invalid arguments")
    term, leader = _term(args[1]), _text(args[2])
    if term is None or leader is None:
        return error("Invalid arguments")
    return b":%d\r\n" % _role(s).announced(term, leader)


def cmd_info(s: Session, args: list[bytes]) -> bytes:
    """INFO, with a `# replication` section (role, replicas, positions, lag)."""
    text = system.info_text(s)
    role = role_of(s.state)
    if role is not None:
        text += "\n" + role.info_text()
    raw = text.encode()
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


def cmd_flush(s: Session, args: list[bytes]) -> bytes:
    """FLUSH, and replicas start the namespace over."""
    reply = namespace.cmd_flush(s, args)
    role = role_of(s.state)
    if reply == OK and role is not None:
        role.primary.reset(s.ns.name)
    return reply


HANDLERS = {
    b"REPLAUTH": cmd_replauth,
    b"REPLVOTE": cmd_replvote,
    b"REPLLEADER": cmd_replleader,
    b"REPLINFO": cmd_replinfo,
    b"REPLHEAD": cmd_replhead,
    b"REPLSYNC": cmd_replsync,
    b"REPLACK": cmd_replack,
    b"REPLWAIT": cmd_replwait,
    b"PROMOTE": cmd_promote,
    b"INFO": cmd_info,
    b"FLUSH": cmd_flush,
}
