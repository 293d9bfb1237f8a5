"""Replication commands: the link a replica opens (REPLINFO, REPLHEAD, REPLSYNC, REPLACK),
durable writes (REPLWAIT), PROMOTE, and INFO with its `# replication` section.

WAIT already means "wait for a command" in 0-db, so waiting for replicas is REPLWAIT.
"""

from __future__ import annotations

from zerostack.zdb.commands import namespace, system
from zerostack.zdb.commands.deferred import defer
from zerostack.zdb.commands.rules import atoll
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.engine.raw import entry_head
from zerostack.zdb.protocol import NIL, OK, bulk, error
from zerostack.zdb.replication.role import ReplicationRole, role_of

REPLICA_READ_ONLY = error("Replica is read-only")
NOT_A_PRIMARY = error("This server is a replica: replicas follow its primary")
MAX_WAIT_MS = 30 * 60 * 1000

WRITE_COMMANDS = frozenset({b"SET", b"SETX", b"DEL", b"NSNEW", b"NSDEL", b"NSSET", b"FLUSH",
                            b"NSJUMP", b"COMPACT"})
"""Commands a replica refuses: every change comes from its primary."""


def _role(s: Session) -> ReplicationRole:
    role = role_of(s.state)
    if role is None:
        raise ZdbError("Replication is not available on this server")
    return role


def _admin(s: Session) -> bytes | None:
    if s.admin:
        return None
    s.state.commands_unauthorized += 1
    return error("Permission denied")


def refuse_on_replica(s: Session, args: list[bytes]) -> bytes:
    return REPLICA_READ_ONLY


def cmd_replinfo(s: Session, args: list[bytes]) -> bytes:
    """REPLINFO: [datasize, mode] a replica must use to write the same files."""
    bad = _admin(s)
    if bad is not None:
        return bad
    cfg = s.state.engine.config
    mode = cfg.mode.value.encode()
    return b"*2\r\n:%d\r\n%b" % (cfg.datasize, bulk(mode))


def cmd_replhead(s: Session, args: list[bytes]) -> bytes:
    """REPLHEAD ns fileid offset [fileid offset ...]: header+key of the data entries there
    (nil where there is none); a replica compares them with its own to find where it agrees."""
    bad = _admin(s)
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


def _positions(args: list[bytes]) -> dict[str, tuple[int, int]] | None:
    if len(args) % 3:
        return None
    return {args[i].decode("utf-8", "surrogateescape"): (atoll(args[i + 1]), atoll(args[i + 2]))
            for i in range(0, len(args), 3)}


def cmd_replsync(s: Session, args: list[bytes]) -> bytes:
    """REPLSYNC replica-name [ns fileid offset ...]: turn this connection into a replication
    link shipping from those positions (other namespaces from their start)."""
    bad = _admin(s)
    if bad is not None:
        return bad
    role = _role(s)
    if role.is_replica:
        return NOT_A_PRIMARY
    positions = _positions(args[2:]) if len(args) >= 2 else None
    if positions is None:
        return error("Invalid arguments")
    conn = role.connection_of(s)
    if conn is None:
        return error("Replication needs a TCP or unix socket connection")
    transport, peer = conn
    role.primary.attach(s, transport, peer, args[1].decode("utf-8", "replace"), positions)
    return b""  # no reply: frames follow on this connection


def cmd_replack(s: Session, args: list[bytes]) -> bytes:
    """REPLACK ns fileid offset ...: a replica wrote these positions out (no reply)."""
    role = role_of(s.state)
    if role is None or not role.primary.is_follower(s):
        return error("REPLACK is only sent by replicas on a replication link")
    positions = _positions(args[1:])
    if positions:
        role.primary.ack(s, positions)
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
    """PROMOTE: stop following the primary and accept writes (admin)."""
    bad = _admin(s)
    if bad is not None:
        return bad
    role = _role(s)
    if not role.is_replica:
        return error("This server is already a primary")

    async def job() -> bytes:
        return OK if await role.promote() else error("This server is already a primary")

    defer(s, job)
    return None


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
    b"REPLINFO": cmd_replinfo,
    b"REPLHEAD": cmd_replhead,
    b"REPLSYNC": cmd_replsync,
    b"REPLACK": cmd_replack,
    b"REPLWAIT": cmd_replwait,
    b"PROMOTE": cmd_promote,
    b"INFO": cmd_info,
    b"FLUSH": cmd_flush,
}
