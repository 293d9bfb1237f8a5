"""Automatic failover of a Zero-DB replica set on etcd (`--failover-etcd`).

Keys, under `/zerostack/zdb/<replica set>/`:

- `primary`: `{"address": HOST:PORT, "term": N}`, attached to the lease of the node that
  holds it. Only the holder may accept writes. It is taken with a transaction that succeeds
  only while the key does not exist (compare `create_revision == 0`), so there is at most
  one holder at a time; it disappears when the holder's lease expires or is revoked.
- `node/<address>`: each live node's candidacy (`log_term`, `progress`: how much of the
  log it holds), attached to its own lease, written when it campaigns.

Every node keeps one lease of `ttl` seconds alive (a keepalive every ttl/5). The holder
accepts writes only until `sent + ttl - margin`, where `sent` is when it sent its last
keepalive that etcd answered (a CLOCK_BOOTTIME reading, which also counts a suspended
machine); etcd keeps the lease at least `ttl` after it received that keepalive, which is
later. So the holder has stopped writing before etcd can drop its key, and nobody else can
take the key before that.

When the key is gone, every live node that is not a writing primary campaigns: it writes
its candidacy, waits `GATHER` seconds for the others', and ranks the live candidacies by
log term, then progress, then address. The first takes the key at once; the k-th waits
k * `STAGGER` seconds first (in case the better ones are gone or fail). The node that took
the key promotes itself through the ordinary vote (ReplicationRole.promote, never FORCE):
terms and fencing apply as for a PROMOTE by hand, and a majority must agree. When the vote
fails it gives the key back and waits before trying again.

etcd is reached through etcd3gw (as the ledger does), whose calls block: they run in this
module's own worker threads, each with a timeout, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from zerostack.zdb.replication.role import ReplicationRole

log = logging.getLogger("zerostack.zdb")

MAX_URLS = 16
DEFAULT_TTL = 2
DEFAULT_MARGIN = 0.5
GATHER = 0.25      # seconds a candidate waits for the others' candidacies
POLL = 0.5         # seconds between reads of the key when the watch says nothing
TICK = 0.05        # seconds between steps of the keeper
WATCH_IDLE = 10.0  # seconds without a watch message before the stream is opened again
KEY_CHECK = 1.0    # seconds between a holder's checks that the key is still its own
MAX_VALUE = 4096   # bytes of a key's value this module reads
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ADDRESS = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,300}$")


class FailoverError(Exception):
    """etcd cannot be reached, or answered something this module cannot use."""


def clock() -> float:
    """Seconds on a clock that never goes back and also runs while the machine sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def parse_urls(text: str) -> list[str]:
    """`http://HOST:PORT[,http://HOST:PORT...]` as a list; FailoverError when malformed."""
    items = [u.strip() for u in text.split(",") if u.strip()]
    if not items or len(items) > MAX_URLS:
        raise FailoverError(f"--failover-etcd takes 1 to {MAX_URLS} URLs")
    for u in items:
        try:
            parts = urlsplit(u)
            port = parts.port
        except ValueError:
            port = None
            parts = urlsplit("")
        if parts.scheme != "http" or not parts.hostname or not port or parts.path not in ("", "/"):
            raise FailoverError(f"--failover-etcd: {u[:80]!r} is not http://HOST:PORT")
    return items


@dataclass
class FailoverConfig:
    """`--failover-etcd` and its timing."""

    urls: list[str]
    ttl: int = DEFAULT_TTL          # seconds of the etcd lease
    margin: float = DEFAULT_MARGIN  # seconds the holder stops writing before the lease ends
    name: str = "default"           # the replica set's name: the keys' prefix

    def check(self) -> None:
        parse_urls(",".join(self.urls))
        if not 2 <= self.ttl <= 300:
            raise FailoverError("--failover-ttl must be 2 to 300 seconds (etcd grants no "
                                "lease shorter than 2 s with its default timing)")
        if not 0.1 <= self.margin < self.ttl / 2:
            raise FailoverError("--failover-margin must be at least 0.1 s and less than half "
                                "of --failover-ttl")
        if not NAME.match(self.name):
            raise FailoverError("--failover-name: 1 to 64 letters, digits, '-' or '_'")

    @property
    def keepalive_every(self) -> float:
        return self.ttl / 5

    @property
    def stagger(self) -> float:
        return max(1.0, self.ttl / 2)


