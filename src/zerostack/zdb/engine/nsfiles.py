"""The state every layer of a namespace shares: its settings, its file pairs, the index
maps, low-level reads of index and data entries, and the crash-safe write-out of buffered
appends. The layers above add recovery (recovery.py), reads (reads.py), writes
(writes.py), scans and history (history.py); namespace.py assembles them.
"""

from __future__ import annotations

import logging
import mmap
import os
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from zerostack.zdb.engine.config import EngineConfig, Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.files import (
    AppendFile,
    Readers,
    create_pair,
    write_new_file,
)
from zerostack.zdb.engine.format import (
    DATA_ENTRY,
    DATA_HEADER,
    FLAG_DELETED,
    INDEX_ENTRY,
    INDEX_HEADER,
    MODE_SEQ,
    MODE_USER,
    NS_FILENAME,
    SEQ_ENTRY_SIZE,
    SEQ_KEY,
    NamespaceDescriptor,
    data_name,
    index_name,
)

log: Final = logging.getLogger("zerostack.zdb.engine")

# A live user-mode key maps to `fid << 32 | index offset` (data and index file N always go
# together in user mode), an int of at most 2 digits: 32 bytes.
MAX_FILEID: Final = 0xFFFFFFF
# Re-map the current index file once this many bytes were written past the mapping, or
# once this many reads fell past it.
REMAP_AFTER: Final = 256 * 1024
REMAP_MISSES: Final = 64

IHEAD: Final = INDEX_HEADER.size   # 29
DHEAD: Final = DATA_HEADER.size    # 28
IENT: Final = INDEX_ENTRY.size     # 34
DENT: Final = DATA_ENTRY.size      # 18
AUTO_WRITE_OUT: Final = 4 * 1024 * 1024  # never hold more than this in a tail between flushes

idx_unpack: Final = INDEX_ENTRY.unpack_from
dat_unpack: Final = DATA_ENTRY.unpack_from
seq_unpack: Final = SEQ_KEY.unpack
DELETED_BYTE: Final = bytes([FLAG_DELETED])


