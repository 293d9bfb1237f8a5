"""Shared steps of the replication tests: pipelined writers, file comparison, waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import hiredis
import redis

from tests.zdb.conftest import ZdbProcess
from zerostack.zdb.engine import Engine, EngineConfig
from zerostack.zdb.engine.raw import START, read_entries
from zerostack.zdb.replication.handshake import call

REPL_AUTH = ("--replication-password", "repl-secret")
"""Replication needs a password: the same on every node of these tests."""
TERM_FILE = "index/replication-term"
"""Each node's own term state: not part of the files replication makes identical."""


def files(server: ZdbProcess) -> dict[str, bytes]:
    """Every file under the server's data/ and index/ directories, by relative path.

    The server may be working on them (a replica starting a namespace over removes and
    recreates its files): a file gone between listing and reading is left out of this
    snapshot, and the callers compare snapshots until they settle."""
    out: dict[str, bytes] = {}
    for kind, root in (("data", server.data), ("index", server.index)):
        for p in sorted(root.rglob("*")):
            try:
                name = f"{kind}/{p.relative_to(root)}"
                if p.is_file() and name != TERM_FILE:
                    out[name] = p.read_bytes()
            except FileNotFoundError:
                continue
    return out


def wait_identical(a: ZdbProcess, b: ZdbProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    fa, fb = files(a), files(b)
    while time.monotonic() < deadline:
        fa, fb = files(a), files(b)
        if fa == fb:
            return
        time.sleep(0.3)
    differ = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    raise AssertionError(f"files still differ after {timeout}s: {differ[:10]}")


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def repl_call(server: ZdbProcess, *request: bytes | str | int,
              password: str = "repl-secret") -> object:
    """One request on a connection authenticated with the REPLAUTH handshake; an error
    reply is raised as redis.ResponseError, as redis-py does."""
    reply = call("127.0.0.1", server.port, password, request)[0]
    if isinstance(reply, hiredis.ReplyError):
        raise redis.ResponseError(str(reply))
    return reply


def info(server: ZdbProcess) -> dict[str, str]:
    text = server.client().execute_command("INFO").decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


class Writers:
    """Threads writing `total` keys through pipelines into a namespace; `acked` collects
    (key, value) pairs the server answered with the key (an error or a dropped connection
    leaves them out)."""

    def __init__(self, port: int, total: int, threads: int = 4, batch: int = 500,
                 namespace: str | None = None, prefix: str = "k") -> None:
        self.port = port
        self.total = total
        self.batch = batch
        self.namespace = namespace
        self.prefix = prefix
        self.acked: list[tuple[bytes, bytes]] = []
        self.done = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True)
                         for i in range(threads)]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 120) -> None:
        for t in self._threads:
            t.join(timeout)

    def _run(self, index: int, threads: int) -> None:
        r = redis.Redis(port=self.port, socket_timeout=30)
        r.response_callbacks.clear()
        try:
            if self.namespace:
                r.execute_command("SELECT", self.namespace)
            mine = range(index, self.total, threads)
            for start in range(0, len(mine), self.batch):
                items = [(f"{self.prefix}{i}".encode(), b"v%d-" % i + b"x" * (i % 40))
                         for i in mine[start:start + self.batch]]
                pipe = r.pipeline(transaction=False)
                for key, value in items:
                    pipe.execute_command("SET", key, value)
                replies = pipe.execute(raise_on_error=False)
                with self._lock:
                    for (key, value), reply in zip(items, replies, strict=True):
                        if reply == key:
                            self.acked.append((key, value))
                    self.done += len(items)
        except (redis.RedisError, OSError):
            return  # the server went away (killed on purpose)
        finally:
            r.close()


def engine(root: Path) -> Engine:
    """An engine of its own (no server) with small data files, so that logs span several."""
    return Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index",
                               datasize=16 * 1024))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "replication-term"}


def frames_of(source: Engine, name: str, start: tuple[int, int] = START) -> list[list[bytes]]:
    """DATA and JUMP frames shipping namespace `name` of `source` from `start`."""
    ns = source.namespace(name)
    out: list[list[bytes]] = []
    pos = start
    while pos < ns.position():
        chunk = read_entries(ns, pos, 2000)
        if not chunk:
            pos = (pos[0] + 1, START[1])
            out.append([b"JUMP", name.encode(), b"%d" % pos[0]])
            continue
        out.append([b"DATA", name.encode(), b"%d" % pos[0], b"%d" % pos[1], chunk])
        pos = (pos[0], pos[1] + len(chunk))
    return out
