"""Failover: with --min-replicas 1, every write acknowledged before the primary is killed
(-9) is on the promoted replica; the old primary re-joins as a replica of the new one."""

from __future__ import annotations

import subprocess

import pytest
import redis

from tests.conftest import ProcessGroup, zerostack_cmd
from tests.zdb.conftest import ZdbProcess, ZdbStarter, start_zdb
from tests.zdb.replication.helpers import (
    REPL_AUTH,
    Writers,
    info,
    repl_call,
    wait_identical,
    wait_until,
)


def hello_role(server: ZdbProcess) -> bytes | None:
    """The role HELLO reports, in Redis's words: master or replica."""
    reply = server.client().execute_command("HELLO", "2")
    fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    return fields.get(b"role", fields.get("role"))


def test_acknowledged_writes_survive_failover_and_old_primary_rejoins(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    primary = zdb_start("--min-replicas", "1", "--admin", "pw", "--datasize", "1M")
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", "--primary-auth", "pw",
                        "--admin", "pw", "--peers", f"127.0.0.1:{primary.port}")
    wait_until(lambda: info(primary).get("connected_replicas") == "1", 20, "replica attached")
    assert hello_role(primary) == b"master" and hello_role(replica) == b"replica"
    writers = Writers(primary.port, 60_000, batch=200).start()
    wait_until(lambda: writers.done >= 20_000, 60, "20k writes")
    primary.proc.kill()
    primary.proc.wait()
    writers.join()
    assert len(writers.acked) >= 20_000

    # a replica refuses PROMOTE from a non-admin client, then the CLI promotes it
    with pytest.raises(redis.ResponseError, match="Permission denied"):
        replica.client().execute_command("PROMOTE")
    promote = [*zerostack_cmd(), "zdb", "promote", "--port", str(replica.port), "--password",
               "pw"]
    # two nodes, one of them dead: no majority, so only --force promotes
    done = subprocess.run(promote, capture_output=True, text=True, timeout=60)
    said = " ".join(done.stderr.split())
    assert done.returncode != 0 and "1 of 2 nodes agreed to term 2, 2 needed" in said, said
    assert info(replica)["role"] == "replica"
    done = subprocess.run([*promote, "--force"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + replica.log.read_text()[-3000:]
    assert "now a primary" in done.stdout
    r = replica.client()
    keys = [k for k, _v in writers.acked]
    got = []
    for i in range(0, len(keys), 1000):
        got += r.execute_command("MGET", *keys[i:i + 1000])
    missing = [k for (k, v), value in zip(writers.acked, got, strict=True) if value != v]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    assert info(replica)["role"] == "primary" and hello_role(replica) == b"master"
    assert info(replica)["term"] == "3"  # the refused promotion used term 2
    for i in range(100):
        assert r.execute_command("SET", f"new{i}", "after-failover") == f"new{i}".encode()

    # the old primary comes back as a replica of the new one; its unconfirmed tail goes
    old = start_zdb(procs, primary.data.parent, "--replica-of", f"127.0.0.1:{replica.port}",
                    "--primary-auth", "pw", "--admin", "pw", port=primary.port,
                    data=primary.data, index=primary.index)
    wait_identical(replica, old)
    assert hello_role(old) == b"replica"
    o = old.client()
    assert o.execute_command("GET", "new7") == b"after-failover"
    with pytest.raises(redis.ResponseError, match="Replica is read-only"):
        o.execute_command("SET", "x", "y")
    assert r.execute_command("AUTH", "pw") == b"OK"
    with pytest.raises(redis.ResponseError, match="already a primary"):
        r.execute_command("PROMOTE")


def test_old_primary_with_a_diverged_tail_cuts_it_and_follows(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    a = zdb_start(*REPL_AUTH)
    b = zdb_start("--replica-of", f"127.0.0.1:{a.port}", *REPL_AUTH)
    ca = a.client()
    for i in range(300):
        ca.execute_command("SET", f"common{i}", f"v{i}")
    assert ca.execute_command("REPLWAIT", 1, 10000) == 1
    b.proc.kill()
    b.proc.wait()
    for i in range(40):  # never reach b: a's tail diverges from here
        ca.execute_command("SET", f"common{i}", f"only-on-a{i}")
    a.proc.kill()
    a.proc.wait()
    b = start_zdb(procs, b.data.parent, *REPL_AUTH, port=b.port, data=b.data, index=b.index)
    cb = b.client()
    # it was a replica: without --replica-of it refuses writes until promoted
    with pytest.raises(redis.ResponseError, match="Fenced: this server was not the primary"):
        cb.execute_command("SET", "x", "y")
    assert repl_call(b, "PROMOTE", "FORCE") == b"OK"
    for i in range(25):
        cb.execute_command("SET", f"on-b{i}", "b")
    a = start_zdb(procs, a.data.parent, "--replica-of", f"127.0.0.1:{b.port}", *REPL_AUTH,
                  port=a.port,
                  data=a.data, index=a.index)
    wait_identical(b, a)
    assert a.client().execute_command("GET", "common3") == b"v3"
    assert a.client().execute_command("GET", "on-b3") == b"b"
    assert "event=zdb.replication.diverged" in a.log.read_text()