class NamespaceFiles:
    """A namespace's state and file pairs, and the reads and write-out all layers use."""

    def __init__(self, name: str, index_root: Path, data_root: Path, config: EngineConfig,
                 on_dirty: Callable[[Any], None]) -> None:
        self.name = name
        self.index_root = index_root
        self.data_root = data_root
        self._config = config
        self._on_dirty = on_dirty
        self._durable = config.sync    # files and rotations made durable at once
        self._sync = config.sync and not config.group_commit  # fsync inside each write
        self._datasize = config.datasize
        self._pending = False  # buffered writes the engine has not been told about yet
        self._ts = 0           # timestamp of the current batch of writes
        self.password: str | None = None
        self.public = True
        self.worm = False
        self.locked = False
        self.frozen = False
        self.maxsize = 0
        self._seqmode = False
        self.mode = Mode.USER
        self._readers = Readers()
        self._keys: dict[bytes, int] = {}
        self._maps: dict[int, mmap.mmap] = {}             # index files, shared maps
        self._dmaps: dict[int, mmap.mmap] = {}            # closed data files, read-only maps
        self._imisses = 0  # reads of the current index file past its map since it was made
        # GET's location cache (reads.py): made on the first read, for the key dict it names.
        self._lc: mmap.mmap | None = None
        self._lc_mask = 0
        self._lc_grow = 0
        self._lc_for: dict[bytes, int] | None = None
        self._early: list[tuple[int, int, bytes]] = []   # delete flags (before index appends)
        self._late: list[tuple[int, int, bytes]] = []    # superseded flags (after index appends)
        self._patched_paths: set[Path] = set()           # older index files to fsync
        self._closed_isizes: list[int] = []
        self._closed_dsizes: list[int] = []
        self._seq_bases: list[int] = [0]
        self._seq_next = 0
        self._inserted = 0  # user mode: the reference's next entry id (see next_internal_id)
        self._count = 0
        self._bytes = 0
        self._data_prev = 0
        self._idx_prev = 0
        self._index: AppendFile
        self._data: AppendFile

    @property
    def mode(self) -> Mode:
        """USER or SEQ (from the index file header)."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        self._mode = value
        self._seqmode = value is Mode.SEQ

    # ----------------------------------------------------------------- files

    def _ipath(self, fid: int) -> Path:
        return self.index_root / index_name(fid)

    def _dpath(self, fid: int) -> Path:
        return self.data_root / data_name(fid)

    def _create(self, mode: Mode) -> None:
        self.index_root.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        desc = NamespaceDescriptor(self.name, None, self._config.maxsize, True, False)
        # Settings are always made durable (a lost password would open the namespace);
        # empty files only under --sync: a torn header of the newest pair is rewritten on open.
        write_new_file(self.index_root / NS_FILENAME, desc.encode())
        create_pair(self._ipath(0), self._dpath(0), 0, MODE_SEQ if mode is Mode.SEQ else MODE_USER,
                    durable=self._durable)

    def _count_files(self, root: Path, name: Callable[[int], str]) -> int:
        n = 0
        while (root / name(n)).exists():
            n += 1
        return n

    def _close_files(self) -> None:
        self._drop_maps()
        for f in (getattr(self, "_index", None), getattr(self, "_data", None)):
            if f is not None:
                f.close()
        self._readers.close()

    def _drop_maps(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()
        for mm in self._dmaps.values():
            mm.close()
        self._dmaps.clear()

    def _data_map(self, fid: int) -> mmap.mmap:
        """A read-only map of closed data file `fid`, made on its first read and kept until
        the namespace closes: reads of older files cost a slice, not a system call. Closed
        data files never change while open (compaction swaps in new files, then reopens)."""
        mm = self._dmaps.get(fid)
        if mm is None:
            fd = os.open(self._dpath(fid), os.O_RDONLY)
            try:
                mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            except FileNotFoundError:
                raise ZdbError(f"{self._dpath(fid)} is missing") from None
            finally:
                os.close(fd)
            self._dmaps[fid] = mm
        return mm

    def _map(self, fid: int) -> mmap.mmap:
        """A shared map of index file `fid`: reads see in-place patches, and small patches
        are written through it."""
        old = self._maps.pop(fid, None)
        if old is not None:
            old.close()
        with open(self._ipath(fid), "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        self._maps[fid] = mm
        self._imisses = 0
        return mm

    def _ientry(self, fid: int, off: int) -> tuple[int, ...]:
        """Fields of the index entry at (fid, off) (not its key), buffered tail included."""
        ix = self._index
        if fid == ix.fileid:
            if off >= ix.disk_size:
                return idx_unpack(ix.buf, off - ix.disk_size)
            mm = self._maps.get(fid)
            if mm is None or off + IENT > len(mm):
                if mm is not None and ix.disk_size - len(mm) < REMAP_AFTER \
                        and self._imisses < REMAP_MISSES:
                    self._imisses += 1
                    return idx_unpack(os.pread(ix.fd, IENT, off), 0)
                mm = self._map(fid)
            return idx_unpack(mm, off)
        mm = self._maps.get(fid)
        if mm is None or off + IENT > len(mm):
            mm = self._map(fid)
        return idx_unpack(mm, off)

    # ------------------------------------------------------------- low level

    def _read_data(self, fid: int, offset: int, length: int) -> bytes:
        d = self._data
        if fid == d.fileid:
            return d.read(offset, length)
        return self._data_map(fid)[offset:offset + length]

    def _read_index(self, fid: int, offset: int, length: int) -> bytes:
        if self._early or self._late:
            self.write_out()
        ix = self._index
        if fid == ix.fileid:
            return ix.read(offset, length)
        return os.pread(self._readers.fd(self._ipath(fid)), length, offset)

    def _read_data_entry(self, fid: int, doff: int) -> tuple[tuple[int, ...], bytes, bytes] | None:
        """(header fields, key, payload) of the data entry at (fid, doff), None if torn."""
        head = self._read_data(fid, doff, DENT)
        if len(head) < DENT:
            return None
        fields = dat_unpack(head, 0)
        kl, ln = fields[0], fields[1]
        body = self._read_data(fid, doff + DENT, kl + ln)
        if len(body) < kl + ln:
            return None
        return fields, body[:kl], body[kl:]

    def _index_size(self, fid: int) -> int:
        if fid == self._index.fileid:
            return self._index.size
        if 0 <= fid < len(self._closed_isizes):
            return self._closed_isizes[fid]
        return 0

    def _data_size(self, fid: int) -> int:
        if fid == self._data.fileid:
            return self._data.size
        if 0 <= fid < len(self._closed_dsizes):
            return self._closed_dsizes[fid]
        return 0

    def _slot(self, key: bytes) -> tuple[int, int] | None:
        """(index file id, offset) of sequential key `key`, None if it was never assigned."""
        if len(key) != SEQ_KEY.size:
            return None
        s = seq_unpack(key)[0]
        if s >= self._seq_next:
            return None
        f = bisect_right(self._seq_bases, s) - 1
        return f, IHEAD + (s - self._seq_bases[f]) * SEQ_ENTRY_SIZE

    def _seq_entry(self, key: bytes) -> tuple[int, int, tuple[int, ...]] | None:
        """(file id, offset, fields) of the live entry of a sequential key, or None."""
        loc = self._slot(key)
        if loc is None:
            return None
        if self._early or self._late:
            self.write_out()  # pending slot flags must be visible to the read below
        fields = self._ientry(loc[0], loc[1])
        if fields[4] & FLAG_DELETED:
            return None
        return loc[0], loc[1], fields

    def _apply_patches(self, patches: list[tuple[int, int, bytes]]) -> None:
        # Through the shared map when it covers the byte (no system call), else pwrite.
        ix = self._index
        maps = self._maps
        for fid, at, raw in patches:
            mm = maps.get(fid)
            if mm is not None and at + len(raw) <= len(mm):
                mm[at:at + len(raw)] = raw
                if fid != ix.fileid:
                    self._patched_paths.add(self._ipath(fid))
            elif fid == ix.fileid:
                os.pwrite(ix.fd, raw, at)
            else:
                path = self._ipath(fid)
                os.pwrite(self._readers.fd(path), raw, at)
                self._patched_paths.add(path)
        patches.clear()

    def write_out(self) -> None:
        """Hand every buffered write to the OS, in the crash-safe order.

        Data first (the index never points at data the OS has not seen), then delete flags
        of entries already on disk (their tombstone is the first thing in this batch, see
        delete()), then index appends, then the flags of overwritten entries (until then the
        loader resolves an overwrite by replay order). A crash anywhere leaves a prefix of
        the operations once the loader has cut the unindexed data tail.
        """
        self._pending = False
        self._data.write_out()
        if self._early:
            self._apply_patches(self._early)
        self._index.write_out()
        if self._late:
            self._apply_patches(self._late)

    def fsync(self) -> None:
        """write_out() then make it durable."""
        self.write_out()
        self._data.fsync()
        self._index.fsync()
        for path in self._patched_paths:
            os.fsync(self._readers.fd(path))
        self._patched_paths.clear()

    def _rotate(self) -> None:
        self.write_out()
        if self._durable:
            self.fsync()  # the pair being closed is not fsynced by a later flush
        old_i, old_d = self._index, self._data
        new = old_d.fileid + 1
        if new > MAX_FILEID:
            raise ZdbError(f"namespace {self.name}: too many data files (max {MAX_FILEID})")
        create_pair(self._ipath(new), self._dpath(new), new,
                    MODE_SEQ if self.mode is Mode.SEQ else MODE_USER, durable=self._durable)
        self._closed_isizes.append(old_i.size)
        self._closed_dsizes.append(old_d.size)
        old_i.close()
        old_d.close()
        self._index = AppendFile(self._ipath(new), new)
        self._data = AppendFile(self._dpath(new), new, mapped=True, reserve=self._datasize)
        if self.mode is Mode.SEQ:
            self._seq_bases.append(self._seq_next)
        log.info("event=zdb.rotate namespace=%s fileid=%d", self.name, new)
