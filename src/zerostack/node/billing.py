"""The node's side of billing: the traffic it counts and reports for each contract, signed,
once per period, and the billing notices it checks before it pauses or removes a contract
whose owner has not paid.

What the node acts on is a **billing notice** signed by the grid's governing key (the
ledger operator's key, the one the node pinned for block headers) in the
`billing-notice` domain, naming this contract, this node, and a block at or after the head
the node checked in the same pass. A server that is not the operator can neither forge one
nor replay an old one (a notice of an earlier block than the pinned head is stale), so
pausing (`grace`) and removal (`ended`) happen only on the governing key's word, which
anyone can check against the chain by replaying it. Resuming needs no notice: it only
gives back what the owner already had.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from zerostack.crypto import Domain, billing_notice_digest, verify
from zerostack.ledger.pin import untrusted
from zerostack.node.hostfs import create_private

log = logging.getLogger(__name__)

MAX_NOTICE_FIELDS = 32
MAX_TRAFFIC_FILE = 1 << 22
STANDINGS = ("unbilled", "paying", "grace", "ended", "closed")


def check_notice(notice: Any, operator_key: str | None, contract: int, node: int,
                 pinned_height: int, pinned_hash: str) -> str:
    """The standing of `contract` a served billing notice states, once checked: signed
    by `operator_key` in the `billing-notice` domain, about this contract on this node, of
    a block no older than the pinned head (`pinned_height`, `pinned_hash`). Raises
    LedgerError (`untrusted`) otherwise."""
    if operator_key is None:
        raise untrusted("no ledger operator key is pinned yet: billing notices cannot be checked")
    if not isinstance(notice, dict) or len(notice) > MAX_NOTICE_FIELDS:
        raise untrusted("the ledger served a billing notice that is not an object")
    sig = notice.get("signature")
    try:
        raw = bytes.fromhex(sig) if isinstance(sig, str) and len(sig) == 128 else b""
        ok = bool(raw) and verify(Domain.BILLING_NOTICE, operator_key,
                                  billing_notice_digest(notice), raw)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise untrusted(f"the billing notice of contract {contract} is not signed by the "
                        "ledger's operator key")
    if notice.get("contract") != contract or notice.get("node") != node:
        raise untrusted(f"the billing notice served for contract {contract} is about contract "
                        f"{str(notice.get('contract'))[:20]} on node {str(notice.get('node'))[:20]}")
    height = notice.get("height")
    if type(height) is not int or height < pinned_height:
        raise untrusted(f"the billing notice of contract {contract} is of block "
                        f"{str(height)[:20]}, older than the head {pinned_height} this node "
                        "checked: a stale notice is not acted on")
    if height == pinned_height and notice.get("block") != pinned_hash:
        raise untrusted(f"the billing notice of contract {contract} names another block "
                        f"{pinned_height} than the one this node pinned")
    standing = notice.get("standing")
    if standing not in STANDINGS:
        raise untrusted(f"the billing notice of contract {contract} has an unknown standing")
    return str(standing)


class TrafficMeter:
    """Bytes in and out counted per contract since its last accepted consumption report,
    from the kernel's interface counters and the public addresses' nftables counters (which
    restart from 0 when an interface or table is made again: a counter lower than the last
    one read counts from 0). Kept in a 0600 JSON file
    in the node's data dir so a restart of the agent loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # contract -> {"last": {key: [in, out]}, "pending": [in, out]}
        self._data: dict[str, dict[str, Any]] = {}
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_TRAFFIC_FILE + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OSError(f"{path}: unreadable traffic counts: {exc}") from exc
        try:
            if len(raw) > MAX_TRAFFIC_FILE:
                raise ValueError(f"over {MAX_TRAFFIC_FILE} bytes")
            loaded = json.loads(raw)
            if not isinstance(loaded, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            # unreported traffic is the farmer's revenue: keep the file aside for an
            # operator rather than overwrite it with an empty meter
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log.error("event=traffic_file_corrupt path=%s moved_to=%s error=%r", path, aside,
                      str(exc)[:200])
            return
        self._data = {str(k): v for k, v in loaded.items() if isinstance(v, dict)}

    def sample(self, contract: int, counters: dict[str, tuple[int, int]]) -> None:
        """Add what `counters` grew by since the last sample of `contract`."""
        with self._lock:
            entry = self._data.setdefault(str(contract), {"last": {}, "pending": [0, 0]})
            last: dict[str, list[int]] = entry.setdefault("last", {})
            pending: list[int] = entry.setdefault("pending", [0, 0])
            for key, (rx, tx) in counters.items():
                before = last.get(key)
                if before is not None:
                    pending[0] += rx - before[0] if rx >= before[0] else rx
                    pending[1] += tx - before[1] if tx >= before[1] else tx
                # first sight of an interface: its bytes so far were counted by an earlier
                # sample of it or happened before it was billed; count from here
                last[key] = [rx, tx]
            self._save()

    def pending(self, contract: int) -> tuple[int, int]:
        with self._lock:
            p = self._data.get(str(contract), {}).get("pending", [0, 0])
            return int(p[0]), int(p[1])

    def reported(self, contract: int, traffic_in: int, traffic_out: int) -> None:
        """A report with these figures was accepted: count them no more."""
        with self._lock:
            entry = self._data.get(str(contract))
            if entry is None:
                return
            p = entry.get("pending", [0, 0])
            entry["pending"] = [max(0, p[0] - traffic_in), max(0, p[1] - traffic_out)]
            self._save()

    def forget(self, contract: int) -> None:
        with self._lock:
            if self._data.pop(str(contract), None) is not None:
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(create_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump(self._data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
