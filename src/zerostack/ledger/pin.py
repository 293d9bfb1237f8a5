"""The last ledger header a node or a user saw, kept on disk, and the operator key that
signs the ledger: a ledger whose chain does not extend that header is refused.

Before acting on what a ledger says, its head must be signed by the pinned operator key
and extend the pinned header: the head is at least as high, and the block at the pinned
height is the one seen before. A rollback (a lower head: a ledger restored from an old
copy), a fork (another block at the pinned height) and a change of operator key are
refused. The key is learnt on first contact (trust on first use) unless it is given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from zerostack.ledger.block import (
    GENESIS_HASH,
    header_hash,
    parse_signatures,
    signature_problem,
)
from zerostack.ledger.client import AsyncLedgerClient, LedgerClient
from zerostack.ledger.errors import LedgerError

PIN_FILE = "ledger-head.json"
"""The pin's file name in a node's data dir."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def untrusted(message: str) -> LedgerError:
    return LedgerError(message, code="untrusted", status=0)


def _a_validator_set(keys: Any) -> bool:
    """Whether `keys` is a validator set a consumer may pin: 1 to 64 distinct public keys
    (a key listed twice would raise the quorum past what the distinct signers can reach)."""
    return (isinstance(keys, list) and 0 < len(keys) <= 64
            and all(isinstance(v, str) and _HEX64.fullmatch(v) for v in keys)
            and len(set(keys)) == len(keys))


def check_header(header: Any, operator_key: str | None) -> tuple[int, str, str | None]:
    """(height, hash, signer) of a served signed header, once its hash is recomputed and
    its signature by `operator_key` checked (by its first signer when no key is known).
    Height 0 is the empty ledger: nothing is signed yet."""
    if not isinstance(header, dict):
        raise untrusted("the ledger served a header that is not an object")
    if header.get("height") == 0:
        if header.get("hash") != GENESIS_HASH:
            raise untrusted("the ledger's empty head has a hash")
        return 0, GENESIS_HASH, operator_key
    try:
        block_hash = header_hash(header)
        signatures = parse_signatures(header.get("signatures"))
    except ValueError as exc:
        raise untrusted(f"the ledger served a malformed header: {exc}") from None
    height = int(header["height"])
    if header.get("hash") != block_hash:
        raise untrusted(f"the ledger's block {height} header does not hash to the hash served")
    key = operator_key or signatures[0].key
    why = signature_problem(block_hash, signatures, key)
    if why is not None:
        raise untrusted(f"the ledger's block {height} header is {why}")
    return height, block_hash, key


def check_final(header: Any, validators: list[str]) -> tuple[int, str]:
    """(height, hash) of a served header once its hash is recomputed and more than two
    thirds of `validators` are found to have signed it (a final block)."""
    from zerostack.ledger.validators import quorum, signed_by

    if not isinstance(header, dict):
        raise untrusted("the ledger served a header that is not an object")
    if header.get("height") == 0:
        if header.get("hash") != GENESIS_HASH:
            raise untrusted("the ledger's empty head has a hash")
        return 0, GENESIS_HASH
    try:
        block_hash = header_hash(header)
        signatures = parse_signatures(header.get("signatures"))
    except ValueError as exc:
        raise untrusted(f"the ledger served a malformed header: {exc}") from None
    height = int(header["height"])
    if header.get("hash") != block_hash:
        raise untrusted(f"the ledger's block {height} header does not hash to the hash served")
    got = signed_by(block_hash, signatures, validators)
    if got < quorum(len(validators)):
        raise untrusted(f"the ledger's block {height} is not final: signed by {got} of the "
                        f"{len(validators)} validators, {quorum(len(validators))} needed")
    return height, block_hash


