"""Where chunks live: the hub (a Zero-DB namespace, spoken to over RESP) or a local directory.

Both are content-addressed: the key of a chunk is the raw 32-byte blake2b-256 of its bytes,
so the same content is stored once however many images use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis

from zerostack.flist.manifest import FlistError

# Pipelines are cut in batches so one round trip carries many small chunks but a batch of
# big ones does not hold hundreds of MiB in memory at once.
BATCH_KEYS = 256
BATCH_BYTES = 32 * 1024 * 1024


class _Refused(redis.ResponseError):
    """The hub refused `SELECT`/`AUTH` on a new connection. redis-py drops a connection
    whose connect hook raised, and does not retry a ResponseError: a wrong password fails
    once, at once."""


class ChunkStore(Protocol):
    """A content-addressed key-value store of chunks (and manifests)."""

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...


def batches(keys: Sequence[bytes], size: int = BATCH_KEYS) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(keys), size):
        yield keys[i : i + size]


@dataclass(frozen=True)
class HubAddress:
    host: str
    port: int
    namespace: str = ""

    @classmethod
    def parse(cls, text: str) -> HubAddress:
        """`host:port[/namespace]`; the namespace defaults to Zero-DB's `default`."""
        hostport, _, namespace = text.partition("/")
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FlistError(f"hub address {text!r} is not host:port[/namespace]")
        if "/" in namespace or " " in namespace:
            raise FlistError(f"hub namespace {namespace!r} is invalid")
        return cls(host, int(port), namespace)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f"/{self.namespace}" if self.namespace else "")


class Hub:
    """A Zero-DB namespace (user mode) holding chunks and manifests, reached with redis-py.

    Zero-DB keeps the selected namespace per connection, so every connection of the pool
    runs `SELECT namespace [password]` (or `AUTH password` for `default`) as soon as it is
    opened, before any command: pipelines, reconnects and other threads all land in the
    namespace this hub names, never in `default` by accident.
    """

    def __init__(self, address: HubAddress | str, password: str | None = None,
                 timeout: float = 30.0) -> None:
        self.address = HubAddress.parse(address) if isinstance(address, str) else address
        self._password = password
        self._timeout = timeout
        self._conn: redis.Redis | None = None

    def _enter_namespace(self, conn: redis.connection.AbstractConnection) -> None:
        """redis-py's connect hook: the usual handshake, then this hub's namespace."""
        conn.on_connect()
        if self.address.namespace:
            args = [self.address.namespace] + ([self._password] if self._password else [])
            conn.send_command("SELECT", *args)
        elif self._password:
            conn.send_command("AUTH", self._password)
        else:
            return
        try:
            reply = conn.read_response()
        except redis.ResponseError as exc:
            raise _Refused(str(exc)) from None
        if reply not in (b"OK", "OK"):
            raise _Refused(f"unexpected reply {reply!r}")

    def _client(self) -> redis.Redis:
        if self._conn is None:
            pool = redis.ConnectionPool(
                host=self.address.host, port=self.address.port,
                socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                redis_connect_func=self._enter_namespace,
            )
            conn = redis.Redis(connection_pool=pool)
            try:
                conn.execute_command("PING")  # opens a connection: a refusal shows here
            except _Refused as exc:
                pool.disconnect()
                where = f"namespace {self.address.namespace!r}" if self.address.namespace \
                    else "the default namespace"
                raise FlistError(f"hub {self.address}: {where} refused access ({exc}); "
                                 "check the namespace and its password") from None
            except redis.RedisError as exc:
                pool.disconnect()
                raise FlistError(f"hub {self.address}: {exc}") from None
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.connection_pool.disconnect()
            self._conn = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, build: Iterable[tuple[str, tuple[bytes, ...]]]) -> list[object]:
        client = self._client()
        try:
            pipe = client.pipeline(transaction=False)  # Zero-DB has no MULTI
            for cmd, args in build:
                pipe.execute_command(cmd, *args)
            return list(pipe.execute())
        except redis.RedisError as exc:
            self.close()
            raise FlistError(f"hub {self.address}: {exc}") from None

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for batch in batches(keys):
            out.extend(bool(r) for r in self._run(("EXISTS", (k,)) for k in batch))
        return out

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for batch in batches(keys):
            for r in self._run(("GET", (k,)) for k in batch):
                out.append(r if isinstance(r, bytes) else None)
        return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        start, size = 0, 0
        for i, (_, value) in enumerate(items):
            size += len(value)
            if size >= BATCH_BYTES or i - start + 1 >= BATCH_KEYS:
                self._run(("SET", kv) for kv in items[start : i + 1])
                start, size = i + 1, 0
        if start < len(items):
            self._run(("SET", kv) for kv in items[start:])


class LocalStore:
    """Chunks as files under a directory (`ab/cdef…`), where `build` and `import` put them
    until they are pushed to a hub."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / h[2:]

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [self.path(k).exists() for k in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in keys:
            try:
                out.append(self.path(k).read_bytes())
            except FileNotFoundError:
                out.append(None)
        return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            path = self.path(key)
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(value)
            os.replace(tmp, path)


def copy_missing(keys: Sequence[bytes], source: ChunkStore, dest: ChunkStore) -> tuple[int, int]:
    """Copy the keys `dest` lacks from `source` (EXISTS before SET). Returns (copied, bytes)."""
    copied = nbytes = 0
    # Small batches: each one holds its chunks' bytes in memory.
    for batch in batches(list(dict.fromkeys(keys)), 16):
        present = dest.exists_many(batch)
        missing = [k for k, p in zip(batch, present, strict=True) if not p]
        if not missing:
            continue
        values = source.get_many(missing)
        items: list[tuple[bytes, bytes]] = []
        for k, v in zip(missing, values, strict=True):
            if v is None:
                raise FlistError(f"chunk {k.hex()[:16]} is missing from the local store")
            items.append((k, v))
            nbytes += len(v)
        dest.put_many(items)
        copied += len(items)
    return copied, nbytes
