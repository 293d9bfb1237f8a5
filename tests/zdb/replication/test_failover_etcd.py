"""Automatic failover on etcd (--failover-etcd), with a real etcd-server and real servers on
127.0.0.1: a primary killed with -9 is replaced within the documented bound and rejoins as
a replica; a primary that cannot reach etcd stops taking writes before its lease can end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from bench.zdb_partition import etcd_command, etcd_ready

from tests.conftest import ProcessGroup, free_port, require_tool, zerostack_cmd
from tests.zdb.conftest import ZdbProcess, start_zdb
from tests.zdb.replication.helpers import REPL_AUTH, Writers, info, wait_identical, wait_until
from zerostack.zdb.replication.failover import FailoverConfig, FailoverError, parse_urls

TTL, MARGIN = 2, 0.5
BOUND = TTL + 4.0
"""Seconds from a primary's death to the first write on its successor, at most (the docs
give TTL + 3.5 s as the worst case; 0.5 s more for a shared CI machine)."""


@pytest.fixture
def etcd(procs: ProcessGroup, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    require_tool("etcd")
    client, peer = free_port(), free_port()
    data = tmp_path / "etcd"
    data.mkdir(mode=0o700)
    with open(tmp_path / "etcd.log", "ab") as out:
        proc = procs.start(etcd_command(data, "127.0.0.1", client, peer), stdout=out,
                           stderr=out)
    url = f"http://127.0.0.1:{client}"
    wait_until(lambda: etcd_ready(url), 30, "etcd up")
    yield url, proc


@dataclass
class ReplicaSet:
    nodes: list[ZdbProcess]
    roots: list[Path]
    said: dict[int, str] = field(default_factory=dict)  # the refusals of the last probe

    def writable(self) -> list[int]:
        """The nodes that take a write right now."""
        out = []
        for i, node in enumerate(self.nodes):
            if node.proc.poll() is not None:
                continue
            try:
                # a new value each time: SET of an unchanged value answers nil
                if node.client().execute_command("SET", "probe", repr(time.time())) == b"probe":
                    out.append(i)
            except (redis.RedisError, OSError) as exc:
                self.said[i] = str(exc)
        return out


def start_set(procs: ProcessGroup, tmp_path: Path, url: str, *extra: str) -> ReplicaSet:
    ports = [free_port() for _ in range(3)]
    nodes, roots = [], []
    for i, port in enumerate(ports):
        root = tmp_path / f"n{i}"
        root.mkdir()
        args = [*REPL_AUTH, "--peers", ",".join(f"127.0.0.1:{p}" for p in ports if p != port),
                "--advertise", f"127.0.0.1:{port}", "--failover-etcd", url,
                "--failover-ttl", str(TTL), "--failover-margin", str(MARGIN),
                "--failover-name", f"t{os.getpid()}-{ports[0]}", "--min-replicas-timeout", "2",
                *extra]
        if i:
            args += ["--replica-of", f"127.0.0.1:{ports[0]}"]
        nodes.append(start_zdb(procs, root, *args, port=port))
        roots.append(root)
    wait_until(lambda: info(nodes[0]).get("connected_replicas") == "2", 30, "replicas attached")
    wait_until(lambda: info(nodes[0]).get("etcd_holding") == "yes", 30, "etcd key taken")
    return ReplicaSet(nodes, roots)


def test_kill9_primary_is_replaced_and_rejoins_as_replica(
        procs: ProcessGroup, tmp_path: Path, etcd: tuple[str, subprocess.Popen[bytes]]) -> None:
    rs = start_set(procs, tmp_path, etcd[0], "--min-replicas", "majority")
    old = rs.nodes[0]
    assert rs.writable() == [0]
    writers = Writers(old.port, 200_000, threads=2, batch=100).start()
    wait_until(lambda: writers.done >= 3000, 60, "writes acknowledged")
    old.proc.kill()
    killed = time.monotonic()
    old.proc.wait()
    writers.join()
    # a replica takes over by itself within the bound, and only one does
    took = None
    while time.monotonic() - killed < BOUND + 5:
        live = rs.writable()
        if live:
            took = time.monotonic() - killed
            break
        time.sleep(0.02)
    assert took is not None, f"no replica took over: {rs.said}"
    assert took <= BOUND, f"failover took {took:.2f}s, bound {BOUND}s"
    assert len(live) == 1, live
    new = rs.nodes[live[0]]
    state = info(new)
    assert state["role"] == "primary" and state["term"] == "2", state
    assert state["etcd_holding"] == "yes" and state["failovers"] == "1"
    shown = subprocess.run([*zerostack_cmd(), "zdb", "status", "--port", str(new.port),
                            "--json"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    said = json.loads(shown.stdout)
    assert said["etcd"] == {"key_holder": f"127.0.0.1:{new.port} term 2", "holding": True,
                            "failovers": 1}, said
    assert "writes_held" not in said
    # --min-replicas majority: every acknowledged write is on the new primary
    r = new.client()
    keys = [k for k, _v in writers.acked]
    got: list[bytes | None] = []
    for i in range(0, len(keys), 1000):
        got += r.execute_command("MGET", *keys[i:i + 1000])
    missing = [k for (k, v), value in zip(writers.acked, got, strict=True) if value != v]
    assert len(keys) >= 3000 and not missing, f"{len(missing)} acknowledged writes lost"
    # the old primary, restarted with the same flags (no --replica-of), finds the key held
    # in a newer term: it refuses writes, follows the new primary, and ends identical
    again = start_zdb(procs, rs.roots[0], *old.args[old.args.index("--index") + 2:],
                      port=old.port, data=old.data, index=old.index)
    rs.nodes[0] = again
    wait_until(lambda: info(again).get("role") == "replica" and info(again).get("link") ==
               "online", 30, "old primary rejoined as a replica")
    assert info(again)["term"] == "2"
    with pytest.raises(redis.ResponseError, match="read-only"):
        again.client().execute_command("SET", "late", "x")
    assert r.execute_command("SET", "after", "y") == b"after"
    for node in rs.nodes:
        if node is not new:
            wait_identical(new, node, 30)


def test_primary_stops_writes_while_etcd_is_unreachable(
        procs: ProcessGroup, tmp_path: Path, etcd: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, etcd_proc = etcd
    rs = start_set(procs, tmp_path, url)
    primary = rs.nodes[0].client()
    assert primary.execute_command("SET", "k1", "v1") == b"k1"
    os.kill(etcd_proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        refused, last_ok = "", 0.0
        while time.monotonic() - stopped < TTL + 2:
            sent = time.monotonic()
            try:
                primary.execute_command("SET", "k2", repr(sent))
                last_ok = sent - stopped
            except redis.ResponseError as exc:
                refused = str(exc)
                break
            time.sleep(0.01)
        assert refused, "the primary kept taking writes without etcd"
        # its last keepalive was sent before etcd stopped: no write is taken later than
        # TTL - margin after that (etcd keeps the lease TTL after it received it)
        assert last_ok < TTL - MARGIN, last_ok
        assert "Writes held" in refused and "etcd lease" in refused, refused
        assert "etcd lease was last renewed" in info(rs.nodes[0])["writes_held"]
        assert rs.writable() == []  # no replica can take over without etcd either
    finally:
        os.kill(etcd_proc.pid, signal.SIGCONT)
    # etcd back: exactly one node takes writes again (the lease ran out meanwhile, so
    # a new term), and the others follow it
    wait_until(lambda: len(rs.writable()) == 1, BOUND + 10, "one primary again")
    leader = rs.nodes[rs.writable()[0]]
    assert leader.client().execute_command("GET", "k1") == b"v1"
    for node in rs.nodes:
        if node is not leader:
            wait_until(lambda n=node: info(n).get("role") == "replica" and
                       info(n).get("link") == "online", 30, "followers")
            wait_identical(leader, node, 30)


def test_failover_flags_are_checked(tmp_path: Path) -> None:
    done = subprocess.run([*zerostack_cmd(), "zdb", "--port", str(free_port()), "--data",
                           str(tmp_path / "d"), "--index", str(tmp_path / "i"),
                           "--failover-etcd", "http://127.0.0.1:2379"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--failover-etcd needs --peers" in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made


@pytest.mark.parametrize(("urls", "ttl", "margin", "name", "said"), [
    ("ftp://127.0.0.1:2379", 2, 0.5, "a", "is not http://HOST:PORT"),
    ("http://127.0.0.1", 2, 0.5, "a", "is not http://HOST:PORT"),
    ("http://127.0.0.1:2379/x", 2, 0.5, "a", "is not http://HOST:PORT"),
    (",".join(["http://h:1"] * 17), 2, 0.5, "a", "1 to 16 URLs"),
    ("http://127.0.0.1:2379", 1, 0.5, "a", "--failover-ttl must be 2 to 300"),
    ("http://127.0.0.1:2379", 2, 1.0, "a", "less than half of --failover-ttl"),
    ("http://127.0.0.1:2379", 2, 0.05, "a", "at least 0.1"),
    ("http://127.0.0.1:2379", 2, 0.5, "a/b", "--failover-name"),
])
def test_failover_settings_are_checked(urls: str, ttl: int, margin: float, name: str,
                                       said: str) -> None:
    with pytest.raises(FailoverError, match=re.escape(said)):
        FailoverConfig(urls=parse_urls(urls), ttl=ttl, margin=margin, name=name).check()
    FailoverConfig(urls=parse_urls("http://127.0.0.1:2379,http://[::1]:2379"), ttl=ttl + 2,
                   margin=0.5).check()