def _b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def _unb64(value: str) -> bytes:
    return base64.b64decode(value[: MAX_VALUE * 2])


@dataclass
class Holder:
    """Who holds the primary key."""

    address: str
    term: int


def _holder(raw: bytes) -> Holder | None:
    try:
        data = json.loads(raw[:MAX_VALUE])
        address, term = str(data["address"])[:300], int(data["term"])
    except (ValueError, KeyError, TypeError):
        return None
    if not ADDRESS.match(address) or term < 0:
        return None
    return Holder(address, term)


class Etcd:
    """One connection per etcd member through etcd3gw, moving to the next member when one
    does not answer; every call blocks (run it in a worker thread) at most `timeout`."""

    def __init__(self, urls: list[str], timeout: float) -> None:
        import etcd3gw
        from etcd3gw import exceptions as etcd_errors

        self.urls = urls
        self.errors = etcd_errors
        self.clients = []
        for u in urls:
            parts = urlsplit(u)
            self.clients.append(etcd3gw.Etcd3Client(host=parts.hostname or "",
                                                    port=parts.port or 2379, timeout=timeout,
                                                    api_path="/v3/"))
        self.current = 0

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for i in range(len(self.clients)):
            k = (self.current + i) % len(self.clients)
            client = self.clients[k]
            try:
                result = client.post(client.get_url(path), json=body)
            except (self.errors.ConnectionFailedError, self.errors.ConnectionTimeoutError,
                    self.errors.InternalServerError) as exc:
                problems.append(f"{self.urls[k]}: {type(exc).__name__}")
                continue
            except self.errors.Etcd3Exception as exc:
                raise FailoverError(f"etcd {path}: {str(exc)[:200]}") from exc
            except ValueError as exc:  # not JSON
                raise FailoverError(f"etcd {path}: unreadable answer") from exc
            self.current = k
            if not isinstance(result, dict):
                raise FailoverError(f"etcd {path}: unexpected answer")
            return result
        raise FailoverError(f"etcd unreachable ({'; '.join(problems)[:300]})")