class HeaderPin:
    """The pinned operator key and header of one ledger, in the JSON file `path`
    (mode 0600). `check` (or `check_async`) asks the ledger for its head, and for the
    header at the pinned height, and raises `LedgerError` (code `untrusted`) unless the
    head extends the pin; then it moves the pin to the head."""

    def __init__(self, path: Path, operator_key: str | None = None) -> None:
        if operator_key is not None and not _HEX64.fullmatch(operator_key):
            raise LedgerError(f"ledger operator key must be 64 lowercase hex, got "
                              f"{operator_key[:80]!r}")
        self.path = path
        self.key, self.height, self.hash = self._read()
        self.validators: list[str] | None
        self.validators, self.epoch = self._read_validators()
        if operator_key is not None:
            if self.key is not None and self.key != operator_key:
                raise untrusted(f"{path} pins the ledger operator key {self.key}, not "
                                f"{operator_key}: a change of operator key is refused "
                                "(remove the file to trust the new key)")
            self.key = operator_key

    def _read(self) -> tuple[str | None, int, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, 0, GENESIS_HASH
        except (OSError, ValueError) as exc:
            raise untrusted(f"{self.path}: unreadable ledger pin: {exc}") from None
        key, height, block_hash = (data.get("operator_key"), data.get("height"),
                                   data.get("hash")) if isinstance(data, dict) else (0, 0, 0)

        if not (isinstance(key, str) and _HEX64.fullmatch(key) and type(height) is int
                and height >= 0 and isinstance(block_hash, str) and _HEX64.fullmatch(block_hash)):
            raise untrusted(f"{self.path}: not a ledger pin {{operator_key, height, hash}}")
        return key, height, block_hash

    def _read_validators(self) -> tuple[list[str] | None, int]:
        """The pinned validator set and epoch (None: the pin names an operator key only)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None, 0
        if not isinstance(data, dict) or "validators" not in data:
            return None, 0
        vals, epoch = data.get("validators"), data.get("epoch")
        if not (isinstance(vals, list) and 0 < len(vals) <= 64 and all(
                isinstance(v, str) and _HEX64.fullmatch(v) for v in vals)
                and type(epoch) is int and epoch >= 0):
            raise untrusted(f"{self.path}: malformed validator set in the ledger pin")
        return sorted(vals), epoch

    def wanted(self, head: dict[str, Any]) -> int | None:
        """The height whose header the ledger must show to prove `head` extends the pin."""
        height = head.get("height")
        return self.height if type(height) is int and 0 < self.height < height else None

    def _check(self, header: Any, key: str | None) -> tuple[int, str, str | None]:
        if self.validators is not None:
            return (*check_final(header, self.validators), key)
        return check_header(header, key)

    def accept(self, head: dict[str, Any], at_pinned: dict[str, Any] | None) -> None:
        """Check the served `head` (and the header `at_pinned` the pinned height, when the
        head is higher) against the pin; move the pin to the head."""
        height, block_hash, key = self._check(head, self.key)
        if height < self.height:
            raise untrusted(f"the ledger rolled back: its head is block {height}, but block "
                            f"{self.height} ({self.hash[:16]}…) was seen before")
        if height == self.height and block_hash != self.hash:
            raise untrusted(f"the ledger forked: its block {height} is {block_hash[:16]}…, "
                            f"not {self.hash[:16]}… seen before")
        if height > self.height > 0:
            if at_pinned is None:
                raise untrusted(f"the ledger does not show its block {self.height}")
            if self.validators is not None:
                # the pinned block was checked final when it was pinned (perhaps by a set
                # that changed since): the same hash is all there is to check
                try:
                    old_height, old_hash = int(at_pinned.get("height", -1)), header_hash(
                        at_pinned)
                except (ValueError, TypeError):
                    raise untrusted("the ledger served a malformed header") from None
            else:
                old_height, old_hash, _ = self._check(at_pinned, key)
            if old_height != self.height or old_hash != self.hash:
                raise untrusted(f"the ledger forked: its block {self.height} is "
                                f"{old_hash[:16]}…, not {self.hash[:16]}… seen before")
        if self.validators is not None:
            key = key or self.validators[0]
        if key is not None and (height, block_hash, key) != (self.height, self.hash, self.key):
            self.key, self.height, self.hash = key, height, block_hash
            self._write()

    def check(self, client: LedgerClient) -> None:
        """Check the ledger `client` talks to; with several URLs (a cluster's replicas),
        a replica that fails the check is reported and the next one is tried, so the
        client ends on one that passed (LedgerError `untrusted` when none does)."""
        errors: list[str] = []
        for _ in range(len(getattr(client, "urls", ())) or 1):
            try:
                head = client.head()
                if self._wants_validators(head):
                    self.learn_validators(client.validators(), head)
                at = self.wanted(head)
                self.accept(head, None if at is None else client.header(at))
                return
            except LedgerError as exc:
                if exc.code != "untrusted" or len(getattr(client, "urls", ())) < 2:
                    raise
                errors.append(f"{client.url}: {exc}")
                client.next_url()
        raise untrusted("; ".join(errors))

    async def check_async(self, client: AsyncLedgerClient) -> None:
        """`check` for the asyncio client."""
        errors: list[str] = []
        for _ in range(len(getattr(client, "urls", ())) or 1):
            try:
                head = await client.head()
                if self._wants_validators(head):
                    self.learn_validators(await client.validators(), head)
                at = self.wanted(head)
                self.accept(head, None if at is None else await client.header(at))
                return
            except LedgerError as exc:
                if exc.code != "untrusted" or len(getattr(client, "urls", ())) < 2:
                    raise
                errors.append(f"{client.url}: {exc}")
                client.next_url()
        raise untrusted("; ".join(errors))

    # ---- a ledger cluster: blocks are final when > 2/3 of the validators signed ---------

    def _wants_validators(self, head: dict[str, Any]) -> bool:
        """Whether the validator set must be read: on first contact with a ledger whose
        blocks carry several signatures (a cluster; no operator key was given), or when a
        pinned set no longer makes the head final (it may have changed since)."""
        if self.validators is None:
            sigs = head.get("signatures")
            return self.key is None and isinstance(sigs, list) and len(sigs) > 1
        try:
            check_final(head, self.validators)
        except LedgerError:
            return True
        return False

    def learn_validators(self, view: Any, head: dict[str, Any]) -> None:
        """Take the validator set from `GET /validators`: on first contact as it is
        (trust on first use, like the operator key), later only through changes whose
        approvals come from more than two thirds of the set pinned before each change."""
        from zerostack.ledger.validators import approved_by, quorum

        if not isinstance(view, dict) or not isinstance(view.get("changes"), list):
            raise untrusted("the ledger served a malformed validator set")
        if self.validators is None:
            vals: Any = view.get("validators")
            if not _a_validator_set(vals):
                raise untrusted("the ledger served a malformed validator set")
            self.validators, self.epoch = sorted(vals), int(view.get("epoch") or 0)
            return
        for change in view["changes"]:
            try:
                epoch, new = int(change["epoch"]), sorted(change["validators"])
                approvals = [(str(a["key"]), str(a["signature"])) for a in change["approvals"]]
            except (KeyError, TypeError, ValueError):
                raise untrusted("the ledger served a malformed validator change") from None
            if epoch <= self.epoch:
                continue
            if epoch != self.epoch + 1:
                raise untrusted(f"the ledger skips validator epoch {self.epoch + 1}")
            if not _a_validator_set(new):
                raise untrusted("the ledger served a malformed validator change")
            got = approved_by(self.validators, epoch, new, approvals)
            if got < quorum(len(self.validators)):
                raise untrusted(f"the ledger's validator set {epoch} is approved by {got} of "
                                f"the {len(self.validators)} validators seen before")
            self.validators, self.epoch = new, epoch

    def _write(self) -> None:
        """Atomically, 0600; never lowers a pin another process moved further meanwhile."""
        try:
            on_disk = self._read()
        except LedgerError:
            on_disk = (None, 0, GENESIS_HASH)
        if on_disk[0] == self.key and on_disk[1] > self.height:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        doc: dict[str, Any] = {"operator_key": self.key, "height": self.height,
                               "hash": self.hash}
        if self.validators is not None:
            doc.update(validators=self.validators, epoch=self.epoch)
        body = json.dumps(doc).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


def pin_path(config_dir: Path, ledger_url: str) -> Path:
    """Where a user's pin for the ledger at `ledger_url` lives: one file per ledger."""
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", ledger_url.rstrip("/"))[:120]
    return config_dir / "ledgers" / f"{name}.json"
