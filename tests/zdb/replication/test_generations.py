"""A failover during an online compaction loses no confirmed write: every rewrite of a
namespace (compaction, FLUSH) starts a new generation of its log, votes compare positions
only within one generation, and a confirmation of the files before a rewrite counts for
nothing after it.

Each test drives the primary's and the replicas' replication code directly, frame by frame,
in the order that lost a write confirmed under --min-replicas 1 before generations existed:
a replica one batch behind when the compaction started, and promoted from its old files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
import redis

from tests.conftest import ProcessGroup
from tests.zdb.conftest import ZdbStarter
from tests.zdb.replication.helpers import (
    REPL_AUTH,
    engine,
    frames_of,
    info,
    tree,
    wait_identical,
    wait_until,
)
from tests.zdb.replication.test_terms import promote, restart, trio
from zerostack.zdb.engine import Engine
from zerostack.zdb.engine.raw import START, Position
from zerostack.zdb.replication.primary import Primary
from zerostack.zdb.replication.role import NOTHING, ReplicationRole
from zerostack.zdb.replication.terms import Terms


def fill(e: Engine, name: str, count: int, start: int = 0) -> None:
    ns = e.namespace(name) if name in e.namespaces else e.create_namespace(name)
    for i in range(start, start + count):
        ns.set(b"k%d" % (i % 20), b"v%d-" % i + b"x" * 300)  # overwrites: compaction shrinks
    e.flush_all()


def replica_of(root: Path, name: str) -> ReplicationRole:
    # A candidate named without a port: a granted vote makes the voter follow nobody.
    return ReplicationRole(engine(root), replica_of=("127.0.0.1", 1), name=name)


def apply(role: ReplicationRole, frames: list[list[bytes]]) -> None:
    assert role.replica is not None
    changed: set[str] = set()
    for frame in frames:
        role.replica._apply(frame, changed)
    role.engine.flush_all()


def test_a_replica_copying_a_rewrite_refuses_a_candidate_behind_it_in_the_old_files(
        tmp_path: Path) -> None:
    # The primary wrote 60 entries; r1 confirmed all of them (a write acknowledged under
    # --min-replicas 1 with r1's confirmation), r2 only 50: it was one batch behind when
    # the compaction started, and the old files' tail is never shipped after it.
    primary = engine(tmp_path / "p")
    fill(primary, "logs", 50)
    primary.close()
    shutil.copytree(tmp_path / "p", tmp_path / "r2")
    primary = engine(tmp_path / "p")
    fill(primary, "logs", 10, start=50)
    primary.close()
    shutil.copytree(tmp_path / "p", tmp_path / "r1")
    primary = engine(tmp_path / "p")
    primary.compact_namespace("logs", 0)
    end = primary.namespace("logs").position()
    r1, r2 = replica_of(tmp_path / "r1", "r1"), replica_of(tmp_path / "r2", "r2")
    reset = [b"RESET", b"logs", b"%d" % end[0], b"%d" % end[1], b"1"]
    for role in (r1, r2):
        apply(role, [reset])
        assert role.replica is not None and "logs" in role.replica.copies
    # Both copy the rewrite; the primary is cut off. r2's old files lack what r1 confirmed.
    granted, why = r1.vote(2, "r2", 0, r2.positions())
    assert not granted and "holds less of namespace logs" in why
    granted, why = r2.vote(3, "r1", 0, r1.positions())
    assert granted, why
    assert r1.positions()["logs"] == (0, r1.engine.namespace("logs").position())
    assert r1.engine.namespace("logs").get(b"k19") == b"v59-" + b"x" * 300  # kept, whole
    for role in (r1, r2):
        role.engine.close()
    primary.close()


def test_a_replica_holding_the_rewrite_refuses_a_candidate_that_never_got_it(
        tmp_path: Path) -> None:
    # r2 never read the RESET (its link was behind); r1 copied the rewrite completely and
    # then confirmed writes made after it. r2's position in its old files is numerically
    # past r1's in the rewritten (smaller) ones, but holds none of those writes.
    primary = engine(tmp_path / "p")
    fill(primary, "logs", 120)
    primary.close()
    shutil.copytree(tmp_path / "p", tmp_path / "r1")
    shutil.copytree(tmp_path / "p", tmp_path / "r2")
    primary = engine(tmp_path / "p")
    primary.compact_namespace("logs", 0)
    end = primary.namespace("logs").position()
    fill(primary, "logs", 5, start=200)  # written after the compaction, confirmed by r1
    r1, r2 = replica_of(tmp_path / "r1", "r1"), replica_of(tmp_path / "r2", "r2")
    apply(r1, [[b"RESET", b"logs", b"%d" % end[0], b"%d" % end[1], b"1"],
               *frames_of(primary, "logs")])
    assert r1.replica is not None and not r1.replica.copies
    assert tree(tmp_path / "r1") == tree(tmp_path / "p")
    assert r2.engine.namespace("logs").position() > r1.engine.namespace("logs").position()
    granted, why = r1.vote(2, "r2", 0, r2.positions())
    assert not granted and "generation 0" in why
    assert r1.positions()["logs"] == (1, primary.namespace("logs").position())
    # r2 holding the rewrite (any position past its end) is ahead of r2's old files
    granted, why = r2.vote(3, "r1", 0, r1.positions())
    assert granted, why
    for role in (r1, r2):
        role.engine.close()
    primary.close()


def test_a_replica_copying_a_rewrite_from_its_start_holds_nothing_until_it_reaches_its_end(
        tmp_path: Path) -> None:
    primary = engine(tmp_path / "p")
    fill(primary, "logs", 120)
    primary.compact_namespace("logs", 0)
    end = primary.namespace("logs").position()
    fresh = replica_of(tmp_path / "r", "r")
    shipped = frames_of(primary, "logs")
    apply(fresh, [[b"NS", b"logs", b"user", b"", b"0", b"0", b"0", b"0", b"0", b"1",
                   b"%d" % end[0], b"%d" % end[1]], *shipped[:-1]])
    assert fresh.positions()["logs"] == NOTHING
    apply(fresh, shipped[-1:])
    assert fresh.positions()["logs"] == (1, end)
    fresh.engine.close()
    primary.close()


class _Transport(asyncio.Transport):
    """What a replica's connection receives, kept in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def writelines(self, parts: object) -> None:
        for part in parts:  # type: ignore[attr-defined]
            self.write(part)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        return None


