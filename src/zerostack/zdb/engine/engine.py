"""The Zero-DB engine: every namespace of one data + index directory pair."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from zerostack.zdb.engine.compact import CompactReport, compact_namespace
from zerostack.zdb.engine.config import EngineConfig, Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import NS_FILENAME
from zerostack.zdb.engine.namespace import Namespace

log = logging.getLogger("zerostack.zdb.engine")

DEFAULT_NAMESPACE = "default"
MAX_NAME = 128


class Engine:
    """Opens (or creates) every namespace under config.index_dir/config.data_dir.

    Writes may sit in memory until `flush_all()` hands them to the OS; the server calls it
    once per batch of replies, so a reply never acknowledges data the OS has not seen.
    With `sync=True` each write is fsync'ed before it returns.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.namespaces: dict[str, Namespace] = {}
        self._dirty: set[Namespace] = set()
        self._unsynced: set[Namespace] = set()
        self._last_sync = time.monotonic()
        config.index_dir = Path(config.index_dir)
        config.data_dir = Path(config.data_dir)
        config.index_dir.mkdir(parents=True, exist_ok=True)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in config.index_dir.iterdir()
                       if p.is_dir() and ((p / NS_FILENAME).exists() or (p / "i0").exists()))
        if DEFAULT_NAMESPACE in names:
            names.remove(DEFAULT_NAMESPACE)
            names.insert(0, DEFAULT_NAMESPACE)
        try:
            for name in names:
                self.namespaces[name] = self._open(name, None)
            if DEFAULT_NAMESPACE not in self.namespaces:
                self.namespaces = {DEFAULT_NAMESPACE: self._open(DEFAULT_NAMESPACE, self._new_mode()),
                                   **self.namespaces}
        except BaseException:
            self.close()
            raise
        log.info("event=zdb.engine.open namespaces=%d index=%s data=%s",
                 len(self.namespaces), config.index_dir, config.data_dir)

    def _new_mode(self) -> Mode:
        return Mode.SEQ if self.config.mode is Mode.SEQ else Mode.USER

    def _open(self, name: str, create_mode: Mode | None) -> Namespace:
        return Namespace(name, self.config.index_dir / name, self.config.data_dir / name,
                         self.config, self._mark_dirty, create_mode)

    def _mark_dirty(self, ns: Namespace) -> None:
        self._dirty.add(ns)

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            raise ZdbError("Namespace not found")
        return ns

    def create_namespace(self, name: str) -> Namespace:
        """NSNEW: validate the name like the reference and create an empty namespace."""
        if len(name) > MAX_NAME:
            raise ZdbError("Namespace too long")
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ZdbError("This name is not allowed")
        if name in self.namespaces:
            raise ZdbError("This namespace is not available")
        ns = self._open(name, self._new_mode())
        self.namespaces[name] = ns
        log.info("event=zdb.namespace.create namespace=%s", name)
        return ns

    def delete_namespace(self, name: str) -> None:
        """NSDEL: close the namespace and remove its files."""
        if name == DEFAULT_NAMESPACE:
            raise ZdbError("Cannot remove default namespace")
        ns = self.namespaces.pop(name, None)
        if ns is None:
            raise ZdbError("This namespace doesn't exists")
        self._dirty.discard(ns)
        self._unsynced.discard(ns)
        ns.remove_files()
        log.info("event=zdb.namespace.delete namespace=%s", name)

    def compact_namespace(self, name: str, keep_history: int | None = None) -> CompactReport:
        """Compact a namespace of this running engine (see compact.py). It runs to completion
        before returning; the Namespace object stays valid and serves the compacted files
        afterwards. It may run in a worker thread if nothing else touches this namespace
        meanwhile (other namespaces and flush_all() are safe: the engine's shared state is
        not modified here)."""
        ns = self.namespace(name)
        ns.close()  # writes out what it buffered; a later write_out() finds nothing to do
        try:
            return compact_namespace(self.config.index_dir, self.config.data_dir, name,
                                     keep_history, self.config.datasize)
        finally:
            ns.reopen()

    def flush_all(self) -> None:
        """Hand every buffered write to the OS (and fsync it under sync with group_commit)."""
        if not self._dirty:
            return
        durable = self.config.sync
        for ns in self._dirty:
            if durable:
                ns.fsync()
            else:
                ns.write_out()
        if self.config.synctime > 0:
            self._unsynced |= self._dirty
        self._dirty.clear()

    def sync_if_due(self) -> None:
        """With synctime > 0: fsync what was written, at most every `synctime` seconds."""
        if self.config.synctime <= 0:
            return
        now = time.monotonic()
        if now - self._last_sync < self.config.synctime:
            return
        self.flush_all()
        for ns in self._unsynced:
            ns.fsync()
        self._unsynced.clear()
        self._last_sync = now

    def close(self) -> None:
        for ns in self.namespaces.values():
            ns.close()
        self._dirty.clear()
