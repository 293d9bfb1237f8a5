"""Blocks: an ordered batch of transactions chained to the previous block by its hash, and
signed by the ledger's operator.

A block's hash is blake2b-256 of the canonical JSON of its header
`{height, prev_hash, time, tx_root, tx_count}`; `tx_root` is blake2b-256 over every
transaction's hash followed by its signature, so editing any byte of a transaction,
its signature, the order, or a header field breaks the chain from that block on.
The operator's signature (`Domain.BLOCK_HEADER` over the block hash) sits beside the
header, not inside the hashed part, so more signers (validators) can be added to a
block later without changing its hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from zerostack.crypto import Domain, Identity, hash_hex, hash_obj, verify
from zerostack.ledger.tx import Tx

GENESIS_HASH = "0" * 64
"""The `prev_hash` of block 1 (height 0 is the empty genesis state)."""

HEADER_FIELDS = frozenset({"height", "prev_hash", "time", "tx_root", "tx_count"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


def tx_root(txs: Sequence[Tx]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for tx in txs:
        h.update(tx.hash)
        h.update(tx.signature)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class BlockSignature:
    """One signer's signature over a block hash: `key` is its public key (hex)."""

    key: str
    signature: str

    def to_wire(self) -> dict[str, str]:
        return {"key": self.key, "signature": self.signature}


@dataclass(frozen=True, slots=True)
class Block:
    height: int
    prev_hash: str
    time: int
    tx_root: str
    txs: tuple[Tx, ...]
    hash: str
    signatures: tuple[BlockSignature, ...] = ()

    @classmethod
    def build(cls, height: int, prev_hash: str, time: int, txs: Sequence[Tx]) -> Block:
        root = tx_root(txs)
        header = _header(height, prev_hash, time, root, len(txs))
        return cls(height, prev_hash, time, root, tuple(txs), hash_hex(header))

    @staticmethod
    def signed_hash(operator: Identity, block_hash: str) -> BlockSignature:
        """The operator's header signature over a block hash."""
        return BlockSignature(operator.public_hex,
                              operator.sign(Domain.BLOCK_HEADER, bytes.fromhex(block_hash)).hex())

    def signed(self, operator: Identity) -> Block:
        """This block with the operator's header signature (replacing any of its own)."""
        sig = Block.signed_hash(operator, self.hash)
        others = tuple(s for s in self.signatures if s.key != operator.public_hex)
        return replace(self, signatures=(*others, sig))

    def header(self) -> dict[str, Any]:
        return _header(self.height, self.prev_hash, self.time, self.tx_root, len(self.txs))

    def signed_header(self) -> dict[str, Any]:
        """What `GET /head` and `GET /blocks/{h}/header` serve: the header, its hash and
        its signatures, enough for a client to check the signature itself."""
        return {**self.header(), "hash": self.hash,
                "signatures": [s.to_wire() for s in self.signatures]}

    def to_wire(self) -> dict[str, Any]:
        """What the log stores and the API serves (the hash is derived, not stored inside)."""
        return {"header": self.header(), "signatures": [s.to_wire() for s in self.signatures],
                "txs": [tx.to_wire() for tx in self.txs]}

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


def parse_signatures(raw: Any) -> tuple[BlockSignature, ...]:
    """The `signatures` list of a stored or served block; ValueError when malformed."""
    if not isinstance(raw, list) or not raw or len(raw) > 64:
        raise ValueError("signatures must be a list of 1 to 64 {key, signature}")
    out = []
    for s in raw:
        if not (isinstance(s, dict) and set(s) == {"key", "signature"}
                and isinstance(s["key"], str) and _HEX64.fullmatch(s["key"])
                and isinstance(s["signature"], str) and _HEX128.fullmatch(s["signature"])):
            raise ValueError("a signature is {key: 64 hex, signature: 128 hex}")
        out.append(BlockSignature(s["key"], s["signature"]))
    if len({s.key for s in out}) != len(out):
        raise ValueError("a key signs a block at most once")
    return tuple(out)


def signature_problem(block_hash: str, signatures: Sequence[BlockSignature],
                      operator_key: str) -> str | None:
    """Why these signatures do not show `operator_key` signed `block_hash` (None: they do).
    Every signature listed must verify: a bad one means the block was edited."""
    found = False
    for s in signatures:
        if not verify(Domain.BLOCK_HEADER, s.key, bytes.fromhex(block_hash),
                      bytes.fromhex(s.signature)):
            return f"the signature of key {s.key} does not match the header"
        found = found or s.key == operator_key
    if not found:
        keys = ", ".join(s.key for s in signatures) or "none"
        return f"not signed by the operator key {operator_key} (signed by: {keys})"
    return None


def header_hash(header: dict[str, Any]) -> str:
    """The block hash of a served header; ValueError when its fields are not a header's."""
    fields = {k: header.get(k) for k in HEADER_FIELDS}
    for k in ("height", "time", "tx_count"):
        value = fields[k]
        if type(value) is not int or value < 0:
            raise ValueError(f"{k} must be a non-negative integer")
    for k in ("prev_hash", "tx_root"):
        value = fields[k]
        if not (isinstance(value, str) and _HEX64.fullmatch(value)):
            raise ValueError(f"{k} must be 64 hex")
    return hash_hex(fields)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The operator's signed statement that every signature of its log up to block
    `height` (whose hash is `hash`) was checked: a restart need not check them again."""

    height: int
    hash: str
    key: str
    signature: str

    @staticmethod
    def digest(height: int, block_hash: str) -> bytes:
        return hash_obj({"height": height, "hash": block_hash})

    @classmethod
    def make(cls, operator: Identity, height: int, block_hash: str) -> Checkpoint:
        sig = operator.sign(Domain.LEDGER_CHECKPOINT, cls.digest(height, block_hash))
        return cls(height, block_hash, operator.public_hex, sig.hex())

    def valid_for(self, operator_key: str) -> bool:
        if self.key != operator_key or not _HEX128.fullmatch(self.signature):
            return False
        return verify(Domain.LEDGER_CHECKPOINT, operator_key,
                      self.digest(self.height, self.hash), bytes.fromhex(self.signature))
