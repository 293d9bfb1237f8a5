"""Large SETs on a real server, pipelined: each value is received straight into its own
buffer and written in one pwritev to a data file whose blocks are reserved ahead. Replies
keep their order, a GET of a key never sees a value half written, and kill -9 loses no
acknowledged write."""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import threading
from pathlib import Path

import hiredis
import pytest

from tests.conftest import ProcessGroup, free_port, wait_for_port
from tests.zdb.conftest import ZdbProcess, start_zdb
from tests.zdb.test_crash import check_after_restart, write_until_killed
from zerostack.zdb.protocol import encode_request

REPO = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1024 * KIB


def start_pure(procs: ProcessGroup, root: Path, *extra: str,
               data: Path | None = None, index: Path | None = None) -> ZdbProcess:
    """The server from a copy of the sources without the native build."""
    src = root.parent / "pure-src"
    if not src.exists():
        shutil.copytree(REPO / "src" / "zerostack", src / "zerostack",
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    port = free_port()
    data = data or root / "data"
    index = index or root / "index"
    args = [sys.executable, "-m", "zerostack.cli.main", "zdb", "--listen", "127.0.0.1",
            "--port", str(port), "--data", str(data), "--index", str(index), *extra]
    log = root / f"zdb-{port}.log"
    with open(log, "ab") as out:
        proc = procs.start(args, stdout=out, stderr=out, cwd=root,
                           env={**os.environ, "PYTHONPATH": str(src)})
    wait_for_port(port, proc=proc, timeout=30)
    return ZdbProcess(proc=proc, port=port, data=data, index=index, args=args, log=log)


def start(build: str, procs: ProcessGroup, root: Path, *extra: str, **dirs: Path) -> ZdbProcess:
    root.mkdir(exist_ok=True)
    if build == "pure":
        return start_pure(procs, root, *extra, **dirs)
    return start_zdb(procs, root, *extra, **dirs)


def replies(sock: socket.socket, count: int) -> list[object]:
    reader = hiredis.Reader()
    out: list[object] = []
    while len(out) < count:
        data = sock.recv(1 << 20)
        assert data, f"connection closed after {len(out)} replies"
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            out.append(reply)
    return out


@pytest.mark.parametrize("build", ["native", "pure"])
def test_requests_behind_a_large_set_are_answered_in_order(
        tmp_path: Path, procs: ProcessGroup, build: str) -> None:
    server = start(build, procs, tmp_path / "srv")
    one, two = os.urandom(MIB), os.urandom(300 * KIB)
    three, four = os.urandom(2 * MIB), os.urandom(200 * KIB)
    script: list[tuple[tuple[bytes, ...], object]] = [
        ((b"SET", b"a", one), b"a"),
        ((b"GET", b"a"), one),
        ((b"SET", b"a", two), b"a"),
        ((b"SET", b"a", two), None),          # unchanged
        ((b"GET", b"a"), two),
        ((b"SET", b"s", b"small"), b"s"),
        ((b"DEL", b"a"), b"OK"),
        ((b"GET", b"a"), None),
        ((b"SET", b"b", three), b"b"),
        ((b"SET", b"c", four), b"c"),
        ((b"DBSIZE",), 3),
        ((b"GET", b"b"), three),
        ((b"GET", b"c"), four),
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"".join(encode_request(*request) for request, _ in script))
        got = replies(sock, len(script))
    assert got == [want for _, want in script]


def stamped(n: int, size: int) -> bytes:
    """A value that says which write it is, throughout."""
    return (b"%015d|" % n) * (size // 16)


@pytest.mark.parametrize("build", ["native", "pure"])
def test_a_get_during_large_sets_sees_nothing_or_a_whole_acknowledged_or_newer_value(
        tmp_path: Path, procs: ProcessGroup, build: str) -> None:
    server = start(build, procs, tmp_path / "srv")
    keys = [b"k%d" % i for i in range(3)]
    writes = 240
    sizes = [160 * KIB, 512 * KIB, MIB]
    # The number of the last write of each key acknowledged so far (-1: none).
    acked = {k: -1 for k in keys}
    lock = threading.Lock()
    errors: list[str] = []
    done = threading.Event()

    def writer() -> None:
        rnd = random.Random(3)
        plan = [(n, keys[rnd.randrange(len(keys))], sizes[n % len(sizes)]) for n in range(writes)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            def send() -> None:
                for n, key, size in plan:
                    sock.sendall(encode_request(b"SET", key, stamped(n, size)))
            sender = threading.Thread(target=send)
            sender.start()
            reader = hiredis.Reader()
            at = 0
            while at < writes:
                data = sock.recv(1 << 16)
                if not data:
                    errors.append("writer connection closed")
                    break
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    n, key, _ = plan[at]
                    if reply != key:
                        errors.append(f"SET {n} answered {reply!r}")
                    with lock:
                        acked[key] = n
                    at += 1
            sender.join()
        done.set()

    def getter(seed: int) -> None:
        rnd = random.Random(seed)
        seen = {k: -1 for k in keys}
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            while not done.is_set() and not errors:
                key = keys[rnd.randrange(len(keys))]
                with lock:
                    floor = acked[key]
                sock.sendall(encode_request(b"GET", key))
                value = replies(sock, 1)[0]
                if value is None:
                    if floor >= 0:
                        errors.append(f"GET {key!r} found nothing after write {floor} was acked")
                    continue
                assert isinstance(value, bytes)
                n = int(value[:15])
                if value != stamped(n, len(value)) or len(value) != sizes[n % len(sizes)]:
                    errors.append(f"GET {key!r} returned a damaged value of write {n}")
                elif n < max(floor, seen[key]):
                    errors.append(f"GET {key!r} returned write {n}, older than {floor}")
                seen[key] = max(seen[key], n)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=getter, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    assert all(n >= 0 for n in acked.values())


def large_value(n: int) -> bytes:
    size = (128 + (n * 7919) % 1400) * KIB  # 128 KiB .. 1.5 MiB: each written directly
    return (b"value-%08d-" % n) * (size // 15)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_kill_9_during_pipelined_large_sets_loses_no_acknowledged_write(
        tmp_path: Path, procs: ProcessGroup, sync: bool) -> None:
    rnd = random.Random(21 if sync else 22)
    root = tmp_path / "crash"
    extra = ["--datasize", "4M"] + (["--sync"] if sync else [])
    server = start("native", procs, root, *extra)
    stored = 0
    for _ in range(3):
        # one large SET at a time, up to 8 in flight, each written directly
        acked, sent = write_until_killed(server, stored, rnd.uniform(0.1, 0.5),
                                         make=large_value, batch=1, window=8)
        server = start("native", procs, root, *extra, data=server.data, index=server.index)
        stored = check_after_restart(server, acked, sent, make=large_value, chunk=8)
    assert stored > 0
