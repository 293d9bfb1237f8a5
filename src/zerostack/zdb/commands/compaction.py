"""COMPACT ns [keep-history]: compact a namespace of the running server (admin).

The engine's compaction runs in a worker thread; meanwhile clients of that namespace are
held (their requests are answered once it is done) and everyone else is served as usual.
Replicas start the namespace over from the compacted files.
"""

from __future__ import annotations

import asyncio

from zerostack.zdb.commands import namespace, system
from zerostack.zdb.commands.deferred import defer
from zerostack.zdb.commands.rules import atoll
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.engine.compact import CompactReport
from zerostack.zdb.protocol import OK, bulk, error
from zerostack.zdb.replication.role import role_of

BUSY = error("Namespace is being compacted, retry later")


def report_text(report: CompactReport) -> bytes:
    lines = [f"namespace: {report.namespace}", f"keys: {report.keys}",
             f"versions: {report.versions}", f"bytes_before: {report.bytes_before}",
             f"bytes_after: {report.bytes_after}", f"reclaimed_bytes: {report.reclaimed_bytes}",
             f"seconds: {report.seconds:.3f}"]
    return ("\n".join(lines) + "\n").encode()


def cmd_compact(s: Session, args: list[bytes]) -> bytes | None:
    if not s.admin:
        s.state.commands_unauthorized += 1
        return error("Permission denied")
    if len(args) not in (2, 3):
        return error("Invalid arguments")
    name = args[1].decode("utf-8", "surrogateescape")
    keep = atoll(args[2]) if len(args) == 3 else None
    if keep is not None and keep < 0:
        return error("Invalid arguments")
    engine = s.state.engine
    if name not in engine.namespaces:
        return namespace.NAMESPACE_NOT_FOUND
    role = role_of(s.state)
    if role is None:
        return error("Compaction is not available on this server")
    if name in role.busy:
        return BUSY
    if engine.namespaces[name].mode.value == "seq":
        return error("Sequential namespaces cannot be compacted: their keys are positions")

    async def job() -> bytes:
        engine.flush_all()  # nothing of this namespace is left for the loop thread to write
        system.count_disk(s.state)  # the files about to be replaced count as written
        role.busy.add(name)
        try:
            report = await asyncio.to_thread(engine.compact_namespace, name, keep)
        except ZdbError as exc:
            return error(str(exc))
        finally:
            role.busy.discard(name)
            role.on_namespace_free(name)
        role.primary.reset(name)
        return bulk(report_text(report))

    defer(s, job)
    return None


def cmd_nsset(s: Session, args: list[bytes]) -> bytes:
    role = role_of(s.state)
    if role is not None and len(args) > 1 and args[1].decode("utf-8", "surrogateescape") in role.busy:
        return BUSY
    return namespace.cmd_nsset(s, args)


def cmd_nsdel(s: Session, args: list[bytes]) -> bytes:
    role = role_of(s.state)
    if role is not None and len(args) > 1 and args[1].decode("utf-8", "surrogateescape") in role.busy:
        return BUSY
    reply = namespace.cmd_nsdel(s, args)
    if reply == OK and role is not None:
        role.primary.deleted(args[1].decode("utf-8", "surrogateescape"))
    return reply


HANDLERS = {b"COMPACT": cmd_compact, b"NSSET": cmd_nsset, b"NSDEL": cmd_nsdel}
