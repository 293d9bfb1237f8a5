"""Clients that never read their replies: the server's memory stays bounded, other clients
keep being served, and a client past --client-output-limit is dropped with a log line."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import redis

from tests.zdb.conftest import ZdbStarter

# How long the flood lasts; CI runs the full 30 s, a developer may shorten it.
FLOOD_SECONDS = float(os.environ.get("ZEROSTACK_ZDB_FLOOD_SECONDS", "30"))
FLOODERS = 8
VALUE = os.urandom(1024 * 1024)
# One write of pipelined GETs of the 1 MiB value: about 2,400 requests in 64 KiB, the
# shape that took an unbounded server to 1.7 GB in one second.
GET_BIG = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 2400
# Bounds the test holds the server to. RSS: the interpreter and its modules (~60 MiB),
# 8 clients each owed at most --client-output-pause plus one reply, and the pages of the
# mapped data file; the margin covers allocator slack. p99: the well-behaved client shares
# two busy cores with eight flooders and the test itself.
MAX_RSS = 160 * 1024 * 1024
MAX_P99 = 0.1


def rss(pid: int) -> int:
    """Resident set size of a process, bytes (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def flood(port: int, stop: threading.Event, sent: list[int]) -> None:
    """Send pipelined GETs as fast as the server takes them and never read a reply."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                sent.append(sock.send(GET_BIG))
            except TimeoutError:
                continue  # the server stopped reading us: exactly what it should do
        # close without reading: the server must drop what it owed us


def test_clients_that_never_read_cannot_grow_the_server(zdb_start: ZdbStarter) -> None:
    z = zdb_start()
    good = z.client()
    assert good.execute_command("SET", "big", VALUE) == b"big"
    assert good.execute_command("SET", "small", b"x" * 100) == b"small"
    baseline = rss(z.proc.pid)

    stop = threading.Event()
    sent: list[list[int]] = [[] for _ in range(FLOODERS)]
    threads = [threading.Thread(target=flood, args=(z.port, stop, sent[i]), daemon=True)
               for i in range(FLOODERS)]
    for t in threads:
        t.start()
    latencies: list[float] = []
    peak = 0
    deadline = time.monotonic() + FLOOD_SECONDS
    next_sample = 0.0
    big_reads = 0
    try:
        while time.monotonic() < deadline:
            began = time.perf_counter()
            assert good.execute_command("GET", "small") == b"x" * 100
            latencies.append(time.perf_counter() - began)
            if len(latencies) % 50 == 0:  # the large value too, read in full
                assert good.execute_command("GET", "big") == VALUE
                big_reads += 1
            now = time.monotonic()
            if now >= next_sample:
                peak = max(peak, rss(z.proc.pid))
                next_sample = now + 0.1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
    peak = max(peak, rss(z.proc.pid))

    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    summary = (f"baseline {baseline >> 20} MiB, peak {peak >> 20} MiB, p99 {p99 * 1000:.1f} ms "
               f"over {len(latencies)} GETs, {big_reads} reads of 1 MiB, flooders sent "
               f"{sum(map(sum, sent)) >> 20} MiB")
    print(summary)
    assert all(sum(s) > len(GET_BIG) for s in sent), summary  # every flooder got through
    assert peak < MAX_RSS, summary
    assert p99 < MAX_P99, summary

    # What the flooders were owed goes with them: the server is back near where it started
    # and answers at once.
    time.sleep(1)
    after = rss(z.proc.pid)
    assert after < baseline + 64 * 1024 * 1024, f"{after >> 20} MiB after disconnect; {summary}"
    assert good.execute_command("GET", "big") == VALUE
    assert z.proc.poll() is None


def test_reading_slowly_gets_every_reply_in_order(zdb_start: ZdbStarter) -> None:
    # Held requests are executed later, not dropped: a client that reads late still gets
    # every reply, in order.
    z = zdb_start("--client-output-pause", "64K")
    r = z.client()
    values = [os.urandom(256 * 1024) for _ in range(4)]
    for i, v in enumerate(values):
        r.execute_command("SET", f"k{i}", v)
    with socket.create_connection(("127.0.0.1", z.port)) as sock:
        rounds = 40
        request = b"".join(b"*2\r\n$3\r\nGET\r\n$2\r\nk%d\r\n" % i for i in range(4)) + \
            b"*1\r\n$4\r\nPING\r\n"
        sock.sendall(request * rounds)
        time.sleep(1)  # the server owes far more than the pause bound by now
        expected = b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values) + b"+PONG\r\n"
        got = bytearray()
        sock.settimeout(10)
        while len(got) < len(expected) * rounds:
            chunk = sock.recv(1 << 20)
            assert chunk, "server closed the connection"
            got += chunk
        assert bytes(got) == expected * rounds


def test_output_limit_disconnects_with_a_log_line(zdb_start: ZdbStarter) -> None:
    # An 8 MiB reply to a client that does not read is past a 1 MiB limit, even after the
    # kernel's socket buffers took their share: the client is dropped with a log line,
    # others stay. MGET stops building before the limit instead.
    z = zdb_start("--client-output-pause", "256K", "--client-output-limit", "1M")
    r = z.client()
    huge = os.urandom(8 * 1024 * 1024 - 64)
    r.execute_command("SET", "huge", huge)
    r.execute_command("SET", "big", VALUE)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", z.port))
        sock.sendall(b"*2\r\n$3\r\nGET\r\n$4\r\nhuge\r\n" * 2)
        time.sleep(0.5)
        sock.settimeout(10)
        got = 0
        try:
            while chunk := sock.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass  # dropped with its replies unsent: what the limit is for
    assert got < len(huge)
    deadline = time.monotonic() + 5
    while "zdb.client.output_limit" not in z.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in z.log.read_text().splitlines() if "zdb.client.output_limit" in x)
    assert "limit=1048576" in line and "reason=" in line
    assert r.execute_command("SET", "small", b"s") == b"small"
    assert r.execute_command("GET", "small") == b"s"
    with pytest.raises(redis.ResponseError, match="Reply too large"):
        r.execute_command("MGET", "big", "big")
    assert r.execute_command("MGET", "small", "nope", "small") == [b"s", None, b"s"]


def test_output_settings_are_checked(zdb_start: ZdbStarter, tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import zerostack_cmd

    for args, message in ((["--client-output-pause", "0"], "--client-output-pause"),
                          (["--client-output-pause", "8M", "--client-output-limit", "1M"],
                           "--client-output-limit")):
        out = subprocess.run([*zerostack_cmd(), "zdb", "--data", str(tmp_path / "d"),
                              "--index", str(tmp_path / "i"), "--port", "0", *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert message in out.stdout + out.stderr
    # a well-formed pair starts
    z = zdb_start("--client-output-pause", "128K", "--client-output-limit", "0")
    assert redis.Redis(port=z.port).ping()


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_large_values_reuse_the_servers_buffers(zdb_start: ZdbStarter) -> None:
    # Each 1 MiB value passes through buffers of its size (reads, the request, the reply).
    # Fresh pages for each one cost 256+ page faults per MiB; reused buffers cost none.
    z = zdb_start()
    client = z.client()
    for i in range(10):  # warm-up: the buffers exist once
        assert client.execute_command("SET", b"w%d" % i, VALUE) == b"w%d" % i
        assert client.execute_command("GET", b"w%d" % i) == VALUE
    before = minor_faults(z.proc.pid)
    rounds = 40
    for i in range(rounds):
        assert client.execute_command("SET", b"k%d" % i, VALUE) == b"k%d" % i
        assert client.execute_command("GET", b"k%d" % i) == VALUE
    faults = minor_faults(z.proc.pid) - before
    # Measured: about 1,000 per SET+GET when the allocator handed each buffer back to the
    # OS, 6 with the buffers reused (mapping the new values' pages for the GETs).
    assert faults < rounds * 64, f"{faults} page faults for {rounds} SET+GET of 1 MiB"
