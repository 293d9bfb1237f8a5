"""The etcd cluster that orders a replicated ledger, as the replicas use it.

The client is `etcd3gw`: it speaks to etcd's gRPC-JSON gateway over plain HTTP (`/v3/` on
etcd 3.4 and later, found by asking `/version`), so it needs `requests` but no gRPC
stack, and it is synchronous, which suits the replica's few calls per block (they run in
a worker thread). One `Etcd3Client` talks to one member; `EtcdLog` keeps one per member
and moves to the next member when one cannot be reached, so a replica keeps going while
any majority of the etcd cluster is up.

Keys, under `/zerostack/ledger/<cluster>/`:
- `genesis`: canonical JSON `{governor, validators}`, written once when the cluster is made;
- `block/<height, 12 digits>`: a block's canonical JSON (header, proposer's signature,
  transactions), created with a transaction that succeeds only if the key does not exist
  (compare `create_revision == 0`): exactly one block per height ever enters the log;
- `sig/<height, 12 digits>/<validator key>`: a validator's signature over that block's hash.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
from etcd3gw import exceptions as etcd_errors

from zerostack.ledger.errors import LedgerError

log = logging.getLogger("zerostack.ledger.etcd")

HEIGHT_DIGITS = 12
MAX_URLS = 16
_RETRYABLE = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
              etcd_errors.InternalServerError)


def parse_urls(urls: str | list[str]) -> list[str]:
    """`http://h:p[,http://h:p…]` as a list; LedgerError when malformed."""
    items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls)]
    items = [u for u in items if u]
    if not items or len(items) > MAX_URLS:
        raise LedgerError(f"--etcd takes 1 to {MAX_URLS} URLs")
    for u in items:
        parts = urlsplit(u)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise LedgerError(f"etcd URL {u[:80]!r} is not http://HOST:PORT")
    return items


def height_key(height: int) -> str:
    return f"{height:0{HEIGHT_DIGITS}d}"


class EtcdLog:
    """The keys of one ledger cluster in etcd, reached through any live member."""

    def __init__(self, urls: str | list[str], cluster: str = "default", *,
                 timeout: float = 3.0) -> None:
        if not cluster.replace("-", "").isalnum() or len(cluster) > 64:
            raise LedgerError(f"cluster name {cluster[:80]!r}: letters, digits and '-' only")
        self.urls = parse_urls(urls)
        self.prefix = f"/zerostack/ledger/{cluster}/"
        self._clients = []
        for u in self.urls:
            parts = urlsplit(u)
            self._clients.append(etcd3gw.Etcd3Client(
                host=parts.hostname or "", port=parts.port or 2379, timeout=timeout,
                api_path="/v3/"))
        self._current = 0
        self._lock = threading.Lock()

    # ---- failover ---------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(client)` on the current member, then on the others in turn."""
        errors = []
        start = self._current
        for i in range(len(self._clients)):
            k = (start + i) % len(self._clients)
            try:
                result = fn(self._clients[k])
            except _RETRYABLE as exc:
                errors.append(f"{self.urls[k]}: {str(exc)[:120]}")
                continue
            except etcd_errors.Etcd3Exception as exc:
                raise LedgerError(f"etcd {what}: {str(exc)[:200]}", code="unavailable",
                                  status=503) from exc
            if k != start:
                with self._lock:
                    self._current = k
            return result
        raise LedgerError(f"etcd {what}: no member answers ({'; '.join(errors)})",
                          code="unavailable", status=503)

    # ---- keys -------------------------------------------------------------------------

    def get(self, name: str) -> bytes | None:
        key = self.prefix + name
        values = self._call(f"get {name}", lambda c: c.get(key))
        return bytes(values[0]) if values else None

    def create(self, name: str, value: bytes) -> bool:
        """Write `name` only if it does not exist; True when this call wrote it. (A member
        lost mid-call is retried on another, which then finds the key: the caller compares
        the value to tell its own write from another's.)"""
        key = self.prefix + name
        return bool(self._call(f"create {name}", lambda c: c.create(key, value)))

    def put(self, name: str, value: bytes) -> None:
        key = self.prefix + name
        self._call(f"put {name}", lambda c: c.put(key, value))

    def range(self, start: str, end: str, limit: int = 0, *,
              serializable: bool = False) -> list[tuple[str, bytes]]:
        """Keys `start` <= key < `end` (names under the prefix), in key order.
        `serializable`: answered by the member from its own copy, without a round through
        the leader (possibly a little behind: fine for what is read again anyway)."""
        first, last = self.prefix + start, self.prefix + end
        rows = self._call(f"range {start}", lambda c: c.get(
            first, metadata=True, range_end=last, limit=limit or None,
            sort_order="ascend", sort_target="key", serializable=serializable or None))
        cut = len(self.prefix)
        return [(meta["key"].decode()[cut:], bytes(value)) for value, meta in rows]

    def members(self) -> list[dict[str, Any]]:
        """Each member's URL and whether it answers, with its leader and revision."""
        out = []
        for url, client in zip(self.urls, self._clients, strict=True):
            try:
                st = client.status()
                out.append({"url": url, "up": True, "leader": st.get("leader") == st.get(
                    "header", {}).get("member_id"), "revision": int(st["header"]["revision"])})
            except (etcd_errors.Etcd3Exception, KeyError, ValueError) as exc:
                out.append({"url": url, "up": False, "error": str(exc)[:120]})
        return out

    # ---- watch ------------------------------------------------------------------------

    def watch(self, on_event: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Call `on_event()` whenever a key of the cluster changes, from a thread that
        follows the prefix with an etcd watch and moves to another member when the one it
        watches fails; `stop_watch()` ends it. (A missed event costs only latency: the
        replica also reads the log on a timer.)"""

        def run() -> None:
            k = 0
            while not stop.is_set():
                client = self._clients[k % len(self._clients)]
                k += 1
                try:
                    events, cancel = client.watch_prefix(self.prefix)
                except etcd_errors.Etcd3Exception:
                    stop.wait(0.3)
                    continue
                self._cancel = cancel
                try:
                    for _event in events:
                        on_event()
                        if stop.is_set():
                            break
                except Exception:
                    pass
                finally:
                    cancel()
                stop.wait(0.2)

        self._stop = stop
        thread = threading.Thread(target=run, name="etcd-watch", daemon=True)
        thread.start()
        return thread

    def stop_watch(self) -> None:
        stop, cancel = getattr(self, "_stop", None), getattr(self, "_cancel", None)
        if stop is not None:
            stop.set()
        if cancel is not None:
            with contextlib.suppress(Exception):
                cancel()
