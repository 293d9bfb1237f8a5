"""Terms on real servers: a promotion starts a new term agreed by a majority; the replaced
primary is fenced (refuses writes, says why), confirms nothing, and turns into a replica of
the new one, ending byte-identical; sequential keys are never handed out twice."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import redis

from tests.conftest import ProcessGroup, free_port, wait_for_port
from tests.zdb.conftest import ZdbProcess, ZdbStarter, start_zdb
from tests.zdb.replication.helpers import (
    REPL_AUTH,
    info,
    repl_call,
    wait_identical,
    wait_until,
)


def trio(zdb_start: ZdbStarter, *extra: str) -> list[ZdbProcess]:
    """Three nodes on loopback: node 0 primary, 1 and 2 its replicas, all in one set."""
    ports = [free_port() for _ in range(3)]
    nodes = []
    for i, port in enumerate(ports):
        peers = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
        follow = ("--replica-of", f"127.0.0.1:{ports[0]}") if i else ()
        nodes.append(zdb_start(*follow, "--peers", peers, "--advertise", f"127.0.0.1:{port}",
                               *REPL_AUTH, *extra, port=port))
    wait_until(lambda: info(nodes[0]).get("connected_replicas") == "2", 20, "replicas")
    return nodes


def restart(procs: ProcessGroup, node: ZdbProcess) -> ZdbProcess:
    """Start a stopped node again with the same command line and files."""
    with open(node.log, "ab") as out:
        proc = procs.start(node.args, stdout=out, stderr=out)
    wait_for_port(node.port, proc=proc, timeout=30)
    return ZdbProcess(proc, node.port, node.data, node.index, node.args, node.log)


def promote(node: ZdbProcess, *force: str) -> bytes:
    said = repl_call(node, "PROMOTE", *force)
    assert isinstance(said, bytes)
    return said


def test_replaced_primary_is_fenced_confirms_nothing_and_rejoins(
        zdb_start: ZdbStarter) -> None:
    p, r1, r2 = trio(zdb_start, "--min-replicas", "1", "--min-replicas-timeout", "3")
    cp = p.client()
    for i in range(200):
        assert cp.execute_command("SET", f"before{i}", f"v{i}") == f"before{i}".encode()
    assert cp.execute_command("REPLWAIT", 2, 10000) == 2
    os.kill(p.proc.pid, signal.SIGSTOP)  # the primary stalls; the others elect a new one
    try:
        assert promote(r1) == b"OK"
        assert info(r1)["term"] == "2" and info(r1)["role"] == "primary"
        wait_until(lambda: info(r2).get("primary") == f"127.0.0.1:{r1.port}"
                   and info(r2).get("link") == "online", 20, "r2 follows r1")
        assert r1.client().execute_command("SET", "after", "r1") == b"after"
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    # the old primary resumes with a writer: nothing it answers is acknowledged
    acked: list[bytes] = []
    errors: list[str] = []

    def write() -> None:
        c = p.client()
        for i in range(50):
            try:
                acked.append(c.execute_command("SET", f"stale{i}", "x"))
            except redis.ResponseError as exc:
                errors.append(str(exc))
            except redis.RedisError:
                return

    t = threading.Thread(target=write)
    t.start()
    t.join(60)
    assert acked == [], acked
    # depending on how soon it hears of term 2: fenced, or already a replica of r1
    assert all("Fenced: term 2 is newer" in e or "not confirmed" in e
               or f"replaced as primary in term 2; write to the primary at 127.0.0.1:{r1.port}"
               in e for e in errors), errors[:3]
    # it learned of term 2 from r1, turned into its replica and cut its unconfirmed tail
    wait_until(lambda: info(p).get("role") == "replica" and info(p).get("link") == "online",
               30, "old primary follows r1")
    assert info(p)["term"] == "2"
    log = p.log.read_text()
    assert "event=zdb.replication.fenced" in log and "term 2 is newer" in log
    wait_identical(r1, p)
    wait_identical(r1, r2)
    c1 = r1.client()
    assert c1.execute_command("GET", "before7") == b"v7"
    assert c1.execute_command("GET", "stale3") is None
    with pytest.raises(redis.ResponseError, match="Replica is read-only"):
        p.client().execute_command("SET", "x", "y")


def test_a_lagging_replica_cannot_win_and_the_old_primary_follows_the_winner(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    p, r1, r2 = trio(zdb_start)
    r2.proc.kill()
    r2.proc.wait()
    cp = p.client()
    for i in range(100):
        cp.execute_command("SET", f"k{i}", "v")
    assert cp.execute_command("REPLWAIT", 1, 10000) == 1  # on r1, not on r2
    os.kill(p.proc.pid, signal.SIGSTOP)
    r2 = restart(procs, r2)  # it cannot catch up: the primary is stalled
    try:
        # r1 holds more than r2: it refuses its vote, the stalled primary cannot answer
        with pytest.raises(redis.ResponseError, match="Promotion refused: 1 of 3 nodes") as e:
            promote(r2)
        assert "the candidate holds less of namespace default" in str(e.value)
        assert info(r2)["role"] == "replica"
        # r1 wins the next term with r2's vote
        assert promote(r1) == b"OK"
        assert info(r1)["term"] == "3"
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    wait_identical(r1, r2)
    wait_until(lambda: info(p).get("role") == "replica", 20, "old primary follows r1")
    wait_identical(r1, p)
    assert r2.client().execute_command("GET", "k99") == b"v"
    assert "event=zdb.replication.fenced" in p.log.read_text()
    assert info(r1)["role"] == "primary" and info(p)["term"] == "3"


def test_sequential_keys_are_not_handed_out_twice_after_failover(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    primary = zdb_start(*REPL_AUTH)
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)
    cp = primary.client()
    assert cp.execute_command("NSNEW", "seq") == b"OK"
    assert cp.execute_command("NSSET", "seq", "mode", "seq") == b"OK"
    assert cp.execute_command("SELECT", "seq") == b"OK"
    first = [cp.execute_command("SET", "", f"a{i}") for i in range(100)]
    assert cp.execute_command("REPLWAIT", 1, 10000) == 1
    replica.proc.kill()  # async: the next writes never reach it
    replica.proc.wait()
    lost = {cp.execute_command("SET", "", f"lost{i}"): f"lost{i}".encode() for i in range(300)}
    primary.proc.kill()
    primary.proc.wait()
    replica = restart(procs, replica)
    assert promote(replica, "FORCE") == b"OK"
    cr = replica.client()
    assert cr.execute_command("SELECT", "seq") == b"OK"
    new = {cr.execute_command("SET", "", f"new{i}"): f"new{i}".encode() for i in range(300)}
    assert not set(new) & set(lost), "a key acknowledged by the old primary was reissued"
    assert not set(new) & set(first)
    for key in list(lost)[:20]:  # the lost keys read as absent, never as another value
        assert cr.execute_command("GET", key) is None
    for key, value in list(new.items())[:20]:
        assert cr.execute_command("GET", key) == value
    assert "event=zdb.replication.seq_skip namespace=seq" in replica.log.read_text()
    # the old primary re-joins: its lost tail is cut and it ends identical
    old = start_zdb(procs, primary.data.parent, "--replica-of", f"127.0.0.1:{replica.port}",
                    *REPL_AUTH, port=primary.port, data=primary.data, index=primary.index)
    wait_identical(replica, old)
