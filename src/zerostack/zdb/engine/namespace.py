"""One Zero-DB namespace: its settings and lifecycle, assembled from one layer per concern.

The layers, each in its own module and each built on the one before:
nsfiles.py (state, file pairs, low-level reads, crash-safe write-out), recovery.py (load and
repair), reads.py (GET and lookups), writes.py (SET, DEL), history.py (SCAN, HISTORY, raw
entries); this module adds settings (NSINFO, NSSET), FLUSH, NSJUMP and replication replay.

User-mode namespaces keep every live key in a dict whose value is ONE small int: the file id
and offset of the key's index entry (`fid << 32 | offset`); the entry itself is read from a
shared memory map of the index file. Sequential namespaces keep no per-key memory at all,
since a slot's index entry sits at a fixed offset. Writes are appended to in-memory tails and
reach the OS on `write_out()` (the engine calls it from `flush_all()`), in an order that keeps
the files recoverable after a crash at any point: data, then delete flags, then index
appends, then the "superseded" flags of overwritten entries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from zerostack.zdb.engine.config import EngineConfig, Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.files import (
    create_pair,
    fsync_dir,
    write_new_file,
)
from zerostack.zdb.engine.format import (
    FLAG_DELETED,
    MODE_SEQ,
    MODE_USER,
    NS_FILENAME,
    SEQ_KEY,
    NamespaceDescriptor,
    data_name,
    index_header,
    index_name,
)
from zerostack.zdb.engine.history import NamespaceHistory
from zerostack.zdb.engine.nsfiles import (
    DHEAD,
    IHEAD,
    seq_unpack,
)
from zerostack.zdb.engine.reads import decode_cursor, encode_cursor
from zerostack.zdb.engine.recovery import MAX_UNINDEXED_TAIL, find_superseded, replay_user_index

__all__ = ["MAX_UNINDEXED_TAIL", "Namespace", "decode_cursor", "encode_cursor",
           "find_superseded", "replay_user_index"]


def _atoll(value: str) -> int:
    """The reference parses numbers with atoll(): leading digits, anything else is 0."""
    digits = ""
    for i, ch in enumerate(value.strip()):
        if ch.isdigit() or (i == 0 and ch in "+-"):
            digits += ch
        else:
            break
    try:
        return max(0, int(digits))
    except ValueError:
        return 0


class Namespace(NamespaceHistory):
    """A namespace: settings, files and the key/value operations of the command layer."""

    def __init__(self, name: str, index_root: Path, data_root: Path, config: EngineConfig,
                 on_dirty: Callable[[Namespace], None], create_mode: Mode | None = None) -> None:
        super().__init__(name, index_root, data_root, config, on_dirty)
        if create_mode is not None:
            self._create(create_mode)
        self._load()

    # ------------------------------------------------------------- settings

    def info(self) -> dict[str, str | int]:
        """NSINFO fields."""
        isize = sum(self._closed_isizes) + self._index.size
        info: dict[str, str | int] = {
            "name": self.name,
            "entries": self.dbsize(),
            "public": "yes" if self.public else "no",
            "worm": "yes" if self.worm else "no",
            "locked": "yes" if self.locked else "no",
            "frozen": "yes" if self.frozen else "no",
            "password": "yes" if self.password else "no",
            "data_size_bytes": self._bytes,
            "data_size_mb": f"{self._bytes / (1024 * 1024):.2f}",
            "data_limits_bytes": self.maxsize,
            "index_size_bytes": isize,
            "index_size_kb": f"{isize / 1024:.2f}",
            "mode": "sequential" if self.mode is Mode.SEQ else "userkey",
            "data_current_id": self._data.fileid,
            "data_current_offset": self._data.size,
        }
        if self.maxsize:
            info["space_available"] = max(0, self.maxsize - self._bytes)
        return info

    def next_internal_id(self) -> int:
        """The reference's next entry id. Sequential mode: the next slot. User mode: like
        the reference's loader, every index entry found at load, plus each key inserted
        since (an overwrite adds none)."""
        return self._seq_next if self._seqmode else self._inserted

    def live_key_bytes(self) -> int:
        """Total length of the live keys held in memory (none in sequential mode)."""
        return sum(map(len, self._keys))

    def file_sizes(self) -> tuple[int, int]:
        """(index bytes, data bytes) over all files, buffered writes included."""
        return (sum(self._closed_isizes) + self._index.size,
                sum(self._closed_dsizes) + self._data.size)

    def active_files(self) -> tuple[Path, Path]:
        """(index file, data file) that writes currently go to."""
        return self._ipath(self._index.fileid), self._dpath(self._data.fileid)

    def set_property(self, prop: str, value: str) -> None:
        """NSSET: change one setting (password, maxsize, public, worm, lock, freeze, mode)."""
        if self.name == "default":
            raise ZdbError("Cannot update default namespace")
        if len(value) > 63:
            raise ZdbError("Invalid value")
        flag = value[:1] == "1"
        if prop == "maxsize":
            self.maxsize = _atoll(value)
        elif prop == "password":
            self.password = None if value in ("*", "") else value
        elif prop == "public":
            self.public = flag
        elif prop == "worm":
            self.worm = flag
        elif prop == "lock":
            self.locked = flag
        elif prop == "freeze":
            self.frozen = flag
        elif prop == "mode":
            self._set_mode(value)
        else:
            raise ZdbError("Invalid property")
        self._save_descriptor()

    def _save_descriptor(self) -> None:
        desc = NamespaceDescriptor(self.name, self.password, self.maxsize, self.public, self.worm)
        write_new_file(self.index_root / NS_FILENAME, desc.encode())

    def _is_fresh(self) -> bool:
        return self._seq_next == 0 and not self._keys and self._index.fileid == 0 \
            and self._index.size == IHEAD and self._data.size == DHEAD

    def _set_mode(self, value: str) -> None:
        if self._config.mode is not Mode.MIXED:
            raise ZdbError("This server instance is configured to use a single runtime mode")
        if not self._is_fresh():
            raise ZdbError("Cannot change mode of used namespace")
        if value not in ("user", "seq"):
            raise ZdbError("Invalid property value (expected: user, seq)")
        self.mode = Mode.USER if value == "user" else Mode.SEQ
        # Rewrite the fresh header in place (same size): no moment without a valid header.
        os.pwrite(self._index.fd, index_header(0, MODE_SEQ if value == "seq" else MODE_USER), 0)
        if self._durable:
            self._index.fsync()

    def flush(self) -> None:
        """FLUSH: drop every key and file, keep the settings."""
        self._close_files()
        for root, name in ((self.index_root, index_name), (self.data_root, data_name)):
            for fid in range(self._count_files(root, name)):
                (root / name(fid)).unlink()
        create_pair(self._ipath(0), self._dpath(0), 0,
                    MODE_SEQ if self.mode is Mode.SEQ else MODE_USER)
        self._load()

    def jump(self) -> None:
        """NSJUMP: close the current file pair and start the next one."""
        self._rotate()

    def replay_raw(self, key: bytes, flags: int, timestamp: int, payload: bytes) -> None:
        """Apply one data entry read from a primary with `data_raw()` (log shipping).

        Applying a primary's entries in order, with the same datasize, reproduces its data
        and index files byte for byte: the index entries, history links and in-place flags
        follow from the data. The primary already enforced lock, worm and maxsize, so they
        are not checked again here. When the primary's stream moves on to file N+1 while
        this namespace is still on N, call jump() first (the primary ran NSJUMP).
        """
        saved = (self.locked, self.frozen, self.worm, self.maxsize)
        self.locked = self.frozen = self.worm = False
        self.maxsize = 0
        try:
            if flags & FLAG_DELETED:
                self.delete(key, timestamp)
            elif self.mode is Mode.SEQ and len(key) == SEQ_KEY.size \
                    and seq_unpack(key)[0] == self._seq_next:
                self.set(b"", payload, timestamp)
            elif self.set(key, payload, timestamp) is None:
                raise ZdbError(f"namespace {self.name}: replayed entry for {key!r} repeats the "
                               "stored value; this namespace has diverged from its primary")
        finally:
            self.locked, self.frozen, self.worm, self.maxsize = saved

    def reopen(self) -> None:
        """Close and load the files again (after they were rewritten, e.g. by compaction)."""
        self.close()
        self._load()

    def position(self) -> tuple[int, int]:
        """(current data file id, offset where the next entry goes), for replication."""
        return self._data.fileid, self._data.size

    def close(self) -> None:
        """Write out everything buffered (patches included) and close the files."""
        index = getattr(self, "_index", None)
        if index is not None and index.fd >= 0:
            self.write_out()
        self._close_files()

    def remove_files(self) -> None:
        """Delete this namespace's directories (after close())."""
        self._close_files()
        shutil.rmtree(self.index_root, ignore_errors=True)
        shutil.rmtree(self.data_root, ignore_errors=True)
        for parent in (self.index_root.parent, self.data_root.parent):
            if parent.exists():
                fsync_dir(parent)