def test_a_confirmation_of_the_files_before_a_rewrite_counts_for_nothing_after_it(
        tmp_path: Path) -> None:
    primary = engine(tmp_path / "p")
    fill(primary, "logs", 200)
    logs = primary.namespace("logs")
    old_end = logs.position()

    async def run() -> list[bool]:
        p = Primary(primary, set(), min_replicas=1, min_replicas_timeout=30)
        session = object()
        link = p.attach(session, _Transport(), "peer", "r", {"logs": old_end})
        # The replica confirms the old files' end (a heartbeat) just before the compaction;
        # the primary reads it only after the rewrite and writes made since.
        primary.compact_namespace("logs", 0)
        p.reset("logs")
        fill(primary, "logs", 5, start=1000)
        assert logs.position() < old_end
        answered: list[bool] = []  # these writes wait for the replica
        p.hold(answered.append, {"logs"})
        p.seal()
        fill(primary, "logs", 200, start=2000)
        assert logs.position() > old_end
        p.pump(link)
        assert link.sent["logs"] == logs.position()
        p.ack(session, p.term, {"logs": (0, old_end)})
        await asyncio.sleep(0)
        assert answered == []  # the replica holds none of the new files yet
        assert link.acked["logs"] == START and link.ignored_acks == 1
        new: Position = logs.position()
        p.ack(session, p.term, {"logs": (1, new)})
        await p.stop()
        return answered

    assert asyncio.run(run()) == [True]
    primary.close()


def test_a_replica_that_missed_a_compaction_cannot_win_against_one_that_confirmed_after_it(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    """Real servers: r2 is down during the compaction, r1 copies the rewrite and confirms a
    write made after it (--min-replicas 1). r2's old files end far past the (smaller)
    rewritten ones, yet hold none of that write: r1 refuses r2 its vote."""
    p, r1, r2 = trio(zdb_start, "--min-replicas", "1", "--admin", "pw")
    cp = p.client()
    for round_ in "ab":
        for i in range(100):
            assert cp.execute_command("SET", f"k{i}", round_ * 4000) == f"k{i}".encode()
    assert cp.execute_command("REPLWAIT", 2, 10000) == 2
    r2.proc.kill()
    r2.proc.wait()
    cp.execute_command("AUTH", "pw")
    said = cp.execute_command("COMPACT", "default", 0)
    assert b"reclaimed_bytes" in said, said
    assert cp.execute_command("SET", "after", "compaction") == b"after"  # confirmed by r1
    assert cp.execute_command("REPLWAIT", 1, 10000) == 1
    os.kill(p.proc.pid, signal.SIGSTOP)
    r2 = restart(procs, r2)  # it cannot hear of the compaction: the primary is stalled
    try:
        wait_until(lambda: info(r2).get("role") == "replica", 20, "r2 up")
        with pytest.raises(redis.ResponseError, match="Promotion refused: 1 of 3 nodes") as e:
            promote(r2)
        assert "holds less of namespace default (generation 0" in str(e.value)
        assert promote(r1) == b"OK"
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    wait_identical(r1, r2)
    assert r2.client().execute_command("GET", "after") == b"compaction"
    assert r2.client().execute_command("GET", "k7") == b"b" * 4000
    wait_until(lambda: info(p).get("role") == "replica", 20, "old primary follows r1")
    wait_identical(r1, p)


def test_a_namespace_created_again_is_a_new_generation_from_its_start(
        zdb_start: ZdbStarter) -> None:
    """After a compaction, a namespace deleted and created again under the same name is
    another log: counted as a later generation that holds its writes from the start (not
    as the start of the compacted files, which would hold nothing for certain)."""
    p = zdb_start("--admin", "pw", *REPL_AUTH)
    c = p.client()
    c.execute_command("AUTH", "pw")
    c.execute_command("NSNEW", "logs")
    c.execute_command("SELECT", "logs")
    for round_ in "ab":
        for i in range(50):
            c.execute_command("SET", f"k{i}", round_ * 1000)
    c.execute_command("SELECT", "default")
    assert b"reclaimed_bytes" in c.execute_command("COMPACT", "logs", 0)
    compacted = Terms(p.index).generation("logs")
    assert compacted[0] == 1 and compacted[1] > START
    assert c.execute_command("NSDEL", "logs") == b"OK"
    assert c.execute_command("NSNEW", "logs") == b"OK"
    assert Terms(p.index).generation("logs") == (2, START)