class EtcdFailover:
    """The etcd side of one server: its lease, the primary key, candidacies, the watch."""

    def __init__(self, role: ReplicationRole, config: FailoverConfig) -> None:
        self.role = role
        self.config = config
        self.key = f"/zerostack/zdb/{config.name}/primary"
        self.nodes = f"/zerostack/zdb/{config.name}/node/"
        timeout = max(0.3, min(1.0, config.ttl / 4))
        # Separate connections (and threads) for the lease and for the rest: a slow read
        # never delays a keepalive.
        self._lease_etcd = Etcd(config.urls, timeout)
        self._etcd = Etcd(config.urls, timeout)
        self._lease_pool = ThreadPoolExecutor(1, thread_name_prefix="zdb-etcd-lease")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="zdb-etcd")
        self.lease_id = 0
        self.lease_sent = 0.0   # clock() when the last answered keepalive (or grant) was sent
        self.lease_ttl = 0
        self.holding: str = ""  # the value of the primary key while this node holds it
        self.holder: Holder | None = None  # as last read
        self.seen_holder = False
        self.started = clock()
        self.backoff_until = 0.0
        self.etcd_error = ""
        self.failovers = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_stop = threading.Event()
        self._watch_reply: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._keep()), self._loop.create_task(self._run())]
        threading.Thread(target=self._watch, name="zdb-etcd-watch", daemon=True).start()

    async def stop(self) -> None:
        # no write from here on, then give the key back (below) for a quick takeover
        self.role.set_lease_gate(0.0, "this server is stopping")
        self.holding = ""
        self._watch_stop.set()
        reply = self._watch_reply
        if reply is not None:
            with contextlib.suppress(Exception):
                reply.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.lease_id:  # give the key back at once rather than after the TTL
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(self._lease_pool, self._lease_etcd,
                                                  "/kv/lease/revoke", {"ID": self.lease_id}),
                                       1.0)
        self._pool.shutdown(wait=False)
        self._lease_pool.shutdown(wait=False)

    async def _call(self, pool: ThreadPoolExecutor, etcd: Etcd, path: str,
                    body: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, etcd.post, path, body)

    async def _kv(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self._pool, self._etcd, path, body)

    # -- the lease ------------------------------------------------------------------------

    async def _keep(self) -> None:
        """Grant the lease, keep it alive, and keep the write gate in step with it."""
        while True:
            try:
                if not self.lease_id:
                    await self._grant()
                elif clock() - self.lease_sent >= self.config.keepalive_every:
                    await self._keepalive()
                if self.etcd_error:
                    log.info("event=zdb.failover.etcd_back")
                    self.etcd_error = ""
            except FailoverError as exc:
                if not self.etcd_error:
                    log.warning("event=zdb.failover.etcd_error error=\"%s\"",
                                str(exc).replace('"', "'"))
                self.etcd_error = str(exc)
                await asyncio.sleep(self.config.keepalive_every / 2)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the keepalives: the gate closes meanwhile
                log.exception("event=zdb.failover.keepalive_failed")
                await asyncio.sleep(self.config.keepalive_every / 2)
            self.gate()
            await asyncio.sleep(TICK)

    async def _grant(self) -> None:
        sent = clock()
        result = await self._call(self._lease_pool, self._lease_etcd, "/lease/grant",
                                  {"TTL": self.config.ttl, "ID": 0})
        try:
            self.lease_id, self.lease_ttl = int(result["ID"]), int(result["TTL"])
        except (KeyError, ValueError) as exc:
            raise FailoverError(f"etcd lease grant: unexpected answer {result!r:.100}") from exc
        self.lease_sent = sent

    async def _keepalive(self) -> None:
        sent = clock()
        result = await self._call(self._lease_pool, self._lease_etcd, "/lease/keepalive",
                                  {"ID": self.lease_id})
        body = result.get("result", result)
        ttl = int(body.get("TTL", -1)) if isinstance(body, dict) else -1
        if ttl > 0:
            self.lease_sent, self.lease_ttl = max(self.lease_sent, sent), ttl
            return
        # etcd no longer has the lease: whatever was attached to it is gone.
        log.warning("event=zdb.failover.lease_lost lease=%x holding=%s", self.lease_id,
                    "yes" if self.holding else "no")
        self.lease_id = 0
        if self.holding:
            self.holding = ""
            role = self.role
            if role.replica is None and not role.fenced:
                role.fence("this primary's etcd lease expired (etcd was unreachable for "
                           f"{self.config.ttl} s or more): another node may have taken over")

    def deadline(self) -> float:
        """Until when this node may accept writes (0: not at all)."""
        if not self.holding or not self.lease_id:
            return 0.0
        return self.lease_sent + self.lease_ttl - self.config.margin

    def gate(self) -> None:
        """Open or close the role's writes according to the key and the lease."""
        role = self.role
        deadline = self.deadline()
        if deadline and clock() < deadline:
            role.set_lease_gate(deadline, "")
        elif self.holding:
            role.set_lease_gate(0.0, "its etcd lease was last renewed "
                                f"{clock() - self.lease_sent:.1f} s ago (etcd unreachable?); "
                                "writes resume when it is renewed, or another node takes over")
        elif self.holder is not None and self.holder.address != role.name:
            role.set_lease_gate(0.0, f"the etcd key of this replica set is held by "
                                f"{self.holder.address} (term {self.holder.term})")
        else:
            role.set_lease_gate(0.0, "this node does not hold the etcd key of its replica "
                                "set yet")

    # -- the key --------------------------------------------------------------------------

    def _watch(self) -> None:
        """Wake the main task whenever the primary key changes: a thread following etcd's
        watch stream (through etcd3gw's HTTP session), opened again after a failure or
        WATCH_IDLE seconds without a message. Missing an event costs only latency: the
        key is also read every POLL seconds."""
        import etcd3gw

        k = 0
        body = {"create_request": {"key": _b64(self.key)}}
        clients = []
        for u in self.config.urls:
            url = urlsplit(u)
            clients.append(etcd3gw.Etcd3Client(host=url.hostname or "", port=url.port or 2379,
                                               api_path="/v3/"))
        while not self._watch_stop.is_set():
            client = clients[k % len(clients)]
            k += 1
            try:
                with client.session.post(client.get_url("/watch"), json=body, stream=True,
                                         timeout=(1.0, WATCH_IDLE)) as reply:
                    self._watch_reply = reply
                    for line in reply.iter_content(chunk_size=None):
                        if self._watch_stop.is_set():
                            break
                        if b'"events"' in line[:MAX_VALUE * 4]:
                            loop = self._loop
                            if loop is not None and not loop.is_closed():
                                loop.call_soon_threadsafe(self._wake.set)
            except Exception:  # any failure of the stream: open another one
                pass
            self._watch_reply = None
            self._watch_stop.wait(0.2)

    async def _read(self) -> tuple[Holder | None, int]:
        """The holder of the primary key (None: nobody) and the store's revision."""
        result = await self._kv("/kv/range", {"key": _b64(self.key)})
        kvs = result.get("kvs") or []
        revision = int(result.get("header", {}).get("revision", 0))
        if not kvs:
            return None, revision
        return _holder(_unb64(kvs[0].get("value", ""))), revision

    async def _run(self) -> None:
        last_read = 0.0
        while True:
            try:
                woken = self._wake.is_set()
                self._wake.clear()
                role = self.role
                if role.replica is None and not role.fenced:
                    if not self.holding:
                        await self._acquire()
                    elif clock() - last_read >= KEY_CHECK:
                        last_read = clock()
                        await self._check_own()
                else:
                    if self.holding:
                        await self._release()
                    if woken or clock() - last_read >= POLL:
                        last_read = clock()
                        self.holder, _rev = await self._read()
                        if self.holder is None:
                            await self._campaign()
                        else:
                            self.seen_holder = True
                            self._follow_holder()
            except FailoverError as exc:
                self.etcd_error = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=zdb.failover.step_failed")
            self.gate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)

    def _value(self, term: int) -> str:
        return json.dumps({"address": self.role.name, "term": term}, sort_keys=True)

    async def _take(self, term: int) -> tuple[bool, Holder | None]:
        """Create the primary key for `term` with our lease if nobody holds it."""
        if not self.lease_id:
            return False, None
        value = self._value(term)
        key = _b64(self.key)
        result = await self._kv("/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE",
                         "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": _b64(value),
                                         "lease": self.lease_id}}],
            "failure": [{"request_range": {"key": key}}]})
        if result.get("succeeded"):
            self.holding = value
            self.holder = Holder(self.role.name, term)
            self.seen_holder = True
            return True, self.holder
        holder = None
        for response in result.get("responses") or []:
            kvs = (response.get("response_range") or {}).get("kvs") or []
            if kvs:
                holder = _holder(_unb64(kvs[0].get("value", "")))
        return False, holder

    async def _acquire(self) -> None:
        """A primary (of its term, not fenced) without the key: take it, or learn who has
        it; a newer holder fences this node and makes it follow."""
        role = self.role
        term = role.terms.term
        ok, holder = await self._take(term)
        self.holder = holder if not ok else self.holder
        if ok:
            log.warning("event=zdb.failover.key_taken term=%d address=%s", term, role.name)
            self.gate()
            return
        if holder is None:
            return
        if holder.term > role.terms.state.primary_term and holder.address != role.name:
            role.learn_term(holder.term, f"etcd (the primary at {holder.address})")
            self._follow_holder()

    async def _check_own(self) -> None:
        holder, _rev = await self._read()
        if holder is not None and holder.address == self.role.name:
            return
        # Deleted or replaced by hand: this node no longer holds it.
        log.warning("event=zdb.failover.key_lost holder=%s",
                    holder.address if holder else "-")
        self.holding = ""
        self.holder = holder

    async def _release(self) -> None:
        """No longer a writing primary (fenced, demoted): give the key back now."""
        lease, self.lease_id, self.holding = self.lease_id, 0, ""
        log.warning("event=zdb.failover.key_released lease=%x", lease)
        with contextlib.suppress(FailoverError):
            await self._call(self._lease_pool, self._lease_etcd, "/kv/lease/revoke",
                             {"ID": lease})

    def _follow_holder(self) -> None:
        """A fenced primary follows the node that holds the key in a newer term."""
        role, holder = self.role, self.holder
        if holder is None or holder.address == role.name or not role.fenced:
            return
        if holder.term <= role.terms.state.primary_term:
            return
        host, _sep, port = holder.address.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            role.follow(host.strip("[]"), int(port))

    # -- campaigns ------------------------------------------------------------------------

    def progress(self) -> int:
        """How much of the log this node holds: bytes over every namespace, a rewrite
        (compaction, FLUSH) of a namespace counting as more than any of its older files."""
        size = self.role.engine.config.datasize
        return sum((generation << 56) + fid * size + off
                   for generation, (fid, off) in self.role.positions().values())

    async def _campaign(self) -> None:
        role, cfg = self.role, self.config
        if not self.lease_id or role._promoting:
            return
        if not self.seen_holder and clock() - self.started < cfg.ttl:
            return  # a set starting: give its primary the time to take the key
        if clock() < self.backoff_until:
            return
        mine = {"address": role.name, "log_term": role.terms.state.log_term,
                "progress": self.progress()}
        await self._kv("/kv/put", {"key": _b64(self.nodes + role.name),
                                   "value": _b64(json.dumps(mine)), "lease": self.lease_id})
        await asyncio.sleep(GATHER)
        result = await self._kv("/kv/range", {"key": _b64(self.nodes),
                                              "range_end": _b64(self.nodes[:-1] + "0")})
        candidates: list[tuple[int, int, str]] = [
            (role.terms.state.log_term, self.progress(), role.name)]
        for kv in (result.get("kvs") or [])[:64]:
            try:
                data = json.loads(_unb64(kv.get("value", ""))[:MAX_VALUE])
                entry = (int(data["log_term"]), int(data["progress"]),
                         str(data["address"])[:300])
            except (ValueError, KeyError, TypeError):
                continue
            if entry[2] != role.name:
                candidates.append(entry)
        # the most advanced first: highest log term, then most progress, then address
        candidates.sort(key=lambda c: (-c[0], -c[1], c[2]))
        rank = next(i for i, c in enumerate(candidates) if c[2] == role.name)
        if rank:
            until = clock() + rank * cfg.stagger
            while clock() < until:
                await asyncio.sleep(0.1)
                holder, _rev = await self._read()
                if holder is not None:
                    self.holder, self.seen_holder = holder, True
                    self._follow_holder()
                    return
        started = clock()
        term = role.terms.term + 1
        ok, holder = await self._take(term)
        if not ok:
            self.holder = holder
            return
        log.warning("event=zdb.failover.campaign term=%d rank=%d candidates=%d", term, rank,
                    len(candidates))
        refused = await role.promote()
        if refused is None:
            self.failovers += 1
            actual = role.terms.term
            if actual != term and self.lease_id:  # the term moved on during the vote
                value = self._value(actual)
                with contextlib.suppress(FailoverError):
                    await self._kv("/kv/put", {"key": _b64(self.key), "value": _b64(value),
                                               "lease": self.lease_id})
                    self.holding, self.holder = value, Holder(role.name, actual)
            log.warning("event=zdb.failover.promoted term=%d seconds=%.3f", actual,
                        clock() - started)
            self.gate()
            return
        log.warning("event=zdb.failover.refused term=%d reason=\"%s\"", term,
                    refused.replace('"', "'")[:300])
        await self._give_back()
        self.backoff_until = clock() + cfg.stagger * len(candidates)

    async def _give_back(self) -> None:
        """Delete the primary key if it still holds our value."""
        value, self.holding = self.holding, ""
        if not value:
            return
        key = _b64(self.key)
        with contextlib.suppress(FailoverError):
            await self._kv("/kv/txn", {
                "compare": [{"key": key, "result": "EQUAL", "target": "VALUE",
                             "value": _b64(value)}],
                "success": [{"request_delete_range": {"key": key}}], "failure": []})

    # -- INFO -----------------------------------------------------------------------------

    def info_lines(self) -> list[str]:
        deadline = self.deadline()
        holder = self.holder
        lines = [f"failover: etcd name={self.config.name} ttl={self.config.ttl} "
                 f"margin={self.config.margin}",
                 f"etcd_key_holder: {holder.address + ' term ' + str(holder.term) if holder else '-'}",
                 f"etcd_holding: {'yes' if self.holding else 'no'}",
                 f"etcd_write_seconds_left: {max(0.0, deadline - clock()) if deadline else 0:.3f}",
                 f"etcd_lease_age: {clock() - self.lease_sent if self.lease_id else -1:.3f}",
                 f"failovers: {self.failovers}"]
        if self.etcd_error:
            lines.append(f"etcd_error: {self.etcd_error[:200]}")
        return lines
