"""Pinned keys: the public key first seen for each twin and node, kept on disk, so a server
that later serves another key for the same id is caught instead of believed.

A node and a user's 3Bot each keep one `KeyPins` per ledger. There is no signed key change
on the ledger yet, so any change of a pinned key is refused.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from zerostack.crypto.identity import CryptoError

MAX_PINS = 1_000_000


class KeyChanged(CryptoError):
    """A server (or a deployment) names another key than the one pinned for an id."""


class KeyPins:
    """`kind:id -> public key hex`, in memory and, with a path, in a 0600 JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pins: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CryptoError(f"{path}: pinned keys are unreadable: {exc}") from exc
            if not isinstance(data, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                raise CryptoError(f"{path}: pinned keys are not a {{id: key}} object")
            self._pins = data

    def get(self, kind: str, ident: int) -> str | None:
        with self._lock:
            return self._pins.get(f"{kind}:{ident}")

    def check(self, kind: str, ident: int, key: str) -> None:
        """Raise KeyChanged if `kind` `ident` is pinned to another key (pins nothing)."""
        pinned = self.get(kind, ident)
        if pinned is not None and pinned != key:
            raise KeyChanged(
                f"{kind} {ident}'s key is now {key[:16]}…, but {pinned[:16]}… was pinned "
                "for it: refusing a key change nobody signed")

    def pin(self, kind: str, ident: int, key: str) -> None:
        """Check, then remember `key` for `kind` `ident` (written to disk when new)."""
        self.check(kind, ident, key)
        name = f"{kind}:{ident}"
        with self._lock:
            if self._pins.get(name) == key:
                return
            if len(self._pins) >= MAX_PINS:
                raise CryptoError(f"more than {MAX_PINS} pinned keys")
            self._pins[name] = key
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(self._pins, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
