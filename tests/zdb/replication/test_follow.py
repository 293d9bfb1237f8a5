"""Replication between real `zerostack zdb` processes: a replica under write load (killed and
restarted midway) ends with byte-identical files, namespace changes follow, writes are
refused on the replica, and online compaction reaches replicas."""

from __future__ import annotations

import json

import pytest
import redis
from typer.testing import CliRunner

from tests.conftest import ProcessGroup
from tests.zdb.conftest import ZdbProcess, ZdbStarter, start_zdb
from tests.zdb.replication.helpers import REPL_AUTH, Writers, info, wait_identical, wait_until
from zerostack.cli.zdb import app


def restart(procs: ProcessGroup, server: ZdbProcess, *extra: str) -> ZdbProcess:
    return start_zdb(procs, server.data.parent, *extra, port=server.port, data=server.data,
                     index=server.index)


def data_bytes(server: ZdbProcess) -> int:
    return sum(p.stat().st_size for p in server.data.rglob("d*") if p.is_file())


def test_replica_follows_load_and_restart_and_ends_identical(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    primary = zdb_start("--datasize", "1M", *REPL_AUTH)
    follow = ("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)
    replica = zdb_start(*follow)
    p = primary.client()
    for cmd in (("NSNEW", "photos"), ("NSSET", "photos", "password", "secret"),
                ("NSSET", "photos", "maxsize", "50000000"), ("NSNEW", "tmp"),
                ("NSNEW", "seqns"), ("NSSET", "seqns", "mode", "seq")):
        assert p.execute_command(*cmd) == b"OK"
    writers = Writers(primary.port, 100_000).start()
    wait_until(lambda: writers.done >= 35_000, 60, "35k writes")
    replica.proc.kill()  # SIGKILL in the middle of the load
    replica.proc.wait()
    wait_until(lambda: writers.done >= 60_000, 60, "60k writes")
    kept = data_bytes(replica)
    replica = restart(procs, replica, *follow)
    writers.join()
    assert len(writers.acked) == 100_000
    # namespace changes and other writes after the restart
    assert p.execute_command("NSDEL", "tmp") == b"OK"
    assert p.execute_command("NSSET", "photos", "public", "0") == b"OK"
    assert p.execute_command("SELECT", "photos", "secret") == b"OK"
    for i in range(200):
        p.execute_command("SET", f"photo{i}", b"p" * (i * 13))
    assert p.execute_command("SELECT", "seqns") == b"OK"
    seq_keys = [p.execute_command("SET", "", f"s{i}") for i in range(50)]
    p.execute_command("SET", seq_keys[3], "updated")
    assert p.execute_command("SELECT", "default") == b"OK"
    for i in range(0, 1000, 7):
        p.execute_command("DEL", f"k{i}")
    assert p.execute_command("REPLWAIT", 1, 10000) == 1
    assert p.execute_command("REPLWAIT", 2, 200) == 1  # only one replica: times out
    wait_identical(primary, replica)

    r = replica.client()
    assert r.execute_command("GET", "k5") == b"v5-" + b"x" * 5
    assert r.execute_command("GET", "k7") is None  # deleted on the primary
    assert sorted(r.execute_command("NSLIST")) == [b"default", b"photos", b"seqns"]
    assert r.execute_command("SELECT", "photos", "secret") == b"OK"
    assert r.execute_command("GET", "photo10") == b"p" * 130
    for cmd in (("SET", "a", "b"), ("DEL", "photo1"), ("NSNEW", "x"), ("FLUSH",)):
        with pytest.raises(redis.ResponseError, match="Replica is read-only"):
            r.execute_command(*cmd)
    # lag is visible on both sides and in `zerostack zdb status`
    wait_until(lambda: info(primary).get("connected_replicas") == "1", 10, "replica listed")
    assert "lag_bytes=0" in info(primary)["replica0"]
    rinfo = info(replica)
    assert rinfo["role"] == "replica" and rinfo["link"] == "online"
    # the restarted replica resumed from its own files: it did not copy them again
    assert kept > data_bytes(primary) * 0.1
    assert 0 < int(rinfo["applied_bytes"]) <= data_bytes(primary) - kept + 1024
    assert rinfo["truncations"] == "0"
    out = CliRunner().invoke(app, ["status", "--port", str(primary.port), "--json"])
    assert out.exit_code == 0, out.output
    status = json.loads(out.stdout)
    assert status["role"] == "primary" and status["replicas"][0]["lag_bytes"] == 0
    assert status["term"] == 1 and "fenced" not in status
    out = CliRunner().invoke(app, ["status", "--port", str(replica.port)])
    assert out.exit_code == 0 and "replica of" in out.stdout


def test_online_compaction_reaches_the_replica(zdb_start: ZdbStarter) -> None:
    primary = zdb_start("--datasize", "64K", *REPL_AUTH)
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)
    p = primary.client()
    assert p.execute_command("NSNEW", "logs") == b"OK"
    assert p.execute_command("SELECT", "logs") == b"OK"
    for round_ in range(5):
        pipe = p.pipeline(transaction=False)
        for i in range(400):
            pipe.execute_command("SET", f"key{i}", f"round{round_}-" + "x" * 100)
        pipe.execute()
    for i in range(0, 400, 2):
        p.execute_command("DEL", f"key{i}")
    assert p.execute_command("REPLWAIT", 1, 10000) == 1
    other = primary.client()
    report = p.execute_command("COMPACT", "logs", "1").decode()
    fields = dict(line.split(": ") for line in report.splitlines())
    assert int(fields["reclaimed_bytes"]) > 0 and fields["keys"] == "200"
    assert other.execute_command("PING") == b"PONG"
    assert p.execute_command("GET", "key1") == b"round4-" + b"x" * 100
    assert p.execute_command("SET", "after", "compaction") == b"after"
    wait_identical(primary, replica)
    late = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)  # a full copy from scratch
    wait_identical(primary, late)
    r = replica.client()
    r.execute_command("SELECT", "logs")
    assert r.execute_command("GET", "after") == b"compaction"
    assert r.execute_command("GET", "key2") is None
