"""Crash safety: kill -9 a server under pipelined write load, restart it, check what it serves."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import hiredis
import pytest

from tests.conftest import ProcessGroup
from tests.zdb.conftest import ZdbProcess, start_zdb
from zerostack.zdb.protocol import encode_request


def key(n: int) -> bytes:
    return b"key-%08d" % n


def value(n: int) -> bytes:
    return (b"value-%d-" % n) * (1 + n % 40)


def write_until_killed(server: ZdbProcess, start: int, duration: float,
                       make: Callable[[int], bytes] = value, batch: int = 32,
                       window: int = 96) -> tuple[int, int]:
    """Pipeline SETs of `make(n)` from key `start` on, `batch` requests at a time and at
    most about `window` unanswered, then kill -9 the server after `duration` seconds.
    Returns (acknowledged, sent): keys start..acknowledged-1 got their reply."""
    reader = hiredis.Reader()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sent = acked = start
    deadline = time.monotonic() + duration

    def read_some() -> bool:
        nonlocal acked
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            return False
        if not data:
            return False
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            assert reply == key(acked), (reply, acked)
            acked += 1
        return True

    try:
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"".join(encode_request(b"SET", key(n), make(n))
                                      for n in range(sent, sent + batch)))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += batch
            while acked < sent - window and read_some():
                pass
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        # Replies the server sent before it died are acknowledgements too.
        while read_some():
            pass
    finally:
        sock.close()
    return acked, sent


def check_after_restart(server: ZdbProcess, acked: int, sent: int,
                        make: Callable[[int], bytes] = value, chunk: int = 500) -> int:
    """Every acknowledged key is served intact (`make(n)`, read `chunk` keys at a time),
    and what is stored is a prefix of the writes. Returns how many keys are stored."""
    r = server.client()
    for lo in range(0, acked, chunk):
        keys = [key(n) for n in range(lo, min(lo + chunk, acked))]
        got = r.execute_command("MGET", *keys)
        for k, v in zip(keys, got, strict=True):
            assert v == make(int(k[4:])), f"acknowledged {k!r} lost or damaged"
    tail: list[bytes | None] = []
    for lo in range(acked, sent, chunk):
        tail += r.execute_command("MGET", *[key(n) for n in range(lo, min(lo + chunk, sent))])
    present = [v is not None for v in tail]
    stored = acked + (present.index(False) if False in present else len(present))
    assert not any(present[stored - acked :]), "stored keys are not a prefix of the writes"
    for n, v in zip(range(acked, stored), tail, strict=False):
        assert v == make(n)
    assert r.execute_command("DBSIZE") == stored
    r.close()
    return stored


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_kill_9_under_write_load(tmp_path: Path, procs: ProcessGroup, sync: bool) -> None:
    rounds = 6 if sync else 3
    rnd = random.Random(7 if sync else 8)
    root = tmp_path / "crash"
    root.mkdir()
    extra = ["--datasize", "256K"] + (["--sync"] if sync else [])
    server = start_zdb(procs, root, *extra)
    stored = 0
    for _ in range(rounds):
        acked, sent = write_until_killed(server, stored, rnd.uniform(0.05, 0.6))
        server = start_zdb(procs, root, *extra, data=server.data, index=server.index)
        stored = check_after_restart(server, acked, sent)
        assert stored >= acked
    assert stored > 0
