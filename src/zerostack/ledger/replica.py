"""A ledger replica: one of several servers that share one transaction order through etcd.

Every replica is a validator (its key is in the ledger's validator set) and keeps its own
SQLite log. The shared order is the sequence of `block/<height>` keys in etcd:

- **Proposing.** A replica applies the transactions it receives to a pending block on top
  of the last block it materialized, cuts it, signs its header, and writes it to etcd
  with a compare-and-swap that succeeds only if no block has that height yet. Once the
  write succeeded the block is durably ordered (an etcd majority has it): the replica
  writes it to its SQLite file and answers the submissions. If another replica's block
  took the height, the replica materializes that block first, then re-applies its own
  transactions on top of it (a transaction that no longer applies, a nonce used by the
  other block say, is refused to its client, never applied twice).
- **Following.** Each replica reads the blocks it does not have yet from etcd (woken by an
  etcd watch, and on a timer), re-executes every transaction, checks every signature and
  that the header it computes is the one the proposer signed, and writes the block to
  its SQLite file. So every replica holds the same blocks, with the same hashes. A block
  that does not check out stops the replica: it never signs or serves it.
- **Finality.** After materializing a block a replica signs its hash and publishes the
  signature under `sig/<height>/<key>`. Replicas collect the signatures of the validators
  and store them with the block; a block is final once more than two thirds of the
  validator set in force for it signed it. Queries, `/head` and the event feed show only
  final blocks: what a consumer reads is what a quorum of validators vouched for.

A replica whose SQLite history was rewritten is caught at two places: at start-up
(`replay` checks every block against its own signatures and checkpoint, and then the
blocks against the log in etcd), and by every consumer, since its headers are no longer
the ones the other validators signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from zerostack.crypto import Identity, canonical_json
from zerostack.ledger.block import Block, BlockSignature, Checkpoint, parse_signatures, tx_root
from zerostack.ledger.chain import BadBlock
from zerostack.ledger.errors import LedgerError, LedgerRejected, Rejected
from zerostack.ledger.etcd import EtcdLog, height_key
from zerostack.ledger.records import genesis
from zerostack.ledger.service import LedgerService, _encodable, _verify_chunk
from zerostack.ledger.state import Receipt, State, apply_with_receipt, sender_key, tick
from zerostack.ledger.store import BlockLog
from zerostack.ledger.tx import Tx, parse_tx, sign_tx
from zerostack.ledger.validators import is_final, quorum, signed_by

log = logging.getLogger("zerostack.ledger.replica")

MAX_BLOCK_BYTES = 1 << 20
"""Most bytes of transactions one block carries (etcd refuses requests over its limit,
1.5 MiB by default); the rest waits for the next block."""
POLL = 0.25
"""Seconds between reads of the log when no watch event came."""
FINAL_WAIT = 3.0
"""Seconds a submission waits for its block to be final before it is answered as ordered
only (`final: false`): while too few validators are up, the cluster keeps accepting."""
AUDIT_EVERY = 2.0
"""Seconds between checks of the signatures published for recent final blocks."""
AUDIT_BLOCKS = 256
"""How many of the last final blocks those checks cover."""
MAX_SIG_ROWS = 20000
"""Most signature rows one read takes from etcd (the rest is read next time)."""
MAX_UNFINAL = 4096
MAX_PENDING = 20_000
"""Transactions waiting for a block on one replica: beyond, submissions get 503 (while
no block can be ordered or made final, nothing else would bound them)."""
"""Blocks materialized but not final yet that a replica keeps in memory; past it, it
stops proposing until signatures catch up."""
REPUBLISH_BLOCKS = AUDIT_BLOCKS
"""At start, how many of the last blocks of its file a replica checks for its own
signature in etcd (publishing it again where it is missing): a replica killed between
writing a block to its file and publishing its signature would otherwise leave that block
short of a quorum on every other replica, for ever."""


@dataclass(frozen=True, slots=True)
class Genesis:
    """What every replica of one cluster starts from: the governing key (for the pricing
    policy) and the genesis validator set."""

    governor: str
    validators: tuple[str, ...]

    def to_json(self) -> bytes:
        return canonical_json({"governor": self.governor, "validators": list(self.validators)})

    @classmethod
    def from_json(cls, data: bytes) -> Genesis:
        try:
            doc = orjson.loads(data)
            return cls(str(doc["governor"]), tuple(str(v) for v in doc["validators"]))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise LedgerError(f"the cluster's genesis in etcd is malformed: {exc}") from None

    def state(self) -> State:
        return genesis(self.governor, tuple(sorted(self.validators)))


def init_cluster(etcd: EtcdLog, validators: list[str], governor: str | None = None) -> Genesis:
    """Write the cluster's genesis into etcd unless it is there; return the one in force
    (a second init with another set does not change it)."""
    if not validators:
        raise LedgerError("a cluster needs at least one validator")
    wanted = Genesis(governor or validators[0], tuple(sorted(set(validators))))
    etcd.create("genesis", wanted.to_json())
    data = etcd.get("genesis")
    if data is None:
        raise LedgerError("the cluster's genesis vanished from etcd")
    return Genesis.from_json(data)


@dataclass
class _Entry:
    tx: Tx
    receipt: Receipt
    state: State  # the pending state after this transaction
    size: int
    future: asyncio.Future[dict[str, Any]]
    key: str | None  # the key its signature was checked against


@dataclass
class _Unfinal:
    block: Block
    receipts: list[Receipt]
    state: State  # after the block
    signatures: dict[str, BlockSignature] = field(default_factory=dict)


class ReplicaService(LedgerService):
    """A LedgerService whose blocks are ordered through etcd and made final by a quorum
    of validators (see the module docstring). The HTTP API is the same."""

    def __init__(self, blocklog: BlockLog, identity: Identity, etcd: EtcdLog,
                 *, clock: Callable[[], float] = _time.time, verify_threads: int | None = None,
                 wait_genesis: float = 30.0, policy: dict[str, Any] | None = None) -> None:
        self.etcd = etcd
        self.identity = identity
        self.genesis = self._read_genesis(etcd, wait_genesis)
        if policy is not None:
            if identity.public_hex != self.genesis.governor:
                raise LedgerError(
                    "--policy/--dev-faucet: only the replica of the governing key (the "
                    f"cluster's first validator, {self.genesis.governor[:16]}…) submits the "
                    "first pricing policy; change it later with `zerostack ledger policy`",
                    code="invalid")
            # checked now, so that a malformed policy stops the replica at its start
            parse_tx(sign_tx(identity, "grid.policy", identity.public_hex, 0, policy))
        self._policy = policy
        self._policy_task: asyncio.Task[None] | None = None
        start = self.genesis.state()
        super().__init__(blocklog, identity, clock=clock, verify_threads=verify_threads,
                         start=start)
        if identity.public_hex not in start.validators and self.chain.height == 0:
            log.warning("event=not_a_validator key=%s", identity.public_hex)
        # the materialized tip: what this replica's SQLite holds
        self.mat_height, self.mat_hash, self.mat_time = (self.chain.height, self.chain.hash,
                                                        self.chain.time)
        self.mat_state = self.chain.state
        self._unfinal: dict[int, _Unfinal] = {}
        self._states: dict[int, State] = {self.mat_height: self.mat_state}
        self.final_height = self.mat_height
        # the pending block, on top of `_tip` (the materialized tip, or a proposal in flight)
        self._pending: list[_Entry] = []
        self._pend_time = 0
        self._pend_base: State | None = None
        self._pend_on: tuple[int, str] = (-1, "")  # the tip the pending block builds on
        self._proposal: tuple[Block, list[_Entry]] | None = None
        self._acks: dict[int, list[_Entry]] = {}
        self._publishing: set[asyncio.Task[None]] = set()
        self._republish: asyncio.Task[None] | None = None
        self._driver: asyncio.Task[None] | None = None
        self._watch_stop = threading.Event()
        self.stats = {"proposed": 0, "lost": 0, "followed": 0, "refused_on_rebase": 0}
        self.disagree: dict[str, int] = {}
        """Validators whose signature at some height is not over this replica's block."""
        self._recent_hashes: dict[int, str] = {}
        self._audited = 0.0
        self._check_against_etcd()

    @staticmethod
    def _read_genesis(etcd: EtcdLog, wait: float) -> Genesis:
        deadline = _time.monotonic() + wait
        while True:
            try:
                data = etcd.get("genesis")
            except LedgerError:
                data = None
            if data is not None:
                return Genesis.from_json(data)
            if _time.monotonic() > deadline:
                raise LedgerError(f"no ledger cluster genesis in etcd under {etcd.prefix} "
                                  "(make it with `zerostack ledger cluster init`)")
            _time.sleep(0.2)

    def _check_against_etcd(self) -> None:
        """Every block of the SQLite file must be the one the cluster ordered at its height:
        a file whose history was rewritten (even re-signed whole by this replica's key)
        does not match the blocks in etcd and is refused."""
        if self.mat_height == 0:
            return
        height = 1
        while height <= self.mat_height:
            rows = self.etcd.range("block/" + height_key(height),
                                   "block/" + height_key(min(height + 255, self.mat_height) + 1))
            if not rows:
                raise BadBlock(height, "the cluster's log in etcd has no block at this height")
            for name, data in rows:
                h = _block_height(name)
                if h is None:
                    continue
                if h != height:
                    raise BadBlock(height, "the cluster's log in etcd has no block at this "
                                   "height")
                height += 1
                stored = self.log.block(h)
                if stored is None or _header_hash_of(data) != stored.hash:
                    raise BadBlock(h, "this file's block differs from the one the cluster "
                                   "ordered at this height (its history was rewritten)")
            if not any(_block_height(n) for n, _ in rows):
                raise BadBlock(height, "the cluster's log in etcd has no block at this height")

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loop = self._loop

        def woken() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

        self.etcd.watch(woken, self._watch_stop)
        # signatures of the blocks this file holds that were not final when it stopped
        await self._load_unfinal_tail()
        if self.mat_height > 0:
            # and its own signatures of the last blocks, in case it stopped before
            # publishing some (in the background: following must not wait for it)
            low = max(1, min(self.final_height + 1, self.mat_height) - REPUBLISH_BLOCKS + 1)
            self._republish = asyncio.create_task(
                self._republish_own(low, self.mat_height), name="ledger-republish")
        try:
            await self._collect_signatures()
        except LedgerError as exc:  # etcd not reachable yet: the driver tries again
            log.warning("event=replica_etcd_error error=%r", str(exc)[:300])
        self._driver = asyncio.create_task(self._drive(), name="ledger-replica")
        if self._policy is not None:
            self._policy_task = asyncio.create_task(self._submit_policy(self._policy),
                                                    name="ledger-policy")

    async def _submit_policy(self, policy: dict[str, Any]) -> None:
        """Give a cluster without a pricing policy its first one: a `grid.policy`
        transaction signed with this replica's key (the governing key), ordered through
        etcd like any other, so every replica applies it. A cluster that has one keeps it
        (dev_faucet must agree: it is fixed by the first policy)."""
        while not self._closing and not self._broken:
            state = self._pending[-1].state if self._pending else self._open_state()
            if state.policy is not None:
                if bool(policy.get("dev_faucet")) != state.policy.dev_faucet:
                    log.error("event=policy_refused reason=%r", "the cluster has "
                              f"dev_faucet={state.policy.dev_faucet}, fixed by its first policy")
                return
            raw = sign_tx(self.identity, "grid.policy", self.identity.public_hex,
                          state.governor_nonce, policy)
            try:
                (result,) = await self.submit([raw])
            except LedgerError as exc:  # etcd or quorum not there yet: try again
                log.warning("event=policy_retry error=%r", str(exc)[:300])
                await asyncio.sleep(1.0)
                continue
            if "code" in result and result["code"] != "conflict":
                log.error("event=policy_refused reason=%r", str(result.get("error"))[:300])
                return
            if "code" not in result:
                log.info("event=policy_submitted height=%s final=%s", result.get("height"),
                         result.get("final"))
                return
            await asyncio.sleep(0.5)  # a nonce taken meanwhile: read the state again

    async def stop(self) -> None:
        self._closing = True
        self._wake.set()
        if self._policy_task is not None and not self._policy_task.done():
            self._policy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LedgerError):
                await self._policy_task
        if self._driver is not None:
            try:
                await asyncio.wait_for(self._driver, timeout=15)
            except (TimeoutError, asyncio.CancelledError):
                log.error("event=replica_stuck_at_shutdown")
        # signatures still being published: given a moment (those left are published
        # again at the next start)
        background = [*self._publishing, *([self._republish] if self._republish else [])]
        if background:
            await asyncio.wait(background, timeout=5)
            for task in background:
                task.cancel()
        self.etcd.stop_watch()
        for height, entries in self._acks.items():  # ordered in etcd: durable, answer them
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_result({"hash": entry.tx.hash_hex, "final": False,
                                             "receipt": entry.receipt, "height": height})
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(LedgerError(
                    "the ledger stopped before ordering this transaction", code="unavailable",
                    status=503))
        self._executor.shutdown(wait=False)
        self.log.close()

    # ---- submission -------------------------------------------------------------------

    async def submit(self, raws: list[Any]) -> list[dict[str, Any]]:
        if self._broken or self._closing:
            why = self._broken or "it is shutting down"
            raise LedgerError(f"the ledger stopped accepting transactions: {why}",
                              code="unavailable", status=503)
        if self.identity.public_hex not in self.mat_state.validators:
            # only validators propose blocks: a client moves on to another replica
            raise LedgerError("this replica follows the ledger but is not a validator: "
                              "submit to another replica", code="unavailable", status=503)
        if len(self._pending) >= MAX_PENDING:
            raise LedgerError(f"{len(self._pending)} transactions wait for a block here: "
                              "try again shortly or submit to another replica",
                              code="unavailable", status=503)
        results: list[dict[str, Any]] = [{} for _ in raws]
        parsed: list[tuple[int, Tx]] = []
        for i, raw in enumerate(raws):
            try:
                tx = parse_tx(raw)
            except LedgerRejected as exc:
                results[i] = {"error": str(exc), "code": exc.code}
                continue
            if not _encodable(tx):
                results[i] = {"error": "transaction cannot be encoded inside a block",
                              "code": "invalid"}
                continue
            parsed.append((i, tx))
        base = self._pending[-1].state if self._pending else self._open_state()
        keys = [sender_key(base, tx) for _, tx in parsed]
        checks = await asyncio.get_running_loop().run_in_executor(
            self._executor, _verify_chunk, [tx for _, tx in parsed], keys)
        if self._closing or self._broken:
            raise LedgerError("the ledger stopped accepting transactions", code="unavailable",
                              status=503)
        waiting: list[tuple[int, asyncio.Future[dict[str, Any]]]] = []
        for (i, tx), ok, key in zip(parsed, checks, keys, strict=True):
            result = self._add(tx, verified=ok is True, key=key)
            if isinstance(result, Rejected):
                results[i] = {"hash": tx.hash_hex, **result.to_dict()}
            else:
                waiting.append((i, result))
        if waiting:
            self._wake.set()
            for i, future in waiting:
                results[i] = await asyncio.shield(future)
        return results

    def _tip(self) -> tuple[int, str, int, State]:
        """Height, hash, time and state the pending block builds on."""
        if self._proposal is not None:
            block, entries = self._proposal
            return block.height, block.hash, block.time, (
                entries[-1].state if entries else self._pend_base or self.mat_state)
        return self.mat_height, self.mat_hash, self.mat_time, self.mat_state

    def _open_state(self) -> State:
        """The state a new pending block starts from: the tip's, at the block's time. It
        is recomputed whenever the tip moved since (a block followed from etcd while a
        submission was being verified), so nothing is ever applied to a stale state."""
        tip_height, tip_hash, tip_time, tip_state = self._tip()
        if self._pend_base is None or (not self._pending
                                       and self._pend_on != (tip_height, tip_hash)):
            self._pend_time = max(tip_time, int(self.clock()))
            self._pend_base = tick(tip_state, self._pend_time)
            self._pend_on = (tip_height, tip_hash)
        return self._pend_base

    def _add(self, tx: Tx, *, verified: bool, key: str | None,
             future: asyncio.Future[dict[str, Any]] | None = None,
             ) -> asyncio.Future[dict[str, Any]] | Rejected:
        base = self._pending[-1].state if self._pending else self._open_state()
        # the signature was checked against `key`, read from an earlier state: it counts
        # only while the sender still has that key here (a rebase may move twin ids)
        verified = verified and key is not None and sender_key(base, tx) == key
        result = apply_with_receipt(base, tx, time=self._pend_time, verified=verified)
        if isinstance(result, Rejected):
            return result
        state, receipt = result
        if future is None:
            future = asyncio.get_running_loop().create_future()
        size = len(orjson.dumps(tx.to_wire()))
        self._pending.append(_Entry(tx, receipt, state, size, future, key))
        return future

    # ---- the driver: follow, propose, collect signatures --------------------------------

    async def _drive(self) -> None:
        while True:
            if not self._closing or not self._pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=POLL)
            self._wake.clear()
            try:
                await self._follow()
                await self._collect_signatures()
                if _time.monotonic() - self._audited > AUDIT_EVERY:
                    await self._audit()
                proposer = self.identity.public_hex in self.mat_state.validators
                if self._pending and proposer and len(self._unfinal) < MAX_UNFINAL:
                    await self._propose()
                elif (proposer and not self._pending and not self._closing
                      and self._deadline_due()):
                    await self._propose(empty=True)
                elif self._pending and not proposer:  # removed from the set meanwhile
                    pending, self._pending, self._pend_base = self._pending, [], None
                    for entry in pending:
                        if not entry.future.done():
                            entry.future.set_exception(LedgerError(
                                "this replica is no longer a validator: submit to another "
                                "replica", code="unavailable", status=503))
            except BadBlock as exc:
                self._fail(f"the cluster's log does not check out: {exc}")
                return
            except LedgerError as exc:  # etcd unreachable: try again soon
                log.warning("event=replica_etcd_error error=%r", str(exc)[:300])
                await asyncio.sleep(0.2)
            except Exception as exc:  # the driver must not die silently
                log.exception("event=replica_driver_error error=%r", str(exc)[:300])
                await asyncio.sleep(0.2)
            if self._closing and not self._pending:
                return

    def _fail(self, why: str) -> None:
        self._broken = why
        log.error("event=replica_stopped reason=%r", why)
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(LedgerError(
                    f"the ledger stopped accepting transactions: {why}", code="unavailable",
                    status=503))
        self._pending = []

    def _deadline_due(self) -> bool:
        s, now = self.mat_state, int(self.clock())
        return (s.next_deadline < now or s.next_grace < now
                or (s.next_bill <= now and bool(s.billable)))

    async def _propose(self, *, empty: bool = False) -> None:
        if self._pending and self._pend_on != (self.mat_height, self.mat_hash):
            # built on another tip than the one the block goes on: apply it again first
            pending, self._pending, self._pend_base = self._pending, [], None
            self._rebase(pending)
            return
        if empty:
            self._open_state()
        taken: list[_Entry] = []
        size = 0
        for entry in self._pending:
            if taken and size + entry.size > MAX_BLOCK_BYTES:
                break
            taken.append(entry)
            size += entry.size
        base = self._pend_base
        assert base is not None
        state = taken[-1].state if taken else base
        block = Block.build(self.mat_height + 1, self.mat_hash, self._pend_time,
                            [e.tx for e in taken]).signed(self.identity)
        data = block.encode()
        self._proposal = (block, taken)
        # what stays pending builds on this proposal
        self._pending = self._pending[len(taken):]
        self._pend_base = state if self._pending else None
        self._pend_on = (block.height, block.hash)
        name = "block/" + height_key(block.height)
        try:
            ours = await asyncio.to_thread(self.etcd.create, name, data)
            if not ours:
                # another member may have applied our first attempt before failing over
                ours = await asyncio.to_thread(self.etcd.get, name) == data
        except LedgerError:
            ours = False
            with contextlib.suppress(LedgerError):
                ours = await asyncio.to_thread(self.etcd.get, name) == data
            if not ours:
                self._proposal = None
                self._rebase(taken)
                raise
        self._proposal = None
        if ours:
            self.stats["proposed"] += 1
            # answered once final here (ordered in etcd and signed by a quorum), so the
            # client reads its own write from this replica's queries at once
            self._acks[block.height] = taken
            loop = asyncio.get_running_loop()
            loop.call_later(FINAL_WAIT, self._answer_ordered, block.height)
            await self._materialize(block, [e.receipt for e in taken], state, proposed=True)
            return
        self.stats["lost"] += 1
        await self._follow()
        self._rebase(taken)

    def _answer_ordered(self, height: int) -> None:
        """Block `height` is ordered in etcd (durable) but still not final after
        FINAL_WAIT (validators are down): answer its submissions anyway, marked not final."""
        for entry in self._acks.pop(height, ()):
            if not entry.future.done():
                entry.future.set_result({"hash": entry.tx.hash_hex, "receipt": entry.receipt,
                                         "height": height, "final": False})

    def _rebase(self, lost: list[_Entry]) -> None:
        """Re-apply, on the materialized tip, the transactions of a lost proposal and
        everything pending after them; refuse to their clients those that no longer apply."""
        entries = lost + self._pending
        self._pending, self._pend_base = [], None
        for entry in entries:
            result = self._add(entry.tx, verified=True, key=entry.key, future=entry.future)
            if isinstance(result, Rejected):
                self.stats["refused_on_rebase"] += 1
                if not entry.future.done():
                    entry.future.set_result({"hash": entry.tx.hash_hex, **result.to_dict()})

    async def _follow(self) -> None:
        """Materialize the blocks etcd has beyond this replica's tip."""
        moved = False
        while True:
            start = "block/" + height_key(self.mat_height + 1)
            rows = await asyncio.to_thread(self.etcd.range, start, "block0", 64)
            if not rows:
                break
            for name, data in rows:
                height = _block_height(name)
                if height is None:  # not a key of the protocol: ignored
                    continue
                if height != self.mat_height + 1:
                    raise BadBlock(self.mat_height + 1, f"etcd jumps to block {height}")
                block, receipts, state = await asyncio.to_thread(self._check_block, data, height)
                await self._materialize(block, receipts, state)
                self.stats["followed"] += 1
                moved = True
            if len(rows) < 64:
                break
        if moved and self._proposal is None and self._pending:
            pending, self._pending, self._pend_base = self._pending, [], None
            self._rebase(pending)

    def _check_block(self, data: bytes, height: int) -> tuple[Block, list[Receipt], State]:
        """Re-execute a block another validator proposed; BadBlock if anything is off."""
        try:
            wire = orjson.loads(data)
            if canonical_json(wire) != data:
                raise BadBlock(height, "the block in etcd is not canonical JSON")
            header, raw_txs = wire["header"], wire["txs"]
            proposer = parse_signatures(wire["signatures"])
            txs = [parse_tx(raw, canonical_checked=True) for raw in raw_txs]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError,
                LedgerRejected) as exc:
            raise BadBlock(height, f"the block in etcd is malformed: {exc}") from None
        if header.get("prev_hash") != self.mat_hash or header.get("height") != height:
            raise BadBlock(height, "the block in etcd does not follow this replica's chain")
        btime = header.get("time")
        if type(btime) is not int or btime < self.mat_time:
            raise BadBlock(height, "block time goes backwards")
        if header.get("tx_root") != tx_root(txs) or header.get("tx_count") != len(txs):
            raise BadBlock(height, "tx_root or tx_count does not match the transactions")
        block = Block.build(height, self.mat_hash, btime, txs)
        validators = self.mat_state.validators
        if signed_by(block.hash, proposer, validators) != len(proposer) or not proposer:
            raise BadBlock(height, "the block in etcd is not signed by a validator")
        state = tick(self.mat_state, btime)
        keys = [sender_key(state, tx) for tx in txs]
        n = max(1, self._threads)
        size = max(64, (len(txs) + n - 1) // n)
        parts = self._executor.map(lambda k: _verify_chunk(txs[k:k + size], keys[k:k + size]),
                                   range(0, len(txs), size))
        verified = [ok is True for part in parts for ok in part]
        receipts: list[Receipt] = []
        for i, tx in enumerate(txs):
            result = apply_with_receipt(state, tx, time=btime, verified=verified[i])
            if isinstance(result, Rejected):
                raise BadBlock(height, f"transaction {i} ({tx.hash_hex}) is refused: "
                               f"{result.reason}")
            state, receipt = result
            receipts.append(receipt)
        return replace(block, signatures=proposer), receipts, state

    async def _materialize(self, block: Block, receipts: list[Receipt], state: State,
                           *, proposed: bool = False) -> None:
        """Sign, write to SQLite, publish the signature (a proposer's is in the block
        already); final blocks become visible."""
        block = block.signed(self.identity)
        checkpoint = Checkpoint.make(self.identity, block.height, block.hash)
        await asyncio.to_thread(self.log.append, block, receipts, checkpoint)
        self.mat_height, self.mat_hash, self.mat_time = block.height, block.hash, block.time
        self.mat_state = state
        self._states[block.height] = state
        self._unfinal[block.height] = _Unfinal(block, receipts, state,
                                               {s.key: s for s in block.signatures})
        if not proposed:
            mine = next(s for s in block.signatures if s.key == self.identity.public_hex)
            # published in the background: the driver goes on with the next block
            task = asyncio.create_task(self._publish_signature(block.height, mine))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
        self._advance_final()

    async def _publish_signature(self, height: int, sig: BlockSignature) -> None:
        """Put this replica's signature of block `height` in etcd, trying again until it
        is there: the other replicas need it for the block to be final."""
        delay = 0.2
        while True:
            try:
                await asyncio.to_thread(self.etcd.put, f"sig/{height_key(height)}/{sig.key}",
                                        sig.signature.encode())
                return
            except LedgerError as exc:
                if self._closing:  # published again at the next start
                    log.warning("event=signature_not_published height=%d error=%r", height,
                                str(exc)[:300])
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _republish_own(self, low: int, high: int) -> None:
        """Publish this replica's signature of blocks `low`..`high` of its file where etcd
        does not hold it (a kill -9 between writing a block and publishing its signature
        leaves it unpublished, and the block would never be final on the other replicas).
        Tried again until etcd answers."""
        me = self.identity.public_hex
        have: set[int] = set()
        while not self._closing:
            try:
                start = low
                while start <= high:
                    rows = await asyncio.to_thread(
                        self.etcd.range, "sig/" + height_key(start),
                        "sig/" + height_key(high + 1), MAX_SIG_ROWS)
                    last = start
                    for name, value in rows:
                        row = _sig_row(name, value)
                        if row is not None:
                            last = max(last, row[0])
                            if row[1].key == me:
                                have.add(row[0])
                    if len(rows) < MAX_SIG_ROWS:
                        break
                    start = last if last > start else start + 1
                missing = 0
                for height in range(low, high + 1):
                    entry = self._unfinal.get(height)
                    if height in have or (entry is not None and set(entry.signatures) == {me}):
                        continue  # published, or proposed here (signed inside the block)
                    stored = self.log.block(height)
                    if stored is None:
                        continue
                    sig = Block.signed_hash(self.identity, stored.hash)
                    await asyncio.to_thread(self.etcd.put, f"sig/{height_key(height)}/{me}",
                                            sig.signature.encode())
                    have.add(height)
                    missing += 1
                if missing:
                    log.info("event=signatures_republished count=%d from=%d to=%d", missing,
                             low, high)
                return
            except LedgerError as exc:
                log.warning("event=replica_etcd_error error=%r", str(exc)[:300])
                await asyncio.sleep(0.5)

    async def _collect_signatures(self) -> None:
        """Read the validators' signatures of the blocks not final yet."""
        if not self._unfinal:
            return
        first = min(self._unfinal)
        rows = await asyncio.to_thread(self.etcd.range, "sig/" + height_key(first),
                                       "sig/" + height_key(self.mat_height + 1), MAX_SIG_ROWS,
                                       serializable=True)
        for name, value in rows:
            row = _sig_row(name, value)
            if row is None:
                continue
            h, sig = row
            entry = self._unfinal.get(h)
            if entry is None or sig.key in entry.signatures or self.disagree.get(sig.key) == h:
                continue  # counted already, or found not to sign this block: not again
            validators = self._validators_for(h)
            if sig.key not in validators:  # a replica outside the set: it does not count
                continue
            if signed_by(entry.block.hash, [sig], validators) == 1:
                entry.signatures[sig.key] = sig
            else:
                self._disagrees(sig.key, h)
        self._advance_final()

    def _disagrees(self, key: str, height: int) -> None:
        """A validator signed another block at `height` than this replica's: its history
        differs from the cluster's (a rewritten file, or a fork). Its signature is ignored
        and it is reported (log, `GET /cluster`)."""
        if key not in self.disagree:
            self.disagree[key] = height
            log.error("event=validator_disagrees key=%s height=%d", key, height)

    async def _audit(self) -> None:
        """Check the signatures published for the last final blocks too: a validator that
        publishes signatures over a rewritten history after the fact is caught here."""
        self._audited = _time.monotonic()
        if not self._recent_hashes:
            return
        low, high = min(self._recent_hashes), max(self._recent_hashes)
        rows = await asyncio.to_thread(self.etcd.range, "sig/" + height_key(low),
                                       "sig/" + height_key(high + 1), MAX_SIG_ROWS,
                                       serializable=True)
        for name, value in rows:
            row = _sig_row(name, value)
            if row is None:
                continue
            h, sig = row
            block_hash = self._recent_hashes.get(h)
            if block_hash is None or sig.key in self.disagree:
                continue
            if signed_by(block_hash, [sig], [sig.key]) != 1:
                self._disagrees(sig.key, h)

    async def _load_unfinal_tail(self) -> None:
        """At start: blocks of the file whose stored signatures are not a quorum wait for
        the signatures in etcd before they are shown (the state shown meanwhile is the
        materialized one: replaying to an older height is not worth it for a few blocks)."""
        height = self.mat_height
        while height > 0:
            stored = self.log.block(height)
            if stored is None:
                break
            wire = orjson.loads(stored.data)
            sigs = parse_signatures(wire["signatures"])
            if is_final(stored.hash, sigs, self.mat_state.validators):
                break
            block = replace(Block.build(height, wire["header"]["prev_hash"],
                                        wire["header"]["time"],
                                        [parse_tx(t, canonical_checked=True)
                                         for t in wire["txs"]]), signatures=sigs)
            self._unfinal[height] = _Unfinal(block, [orjson.loads(r.receipt)
                                                     for r in self.log.txs_in(height)],
                                             self.mat_state, {s.key: s for s in sigs})
            height -= 1
        self.final_height = height
        self._published = height
        if self._unfinal:
            log.info("event=replica_unfinal_tail from=%d to=%d", height + 1, self.mat_height)

    def _validators_for(self, height: int) -> tuple[str, ...]:
        """The validator set in force for block `height`: the one after the block before."""
        prev = self._states.get(height - 1)
        return (prev or self.mat_state).validators

    def _advance_final(self) -> None:
        advanced = False
        while (entry := self._unfinal.get(self.final_height + 1)) is not None:
            validators = self._validators_for(entry.block.height)
            if len([k for k in entry.signatures if k in validators]) < quorum(len(validators)):
                break
            block = replace(entry.block, signatures=tuple(
                entry.signatures[k] for k in sorted(entry.signatures)))
            with contextlib.suppress(LedgerError):
                self.log.set_block_signatures(block.height, block.hash, block.encode())
            del self._unfinal[block.height]
            self._states.pop(block.height - 1, None)
            self.final_height = block.height
            self._recent_hashes[block.height] = block.hash
            self._recent_hashes.pop(block.height - AUDIT_BLOCKS, None)
            self.chain.state = entry.state
            self.chain.height, self.chain.hash, self.chain.time = (block.height, block.hash,
                                                                   block.time)
            self.chain.last = block
            self._remember(block, entry.receipts)
            self._published = block.height
            for ack in self._acks.pop(block.height, ()):
                if not ack.future.done():
                    ack.future.set_result({"hash": ack.tx.hash_hex, "receipt": ack.receipt,
                                           "height": block.height, "final": True})
            advanced = True
        if advanced:
            event, self._new_block = self._new_block, asyncio.Event()
            event.set()

    def status(self) -> dict[str, Any]:
        """What `GET /cluster` serves: this replica's key, tips and counters."""
        return {"key": self.identity.public_hex, "materialized": self.mat_height,
                "final": self.final_height, "head_hash": self.chain.hash,
                "pending": len(self._pending), "broken": self._broken,
                "validators": list(self.chain.state.validators), "disagree": self.disagree,
                **self.stats}


_BLOCK_KEY = re.compile(r"block/([0-9]{12})")
_SIG_KEY = re.compile(r"sig/([0-9]{12})/([0-9a-f]{64})")
_SIG_VALUE = re.compile(rb"[0-9a-f]{128}")


def _block_height(name: str) -> int | None:
    m = _BLOCK_KEY.fullmatch(name)
    return int(m.group(1)) if m else None


def _sig_row(name: str, value: bytes) -> tuple[int, BlockSignature] | None:
    """(height, signature) of a `sig/<height>/<key>` row; None for anything else."""
    m = _SIG_KEY.fullmatch(name)
    if m is None or not _SIG_VALUE.fullmatch(value):
        return None
    return int(m.group(1)), BlockSignature(m.group(2), value.decode())


def _header_hash_of(data: bytes) -> str:
    from zerostack.ledger.block import header_hash

    try:
        return header_hash(orjson.loads(data)["header"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return ""
