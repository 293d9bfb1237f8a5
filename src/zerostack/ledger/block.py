"""Blocks: an ordered batch of transactions chained to the previous block by its hash.

A block's hash is blake2b-256 of the canonical JSON of its header
`{height, prev_hash, time, tx_root, tx_count}`; `tx_root` is blake2b-256 over every
transaction's hash followed by its signature, so editing any byte of a transaction,
its signature, the order, or a header field breaks the chain from that block on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from zerostack.crypto import hash_hex
from zerostack.ledger.tx import Tx

GENESIS_HASH = "0" * 64
"""The `prev_hash` of block 1 (height 0 is the empty genesis state)."""


def tx_root(txs: Sequence[Tx]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for tx in txs:
        h.update(tx.hash)
        h.update(tx.signature)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Block:
    height: int
    prev_hash: str
    time: int
    tx_root: str
    txs: tuple[Tx, ...]
    hash: str

    @classmethod
    def build(cls, height: int, prev_hash: str, time: int, txs: Sequence[Tx]) -> Block:
        root = tx_root(txs)
        header = _header(height, prev_hash, time, root, len(txs))
        return cls(height, prev_hash, time, root, tuple(txs), hash_hex(header))

    def header(self) -> dict[str, Any]:
        return _header(self.height, self.prev_hash, self.time, self.tx_root, len(self.txs))

    def to_wire(self) -> dict[str, Any]:
        """What the log stores and the API serves (the hash is derived, not stored inside)."""
        return {"header": self.header(), "txs": [tx.to_wire() for tx in self.txs]}

    def encode(self) -> bytes:
        """The exact bytes the log keeps: canonical JSON of `to_wire()`."""
        # every payload passed canonical_json's checks when its hash was taken, so sorting
        # keys is all that is left to do (the result equals canonical_json's)
        return orjson.dumps(self.to_wire(), option=orjson.OPT_SORT_KEYS)


def _header(height: int, prev_hash: str, time: int, root: str, count: int) -> dict[str, Any]:
    return {
        "height": height,
        "prev_hash": prev_hash,
        "time": time,
        "tx_root": root,
        "tx_count": count,
    }
