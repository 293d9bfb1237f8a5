"""One Zero-DB namespace: its settings, its index/data file pairs and the key operations.

User-mode namespaces keep every live key in a dict whose value is ONE small int: the file id
and offset of the key's index entry (`fid << 32 | offset`); the entry itself is read from a
shared memory map of the index file. Sequential namespaces keep no per-key memory at all,
since a slot's index entry sits at a fixed offset. Writes are appended to in-memory tails and reach the OS
on `write_out()` (the engine calls it from `flush_all()`), in an order that keeps the files
recoverable after a crash at any point: data, then delete flags, then index appends, then the
"superseded" flags of overwritten entries.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import struct
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Final

import crc32c as _crc32c

from zerostack.zdb.engine import swap
from zerostack.zdb.engine.config import EngineConfig, Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.files import (
    AppendFile,
    Readers,
    create_pair,
    fsync_dir,
    iter_data_entries,
    write_new_file,
)
from zerostack.zdb.engine.format import (
    DATA_ENTRY,
    DATA_HEADER,
    FLAG_DELETED,
    INDEX_ENTRY,
    INDEX_FLAGS_AT,
    INDEX_HEADER,
    MAX_KEY,
    MODE_SEQ,
    MODE_USER,
    NS_FILENAME,
    SEQ_ENTRY_SIZE,
    SEQ_KEY,
    U32,
    NamespaceDescriptor,
    crc32,
    data_header,
    data_name,
    index_header,
    index_name,
    parse_index_header,
)

log: Final = logging.getLogger("zerostack.zdb.engine")

# A live user-mode key maps to `fid << 32 | index offset` (data and index file N always go
# together in user mode), an int of at most 2 digits: 32 bytes.
MAX_FILEID: Final = 0xFFFFFFF
# Re-map the current index file once this many bytes were written past the mapping.
REMAP_AFTER: Final = 256 * 1024

IHEAD: Final = INDEX_HEADER.size   # 29
DHEAD: Final = DATA_HEADER.size    # 28
IENT: Final = INDEX_ENTRY.size     # 34
DENT: Final = DATA_ENTRY.size      # 18
CURSOR: Final = struct.Struct("<BIIQ")  # version 1, index file id, index offset, reserved: 17 bytes
CURSOR_VERSION: Final = 1
AUTO_WRITE_OUT: Final = 4 * 1024 * 1024  # never hold more than this in a tail between flushes
# A crash leaves at most one write batch unindexed: the buffered tail plus one entry.
MAX_UNINDEXED_TAIL: Final = AUTO_WRITE_OUT + 2 * 8 * 1024 * 1024
# Cutting more dangling index entries than this on open means the data was lost or replaced,
# not torn by a crash: stop and let `check --repair` rebuild the index from the data.
MAX_REPAIRS: Final = 64

_idx_pack: Final = INDEX_ENTRY.pack
_idx_unpack: Final = INDEX_ENTRY.unpack_from
_dat_pack: Final = DATA_ENTRY.pack
_dat_unpack: Final = DATA_ENTRY.unpack_from
_seq_pack: Final = SEQ_KEY.pack
_seq_unpack: Final = SEQ_KEY.unpack
_u32: Final = struct.Struct("<I").unpack_from
_idx_head: Final = struct.Struct("<BII").unpack_from
_idx_len_crc: Final = struct.Struct("<5xI13xI").unpack_from  # (length, crc) of an index entry
_crc: Final = _crc32c.crc32c
_now: Final = time.time
_DELETED_BYTE: Final = bytes([FLAG_DELETED])
_SEQ_FIELDS: Final = struct.Struct(f"<xII4xBI{SEQ_ENTRY_SIZE - 18}x").iter_unpack
_LOW_BIT: Final = bytes(b & FLAG_DELETED for b in range(256))  # translate table: flags -> deleted bit
# entry header + key in one pack() call, one struct per key length
_IDX_WITH_KEY: Final = [struct.Struct(f"<BIIIBIIIII{n}s").pack for n in range(MAX_KEY + 1)]
_DAT_WITH_KEY: Final = [struct.Struct(f"<BIIIBI{n}s").pack for n in range(MAX_KEY + 1)]


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


def encode_cursor(fid: int, off: int) -> bytes:
    return CURSOR.pack(CURSOR_VERSION, fid, off, 0)


def decode_cursor(cursor: bytes) -> tuple[int, int]:
    if len(cursor) != CURSOR.size or cursor[0] != CURSOR_VERSION:
        raise ZdbError("Invalid cursor")
    _v, fid, off, _r = CURSOR.unpack(cursor)
    return fid, off


def _index_offsets(raw: mmap.mmap | bytes) -> tuple[Sequence[int], list[bytes], int]:
    """(entry offsets, keys, end of the last whole entry) of an index file's bytes.

    Runs of equal-size entries (fixed-size keys, the usual case) are found with a strided
    slice and decoded by struct.iter_unpack, so a million entries load without a Python
    loop per entry; anything else falls back to walking entry by entry.
    """
    n = len(raw)
    if n < IHEAD + IENT:
        return [], [], IHEAD
    kl0 = raw[IHEAD]
    step = IENT + kl0
    count = (n - IHEAD) // step
    end = IHEAD + count * step
    if kl0 and raw[IHEAD:end:step] == bytes([kl0]) * count:
        getkey = struct.Struct(f"<{IENT}x{kl0}s").iter_unpack
        with memoryview(raw) as view:  # released at once: a map with exports cannot close
            keys = list(map(itemgetter(0), getkey(view[IHEAD:end])))
        offs: Sequence[int] = range(IHEAD, end, step)
        if end == n or end + IENT > n:
            return offs, keys, end
        more, mkeys, end = _walk_entries(raw, end)
        return [*offs, *more], keys + mkeys, end
    offs, keys, end = _walk_entries(raw, IHEAD)
    return offs, keys, end


def _walk_entries(raw: mmap.mmap | bytes, off: int) -> tuple[list[int], list[bytes], int]:
    n = len(raw)
    offs: list[int] = []
    keys: list[bytes] = []
    while off + IENT <= n:
        kl = raw[off]
        end = off + IENT + kl
        if kl == 0 or end > n:
            break
        offs.append(off)
        keys.append(raw[off + IENT:end])
        off = end
    return offs, keys, off


def replay_user_index(raw: mmap.mmap | bytes, fid: int, keys: dict[bytes, int]
                      ) -> tuple[int, int, int, int, int]:
    """Replay the entries of user-mode index file `fid` into `keys`.

    Returns (end of the last whole entry, offset of the last entry or 0, number of entries
    not flagged deleted, their payload bytes, number of entries). Replaying in order, the newest entry of a
    key decides: flagged deleted means the key was deleted (an overwritten entry is flagged
    too, and a newer entry of the same key follows it).
    """
    offs, klist, end = _index_offsets(raw)
    if not offs:
        return end, 0, 0, 0, 0
    base = fid << 32
    vals: Sequence[int]
    if isinstance(offs, range):
        vals = range(base | offs.start, base | offs.stop, offs.step)
        flags = raw[offs.start + INDEX_FLAGS_AT:offs.stop:offs.step]
    else:
        vals = [base | o for o in offs]
        flags = bytes([raw[o + INDEX_FLAGS_AT] for o in offs])
    keys.update(zip(klist, vals, strict=True))
    if flags.count(0) == len(flags):
        return end, offs[-1], len(offs), _sum_lengths(raw, offs), len(offs)
    deleted = 0
    total = 0
    get = keys.get
    for i, f in enumerate(flags):
        if f & FLAG_DELETED:
            deleted += 1
            k = klist[i]
            if get(k) == vals[i]:
                del keys[k]
        else:
            total += _u32(raw, offs[i] + 5)[0]
    return end, offs[-1], len(offs) - deleted, total, len(offs)


def _sum_lengths(raw: mmap.mmap | bytes, offs: Sequence[int]) -> int:
    """Sum of the payload lengths of the entries at `offs`. For equal-size entries, each
    byte of the u32 is summed from its own strided slice: no object per entry, which keeps
    the loader from leaving freed small objects scattered through the heap."""
    if isinstance(offs, range):
        at = offs.start + 5
        return sum(sum(raw[at + b:offs.stop:offs.step]) << (8 * b) for b in range(4))
    return sum(_u32(raw, o + 5)[0] for o in offs)


def find_superseded(raws: Sequence[mmap.mmap | bytes], keys: dict[bytes, int]) -> list[tuple[int, int]]:
    """Entries not flagged deleted although a newer entry of their key exists (the flag was
    lost in a crash): (fid, offset) of each."""
    out = []
    for fid, raw in enumerate(raws):
        offs, klist, _end = _index_offsets(raw)
        for off, key in zip(offs, klist, strict=True):
            if not raw[off + INDEX_FLAGS_AT] & FLAG_DELETED and keys.get(key) != (fid << 32 | off):
                out.append((fid, off))
    return out


class Namespace:
    """A namespace: settings, files and the key/value operations of the command layer."""

    def __init__(self, name: str, index_root: Path, data_root: Path, config: EngineConfig,
                 on_dirty: Callable[[Namespace], None], create_mode: Mode | None = None) -> None:
        self.name = name
        self.index_root = index_root
        self.data_root = data_root
        self._config = config
        self._on_dirty = on_dirty
        self._sync = config.sync
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
        if create_mode is not None:
            self._create(create_mode)
        self._load()

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
                    durable=self._sync)

    def _count_files(self, root: Path, name: Callable[[int], str]) -> int:
        n = 0
        while (root / name(n)).exists():
            n += 1
        return n

    def _prepare_files(self) -> int:
        """Make sure pairs 0..N-1 exist with valid headers; returns N. Only the last pair
        may be missing a file or hold a torn header (a crash while rotating)."""
        self.data_root.mkdir(parents=True, exist_ok=True)
        n_idx = self._count_files(self.index_root, index_name)
        n_dat = self._count_files(self.data_root, data_name)
        pairs = max(n_idx, n_dat)
        mode = MODE_SEQ if self.mode is Mode.SEQ else MODE_USER
        if pairs == 0:
            create_pair(self._ipath(0), self._dpath(0), 0, mode)
            return 1
        if pairs - min(n_idx, n_dat) > 1:
            raise ZdbError(f"namespace {self.name}: {n_idx} index files but {n_dat} data files; "
                           "run `zerostack zdb check --repair`")
        last = pairs - 1
        if n_dat < n_idx and self._ipath(last).stat().st_size > IHEAD:
            raise ZdbError(f"namespace {self.name}: data file {data_name(last)} is missing but "
                           f"{index_name(last)} points into it; restore the data files (the "
                           "index is useless without them)")
        if n_idx < n_dat and self._dpath(last).stat().st_size > DHEAD:
            # rotation creates d<N> then i<N>: a missing i<N> next to data means a lost index
            raise ZdbError(f"namespace {self.name}: index file {index_name(last)} is missing "
                           f"but {data_name(last)} holds data; run `zerostack zdb check "
                           "--repair` to rebuild the index")
        if n_idx == 0:
            raise ZdbError(f"namespace {self.name}: index file i0 is missing; "
                           "run `zerostack zdb check --repair` to rebuild it")
        with open(self._ipath(0), "rb") as f:
            i0head = f.read(IHEAD)
        if len(i0head) < IHEAD and last == 0:
            mode = MODE_USER  # i0 was being created: a fresh namespace, rewritten below
        else:
            _fid, mode = parse_index_header(i0head, str(self._ipath(0)))
        for fid in range(pairs):
            for path, head, hsize in ((self._dpath(fid), None, DHEAD),
                                      (self._ipath(fid), mode, IHEAD)):
                size = path.stat().st_size if path.exists() else -1
                if size >= hsize:
                    continue
                if fid != last:
                    raise ZdbError(f"{path}: missing or truncated in the middle of the namespace; "
                                   "run `zerostack zdb check --repair`")
                log.warning("event=zdb.repair namespace=%s file=%s action=rewrite-header",
                            self.name, path.name)
                if head is None:
                    write_new_file(path, data_header(fid))
                else:
                    write_new_file(path, index_header(fid, head))
        return pairs

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

    def _map(self, fid: int) -> mmap.mmap:
        """A shared map of index file `fid`: reads see in-place patches, and small patches
        are written through it."""
        old = self._maps.pop(fid, None)
        if old is not None:
            old.close()
        with open(self._ipath(fid), "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        self._maps[fid] = mm
        return mm

    def _ientry(self, fid: int, off: int) -> tuple[int, ...]:
        """Fields of the index entry at (fid, off) (not its key), buffered tail included."""
        ix = self._index
        if fid == ix.fileid:
            if off >= ix.disk_size:
                return _idx_unpack(ix.buf, off - ix.disk_size)
            mm = self._maps.get(fid)
            if mm is None or off + IENT > len(mm):
                if mm is not None and ix.disk_size - len(mm) < REMAP_AFTER:
                    return _idx_unpack(os.pread(ix.fd, IENT, off), 0)
                mm = self._map(fid)
            return _idx_unpack(mm, off)
        mm = self._maps.get(fid)
        if mm is None or off + IENT > len(mm):
            mm = self._map(fid)
        return _idx_unpack(mm, off)

    # ------------------------------------------------------------------ load

    def _load_descriptor(self) -> None:
        path = self.index_root / NS_FILENAME
        if not path.exists():
            desc = NamespaceDescriptor(self.name)
            write_new_file(path, desc.encode())
        else:
            desc = NamespaceDescriptor.decode(path.read_bytes(), str(path))
        self.password = desc.password
        self.public = desc.public
        self.worm = desc.worm
        self.maxsize = desc.maxsize

    def _save_descriptor(self) -> None:
        desc = NamespaceDescriptor(self.name, self.password, self.maxsize, self.public, self.worm)
        write_new_file(self.index_root / NS_FILENAME, desc.encode())

    def _load(self) -> None:
        try:
            swap.recover(self.index_root, self.data_root)
            self._load_descriptor()
            for _ in range(MAX_REPAIRS):
                if self._load_once():
                    return
            raise ZdbError(f"namespace {self.name}: more than {MAX_REPAIRS} index entries point "
                           "at data that is missing or different, more than a crash leaves; run "
                           "`zerostack zdb check --repair` to rebuild the index from the data")
        except ZdbError:
            self._close_files()
            raise
        except (OSError, ValueError, struct.error, IndexError, OverflowError) as exc:
            self._close_files()
            raise ZdbError(f"namespace {self.name} cannot be loaded: {exc}; "
                           "run `zerostack zdb check`") from exc

    def _reset_state(self) -> None:
        self._close_files()
        self._readers = Readers()
        self._keys = {}
        self._early.clear()
        self._late.clear()
        self._closed_isizes = []
        self._closed_dsizes = []
        self._seq_bases = [0]
        self._seq_next = 0
        self._inserted = 0
        self._count = 0
        self._bytes = 0
        self._data_prev = 0
        self._idx_prev = 0

    def _load_once(self) -> bool:
        """Load every file pair; False when a torn entry was cut and loading must restart."""
        self._reset_state()
        pairs = self._prepare_files()
        last = pairs - 1
        file_mode: int | None = None
        # (data fid, data offset, entry end, index fid, index offset) of the newest indexed data
        newest: tuple[int, int, int, int, int] | None = None
        unflagged = 0
        for fid in range(pairs):
            path = self._ipath(fid)
            raw = self._map(fid)
            _hfid, mode = parse_index_header(raw[:IHEAD], str(path))
            if file_mode is None:
                file_mode = mode
                self.mode = Mode.SEQ if mode == MODE_SEQ else Mode.USER
                self._check_server_mode()
            elif mode != file_mode:
                raise ZdbError(f"{path}: mode {mode} differs from i0 (mode {file_mode})")
            if self.mode is Mode.USER:
                end, last_off, live, total, entries = replay_user_index(raw, fid, self._keys)
                unflagged += live
                self._inserted += entries
                self._bytes += total
                if last_off:
                    kl, doff, ln = struct.unpack_from("<BII", raw, last_off)
                    newest = (fid, doff, doff + DENT + kl + ln, fid, last_off)
            else:
                end, last_off, found = self._replay_seq_index(raw, fid)
                if found is not None and (newest is None or found[:2] > newest[:2]):
                    newest = found
            size = len(raw)
            if end != size:
                if fid != last:
                    raise ZdbError(f"{path}: corrupt entry at offset {end}; "
                                   "run `zerostack zdb check --repair`")
                log.warning("event=zdb.repair namespace=%s file=%s action=cut-torn-index "
                            "offset=%d bytes=%d", self.name, path.name, end, size - end)
                self._maps.pop(fid).close()
                with open(path, "r+b") as f:
                    f.truncate(end)
                self._map(fid)
            if last_off:
                self._idx_prev = last_off
            if fid != last:
                self._closed_isizes.append(end)
                self._closed_dsizes.append(self._dpath(fid).stat().st_size)
            if self.mode is Mode.SEQ:
                self._seq_next += (end - IHEAD) // SEQ_ENTRY_SIZE
                if fid != last:
                    self._seq_bases.append(self._seq_next)
        self._index = AppendFile(self._ipath(last), last)
        self._data = AppendFile(self._dpath(last), last, mapped=True)
        if self.mode is Mode.USER and unflagged != len(self._keys):
            self._finish_overwrites(pairs)
        if newest is not None and not self._verify_newest(newest):
            return False
        self._recover_data_tail(newest)
        # The maps were read once to load; let the kernel keep those pages as cache only.
        for mm in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)
        return True

    def _finish_overwrites(self, pairs: int) -> None:
        """Flag entries whose key has a newer entry (a crash lost that flag)."""
        maps = [self._maps[fid] for fid in range(pairs)]
        for fid, ioff in find_superseded(maps, self._keys):
            log.warning("event=zdb.repair namespace=%s action=finish-overwrite file=%s "
                        "offset=%d", self.name, index_name(fid), ioff)
            fd = self._index.fd if fid == self._index.fileid else self._readers.fd(self._ipath(fid))
            os.pwrite(fd, _DELETED_BYTE, ioff + INDEX_FLAGS_AT)
        self._bytes = sum(_u32(maps[p >> 32], (p & U32) + 5)[0] for p in self._keys.values())

    def _check_server_mode(self) -> None:
        server = self._config.mode
        if server is not Mode.MIXED and server is not self.mode:
            raise ZdbError(f"namespace {self.name} was created in {self.mode.value} mode but the "
                           f"server runs in {server.value} mode; start it with --mode "
                           f"{self.mode.value} (or without --mode)")

    def _replay_seq_index(self, raw: mmap.mmap, fid: int
                          ) -> tuple[int, int, tuple[int, int, int, int, int] | None]:
        """Count the live slots of sequential index file `fid` (all entries are 42 bytes, so
        fields are gathered with strided slices and iter_unpack, without a loop per entry).

        Returns (end of the last whole entry, offset of the last entry or 0, position of the
        entry pointing at the newest data)."""
        n = len(raw)
        count = (n - IHEAD) // SEQ_ENTRY_SIZE
        end = IHEAD + count * SEQ_ENTRY_SIZE
        if count and raw[IHEAD:end:SEQ_ENTRY_SIZE] != bytes([SEQ_KEY.size]) * count:
            # a key length other than 8: the file is torn or damaged from that entry on
            lengths = raw[IHEAD:end:SEQ_ENTRY_SIZE]
            bad = next(i for i, c in enumerate(lengths) if c != SEQ_KEY.size)
            count = bad
            end = IHEAD + count * SEQ_ENTRY_SIZE
        if not count:
            return end, 0, None
        with memoryview(raw) as view:
            fields = list(_SEQ_FIELDS(view[IHEAD:end]))  # (doff, length, flags, data id)
        deleted = raw[IHEAD + INDEX_FLAGS_AT:end:SEQ_ENTRY_SIZE].translate(_LOW_BIT)
        live = count - deleted.count(1)
        if live == count:
            total = sum(f[1] for f in fields)
        else:
            total = sum(f[1] for f, d in zip(fields, deleted, strict=True) if not d)
        i, (doff, ln, _fl, did) = max(enumerate(fields), key=lambda e: (e[1][3] or fid, e[1][0]))
        newest = (did or fid, doff, doff + DENT + SEQ_KEY.size + ln, fid,
                  IHEAD + i * SEQ_ENTRY_SIZE)
        self._count += live
        self._bytes += total
        return end, end - SEQ_ENTRY_SIZE, newest

    def _read_data_entry(self, fid: int, doff: int) -> tuple[tuple[int, ...], bytes, bytes] | None:
        """(header fields, key, payload) of the data entry at (fid, doff), None if torn."""
        head = self._read_data(fid, doff, DENT)
        if len(head) < DENT:
            return None
        fields = _dat_unpack(head, 0)
        kl, ln = fields[0], fields[1]
        body = self._read_data(fid, doff + DENT, kl + ln)
        if len(body) < kl + ln:
            return None
        return fields, body[:kl], body[kl:]

    def _verify_newest(self, newest: tuple[int, int, int, int, int]) -> bool:
        """Check that the newest indexed payload is whole; if not, cut it and ask for a reload."""
        dfid, doff, _end, ifid, ioff = newest
        raw = self._read_index(ifid, ioff, IENT + MAX_KEY)
        kl, _d, ln, _p, fl, _di, _ts, crc, _pi, _po = _idx_unpack(raw, 0)
        if fl & FLAG_DELETED:
            return True
        key = raw[IENT:IENT + kl]
        found = self._read_data_entry(dfid, doff) if dfid <= self._data.fileid else None
        if found is not None:
            fields, dkey, payload = found
            if dkey == key and fields[1] == ln and fields[3] == crc and crc32(payload) == crc:
                return True
        # The index points at data that never fully reached the disk (power loss without
        # sync): drop that entry and everything written after its data.
        log.warning("event=zdb.repair namespace=%s file=%s action=cut-dangling-index offset=%d",
                    self.name, index_name(ifid), ioff)
        self._drop_maps()
        if ifid == self._index.fileid and ioff == self._idx_prev:
            self._index.truncate(ioff)
        else:
            fd = self._index.fd if ifid == self._index.fileid else self._readers.fd(self._ipath(ifid))
            os.pwrite(fd, _DELETED_BYTE, ioff + INDEX_FLAGS_AT)
        if dfid == self._data.fileid and doff < self._data.disk_size:
            self._data.truncate(doff)
        return False

    def _recover_data_tail(self, newest: tuple[int, int, int, int, int] | None) -> None:
        """Walk the data written after the newest indexed entry of the last data file.

        Tombstones there are deletes whose index flag may not have been written yet: finish
        them. The first entry that is not a tombstone was never indexed, and a torn entry was
        never completed: cut the file there.
        """
        data = self._data
        start = DHEAD
        prev_off = 0
        if newest is not None and newest[0] == data.fileid:
            start = min(newest[2], data.disk_size)
            prev_off = newest[1]
        tail = os.pread(data.fd, max(0, data.disk_size - start), start)
        good = 0
        for off, kl, ln, _prev, _crc, fl, _ts in iter_data_entries(tail, 0):
            if not (fl & FLAG_DELETED and ln == 0):
                break
            key = tail[off + DENT:off + DENT + kl]
            self._finish_delete(key)
            good = off + DENT + kl
            prev_off = start + off
        if data.disk_size - start - good > MAX_UNINDEXED_TAIL:
            # More than one write batch can leave behind: the index was lost, not torn.
            raise ZdbError(f"namespace {self.name}: {data.disk_size - start - good} bytes at the "
                           f"end of {data.path.name} are not in the index, more than a crash "
                           "leaves; the index looks lost or damaged. Nothing was cut: run "
                           "`zerostack zdb check --repair` to rebuild it from the data files")
        if start + good < data.disk_size:
            log.warning("event=zdb.repair namespace=%s file=%s action=cut-data-tail offset=%d "
                        "bytes=%d", self.name, data.path.name, start + good,
                        data.disk_size - start - good)
            data.truncate(start + good)
        if prev_off == 0 and data.fileid > 0:
            prev_off = self._last_entry_before(data.fileid, newest)
        self._data_prev = prev_off

    def _last_entry_before(self, fid: int, newest: tuple[int, int, int, int, int] | None) -> int:
        """Offset of the last data entry in the newest non-empty data file before `fid`
        (the `previous` link of the next entry continues across files)."""
        for f in range(fid - 1, -1, -1):
            start = newest[1] if newest is not None and newest[0] == f else DHEAD
            if newest is not None and newest[0] > f:
                return 0
            raw = self._dpath(f).read_bytes()
            last = 0
            for off, *_rest in iter_data_entries(raw, start):
                last = off
            if last:
                return last
        return 0

    def _finish_delete(self, key: bytes) -> None:
        if self.mode is Mode.USER:
            p = self._keys.pop(key, None)
            if p is None:
                return
            fid, ioff = p >> 32, p & U32
            self._bytes -= self._ientry(fid, ioff)[2]
        else:
            loc = self._slot(key)
            if loc is None:
                return
            fid, ioff = loc
            raw = self._read_index(fid, ioff, IENT)
            if raw[INDEX_FLAGS_AT] & FLAG_DELETED:
                return
            self._count -= 1
            self._bytes -= _idx_unpack(raw, 0)[2]
        log.warning("event=zdb.repair namespace=%s action=finish-delete file=%s offset=%d",
                    self.name, index_name(fid), ioff)
        fd = self._index.fd if fid == self._index.fileid else self._readers.fd(self._ipath(fid))
        os.pwrite(fd, _DELETED_BYTE, ioff + INDEX_FLAGS_AT)

    # ------------------------------------------------------------- low level

    def _read_data(self, fid: int, offset: int, length: int) -> bytes:
        d = self._data
        if fid == d.fileid:
            return d.read(offset, length)
        return os.pread(self._readers.fd(self._dpath(fid)), length, offset)

    def _read_index(self, fid: int, offset: int, length: int) -> bytes:
        if self._early or self._late:
            self.write_out()
        ix = self._index
        if fid == ix.fileid:
            return ix.read(offset, length)
        return os.pread(self._readers.fd(self._ipath(fid)), length, offset)

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

    def _flag_deleted(self, fid: int, ioff: int, late: bool) -> None:
        ix = self._index
        at = ioff + INDEX_FLAGS_AT
        if fid == ix.fileid and ix.patch(at, _DELETED_BYTE):
            return
        (self._late if late else self._early).append((fid, at, _DELETED_BYTE))

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

    def _written(self) -> None:
        if self._sync:
            self.fsync()
        else:
            if not self._pending:
                self._pending = True
                self._on_dirty(self)
            if len(self._data.buf) > AUTO_WRITE_OUT:
                self.write_out()

    def _make_room(self, entry_size: int) -> None:
        if self._data.size + entry_size > self._datasize and self._data.size > DHEAD:
            self._rotate()

    def _rotate(self) -> None:
        self.write_out()
        if self._sync:
            self.fsync()
        old_i, old_d = self._index, self._data
        new = old_d.fileid + 1
        if new > MAX_FILEID:
            raise ZdbError(f"namespace {self.name}: too many data files (max {MAX_FILEID})")
        create_pair(self._ipath(new), self._dpath(new), new,
                    MODE_SEQ if self.mode is Mode.SEQ else MODE_USER, durable=self._sync)
        self._closed_isizes.append(old_i.size)
        self._closed_dsizes.append(old_d.size)
        old_i.close()
        old_d.close()
        self._index = AppendFile(self._ipath(new), new)
        self._data = AppendFile(self._dpath(new), new, mapped=True)
        if self.mode is Mode.SEQ:
            self._seq_bases.append(self._seq_next)
        log.info("event=zdb.rotate namespace=%s fileid=%d", self.name, new)

    def _check_writable(self) -> None:
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        if self.locked:
            raise ZdbError("Namespace is temporarily locked (read-only)")

    def _slot(self, key: bytes) -> tuple[int, int] | None:
        """(index file id, offset) of sequential key `key`, None if it was never assigned."""
        if len(key) != SEQ_KEY.size:
            return None
        s = _seq_unpack(key)[0]
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

    # ------------------------------------------------------------ public API

    def set(self, key: bytes, value: bytes, timestamp: int | None = None) -> bytes | None:
        """SET: store `value`; returns the key, or None when the stored value is identical."""
        # The hot path of the server: attribute lookups and calls are kept to a minimum.
        if self.locked or self.frozen:
            self._check_writable()
        if self._seqmode:
            return self._seq_set(key, value, timestamp)
        kl = len(key)
        if not 0 < kl <= MAX_KEY:
            raise ZdbError("Key too large" if kl else "Invalid argument, key needed")
        vl = len(value)
        crc = _crc(value, 0xFFFFFFFF) ^ 0xFFFFFFFF
        keys = self._keys
        old = keys.get(key)
        floating = 0
        if old is not None:
            if self.worm:
                raise ZdbError("Namespace is protected by worm mode")
            ofid = old >> 32
            ooff = old & U32
            # _ientry() inlined for an entry on disk under its map, reading only length and
            # CRC: every overwrite (and every SET of an unchanged value) comes here.
            ocrc: int
            mm = self._maps.get(ofid)
            if mm is not None and ooff + IENT <= len(mm) and (
                    ofid != self._index.fileid or ooff < self._index.disk_size):
                floating, ocrc = _idx_len_crc(mm, ooff)
            else:
                ofields = self._ientry(ofid, ooff)
                floating, ocrc = ofields[2], ofields[7]
            # Same CRC and length: the reference answers "nothing written" on CRC alone.
            if ocrc == crc and floating == vl:
                return None
        if self.maxsize and self._bytes + vl > self.maxsize + floating:
            raise ZdbError("No space left on this namespace")
        if timestamp is None:
            # One clock read per batch of writes: a batch lasts far less than a second.
            if not self._pending:
                self._ts = int(_now()) & U32
            ts = self._ts
        else:
            ts = timestamp & U32
        d = self._data
        dbuf = d.buf
        doff = d.disk_size + len(dbuf)
        if doff + DENT + kl + vl > self._datasize and doff > DHEAD:
            self._rotate()
            d = self._data
            dbuf = d.buf
            doff = d.disk_size + len(dbuf)
        dbuf += _DAT_WITH_KEY[kl](kl, vl, self._data_prev, crc, 0, ts, key)
        dbuf += value
        self._data_prev = doff
        ix = self._index
        ibuf = ix.buf
        fid = ix.fileid
        ioff = ix.disk_size + len(ibuf)
        if old is None:
            ibuf += _IDX_WITH_KEY[kl](kl, doff, vl, self._idx_prev, 0, fid, ts, crc, 0, 0, key)
            self._inserted += 1
        else:
            ibuf += _IDX_WITH_KEY[kl](kl, doff, vl, self._idx_prev, 0, fid, ts, crc, ofid, ooff,
                                      key)
            self._flag_deleted(ofid, ooff, True)
            self._bytes -= floating
        self._idx_prev = ioff
        self._bytes += vl
        keys[key] = fid << 32 | ioff
        if self._sync:
            self.fsync()
        else:
            if not self._pending:
                self._pending = True
                self._on_dirty(self)
            if len(dbuf) > AUTO_WRITE_OUT:
                self.write_out()
        return key

    def _seq_set(self, key: bytes, value: bytes, timestamp: int | None) -> bytes | None:
        vl = len(value)
        crc = crc32(value)
        ts = (int(time.time()) if timestamp is None else timestamp) & U32
        kl = SEQ_KEY.size
        if not key:
            if self.maxsize and self._bytes + vl > self.maxsize:
                raise ZdbError("No space left on this namespace")
            self._make_room(DENT + kl + vl)
            key = _seq_pack(self._seq_next)
            d = self._data
            doff = d.size
            d.buf += _dat_pack(kl, vl, self._data_prev, crc, 0, ts) + key
            d.buf += value
            self._data_prev = doff
            ix = self._index
            ioff = ix.size
            ix.buf += _idx_pack(kl, doff, vl, self._idx_prev, 0, d.fileid, ts, crc, 0, 0) + key
            self._idx_prev = ioff
            self._seq_next += 1
            self._count += 1
            self._bytes += vl
            self._written()
            return key
        found = self._seq_entry(key)
        if found is None:
            raise ZdbError("Invalid key, only update authorized")
        if self.worm:
            raise ZdbError("Namespace is protected by worm mode")
        sfid, soff, (_kl, odoff, oln, oprev, ofl, odid, ots, ocrc, opid, opoff) = found
        if ocrc == crc and oln == vl and self.get(key) == value:
            return None
        if self.maxsize and self._bytes + vl > self.maxsize + oln:
            raise ZdbError("No space left on this namespace")
        self._make_room(DENT + kl + vl)
        d = self._data
        doff = d.size
        d.buf += _dat_pack(kl, vl, self._data_prev, crc, 0, ts) + key
        d.buf += value
        self._data_prev = doff
        # Keep the old version as a deleted copy (it takes the next slot, like the
        # reference), then point the slot at the new data with the copy as its parent.
        ix = self._index
        copy_off = ix.size
        ix.buf += _idx_pack(kl, odoff, oln, self._idx_prev, ofl | FLAG_DELETED, odid or sfid,
                            ots, ocrc, opid, opoff) + key
        self._idx_prev = copy_off
        self._seq_next += 1
        image = _idx_pack(kl, doff, vl, oprev, 0, d.fileid, ts, crc, ix.fileid, copy_off) + key
        if not (sfid == ix.fileid and ix.patch(soff, image)):
            # The slot is on disk: the rewrite must follow the data and the copy.
            self.write_out()
            fd = ix.fd if sfid == ix.fileid else self._readers.fd(self._ipath(sfid))
            os.pwrite(fd, image, soff)
            if sfid != ix.fileid:
                self._patched_paths.add(self._ipath(sfid))
        self._bytes += vl - oln
        self._written()
        return key

    def get(self, key: bytes) -> bytes | None:
        """GET: the value of `key`, or None."""
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        p = self._keys.get(key)
        if p is None:
            if self.mode is Mode.SEQ:
                found = self._seq_entry(key)
                if found is None:
                    return None
                sfid, _soff, fields = found
                return self._payload(fields[5] or sfid, fields[1], fields[0], fields[2])
            return None
        # inlined _ientry() + _payload() for the common case: both in the current pair
        fid = p >> 32
        ioff = p & U32
        ix = self._index
        d = self._data
        if fid == ix.fileid:
            # Typed, so the native build does this arithmetic on machine integers.
            _kl: int
            doff: int
            ln: int
            disk = ix.disk_size
            if ioff >= disk:
                _kl, doff, ln = _idx_head(ix.buf, ioff - disk)
            else:
                mm = self._maps.get(fid)
                if mm is not None and ioff + IENT <= len(mm):
                    _kl, doff, ln = _idx_head(mm, ioff)
                else:
                    _kl, doff, ln = self._ientry(fid, ioff)[:3]
            start = doff + DENT + _kl
            end = start + ln
            if end <= d.mapped:
                # most reads: a slice of the data file's map, no system call
                return d.map[start:end]  # type: ignore[index]
            disk = d.disk_size
            if start >= disk:
                return bytes(d.buf[start - disk:end - disk])
            if end <= disk:
                value = d.read(start, ln)
                if len(value) == ln:
                    return value
        f = self._ientry(fid, ioff)
        return self._payload(fid, f[1], f[0], f[2])

    def _payload(self, fid: int, doff: int, kl: int, ln: int) -> bytes:
        start = doff + DENT + kl
        d = self._data
        if fid == d.fileid:
            value = d.read(start, ln)
        else:
            value = os.pread(self._readers.fd(self._dpath(fid)), ln, start)
        if len(value) != ln:
            raise ZdbError(f"namespace {self.name}: data file d{fid} is shorter than its index "
                           "says; run `zerostack zdb check`")
        return value

    def exists(self, key: bytes) -> bool:
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        if self.mode is Mode.SEQ:
            return self._seq_entry(key) is not None
        return key in self._keys

    def _locate(self, key: bytes) -> tuple[int, int, int, int, int, int, int] | None:
        """(index fid, index offset, data fid, data offset, length, crc, ts) of a live key."""
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        if self.mode is Mode.SEQ:
            found = self._seq_entry(key)
            if found is None:
                return None
            sfid, soff, f = found
            return sfid, soff, f[5] or sfid, f[1], f[2], f[7], f[6]
        p = self._keys.get(key)
        if p is None:
            return None
        fid, ioff = p >> 32, p & U32
        f = self._ientry(fid, ioff)
        return fid, ioff, fid, f[1], f[2], f[7], f[6]

    def check(self, key: bytes) -> bool | None:
        """CHECK: re-read the payload from disk and verify its CRC; None if the key is missing."""
        loc = self._locate(key)
        if loc is None:
            return None
        _if, _io, dfid, doff, ln, crc, _ts = loc
        found = self._read_data_entry(dfid, doff)
        if found is None:
            return False
        fields, dkey, payload = found
        return dkey == key and fields[1] == ln and fields[3] == crc and crc32(payload) == crc

    def delete(self, key: bytes, timestamp: int | None = None) -> None:
        """DEL: append a tombstone and flag the index entry deleted."""
        self._check_writable()
        loc = self._locate(key)
        if loc is None:
            raise ZdbError("Key not found")
        if self.worm:
            raise ZdbError("Cannot delete a key when namespace is in worm mode")
        ifid, ioff, _df, _do, ln, _crc, _ts = loc
        ts = (int(time.time()) if timestamp is None else timestamp) & U32
        kl = len(key)
        ix = self._index
        if (ifid != ix.fileid or ioff < ix.disk_size) and (self._data.buf or ix.buf):
            # The flag goes to disk before this batch's index appends (see write_out); hand
            # earlier writes over first so a crash keeps a prefix of the operations.
            self.write_out()
        self._make_room(DENT + kl)
        d = self._data
        doff = d.size
        d.buf += _dat_pack(kl, 0, self._data_prev, 0, FLAG_DELETED, ts) + key
        self._data_prev = doff
        self._flag_deleted(ifid, ioff, False)
        if self._seqmode:
            self._count -= 1
        else:
            del self._keys[key]
        self._bytes -= ln
        self._written()

    def length(self, key: bytes) -> int | None:
        loc = self._locate(key)
        return None if loc is None else loc[4]

    def keytime(self, key: bytes) -> int | None:
        loc = self._locate(key)
        return None if loc is None else loc[6]

    def keycur(self, key: bytes) -> bytes | None:
        """KEYCUR: a cursor positioned on `key` (SCAN from it continues after the key)."""
        loc = self._locate(key)
        return None if loc is None else encode_cursor(loc[0], loc[1])

    def dbsize(self) -> int:
        """Live keys (user mode: the key dict's size; sequential: a counter)."""
        return self._count if self._seqmode else len(self._keys)

    # ----------------------------------------------------------------- scans

    def _entry_at(self, fid: int, off: int) -> tuple[tuple[int, ...], bytes]:
        raw = self._read_index(fid, off, IENT + MAX_KEY)
        if len(raw) < IENT or len(raw) < IENT + raw[0]:
            raise ZdbError("Invalid cursor")
        fields = _idx_unpack(raw, 0)
        return fields, raw[IENT:IENT + fields[0]]

    def _first_pos(self, fid: int) -> tuple[int, int] | None:
        """First entry at or after the start of index file `fid`."""
        last = self._index.fileid
        while fid <= last:
            if self._index_size(fid) > IHEAD:
                return fid, IHEAD
            fid += 1
        return None

    def _last_pos(self, fid: int) -> tuple[int, int] | None:
        """Last entry of index file `fid` or of the newest non-empty file before it."""
        while fid >= 0:
            size = self._index_size(fid)
            if size > IHEAD:
                if self.mode is Mode.SEQ:
                    return fid, size - SEQ_ENTRY_SIZE
                # the first entry of the next non-empty file links back to our last one;
                # without one, the newest entry of all is ours
                nxt = self._first_pos(fid + 1)
                if nxt is None:
                    return fid, self._idx_prev
                fields, _k = self._entry_at(*nxt)
                return fid, fields[3]
            fid -= 1
        return None

    def _live_at(self, fid: int, off: int, fields: tuple[int, ...], key: bytes) -> bool:
        if fields[4] & FLAG_DELETED:
            return False
        if self.mode is Mode.SEQ:
            return True
        p = self._keys.get(key)
        return p == (fid << 32 | off)

    def scan(self, cursor: bytes | None, reverse: bool = False, count: int = 1
             ) -> tuple[bytes, list[tuple[bytes, int, int]]]:
        """SCAN/RSCAN: up to `count` live keys after `cursor` in write order (or before it).

        Returns (cursor of the last key returned, [(key, length, timestamp)]);
        ZdbError('No more data') when nothing is left.
        """
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        pos: tuple[int, int] | None
        if cursor is None:
            pos = self._last_pos(self._index.fileid) if reverse else self._first_pos(0)
        else:
            fid, off = decode_cursor(cursor)
            if not 0 <= fid <= self._index.fileid or not IHEAD <= off < self._index_size(fid):
                raise ZdbError("Invalid cursor")
            fields, _key = self._entry_at(fid, off)
            pos = self._step(fid, off, fields, reverse)
        out: list[tuple[bytes, int, int]] = []
        last = (0, 0)
        while pos is not None and len(out) < count:
            fid, off = pos
            fields, key = self._entry_at(fid, off)
            if self._live_at(fid, off, fields, key):
                out.append((key, fields[2], fields[6]))
                last = pos
            pos = self._step(fid, off, fields, reverse)
        if not out:
            raise ZdbError("No more data")
        return encode_cursor(*last), out

    def _step(self, fid: int, off: int, fields: tuple[int, ...], reverse: bool
              ) -> tuple[int, int] | None:
        if not reverse:
            nxt = off + IENT + fields[0]
            if nxt < self._index_size(fid):
                return fid, nxt
            return self._first_pos(fid + 1)
        if off > IHEAD:
            prev = off - SEQ_ENTRY_SIZE if self.mode is Mode.SEQ else fields[3]
            if not IHEAD <= prev < off:
                raise ZdbError(f"namespace {self.name}: broken previous link in "
                               f"{index_name(fid)} at {off}; run `zerostack zdb check`")
            return fid, prev
        return self._last_pos(fid - 1)

    def history(self, key: bytes, cursor: bytes | None = None
                ) -> tuple[bytes | None, int, bytes] | None:
        """HISTORY: (cursor of the older version or None, timestamp, value), newest first.

        Without a cursor, starts at the live value of `key` (None if the key is missing).
        """
        if cursor is None:
            loc = self._locate(key)
            if loc is None:
                return None
            fid, off = loc[0], loc[1]
        else:
            fid, off = decode_cursor(cursor)
            if not 0 <= fid <= self._index.fileid or not IHEAD <= off < self._index_size(fid):
                raise ZdbError("Invalid cursor")
        fields, ekey = self._entry_at(fid, off)
        if ekey != key:
            raise ZdbError("Invalid cursor")
        _kl, doff, ln, _p, _fl, did, ts, _crc, pid, poff = fields
        _dfid, value = self._versioned_payload(fid, did, doff, key, ln)
        older = encode_cursor(pid, poff) if (pid or poff) else None
        return older, ts, value

    def _versioned_payload(self, ifid: int, did: int, doff: int, key: bytes, ln: int
                           ) -> tuple[int, bytes]:
        """(data file id, payload) of the version whose index entry sits in file `ifid`."""
        # The reference writes data_id 0 for first inserts: the payload then sits in the
        # data file of the index file's number. A sequential deleted copy may also point at
        # an older file with data_id 0, so check the key and fall back to d0.
        candidates = [did or ifid] + ([0] if did == 0 and ifid != 0 else [])
        for dfid in candidates:
            if dfid > self._data.fileid:
                continue
            found = self._read_data_entry(dfid, doff)
            if found is not None and found[1] == key and found[0][1] == ln:
                return dfid, found[2]
        raise ZdbError(f"namespace {self.name}: history entry of {key!r} points at missing data")

    def version_chain(self, key: bytes) -> list[tuple[int, int, int]]:
        """(data file id, data offset, timestamp) of every stored version of a live key,
        newest first (used by compaction)."""
        loc = self._locate(key)
        if loc is None:
            return []
        fid, off = loc[0], loc[1]
        out: list[tuple[int, int, int]] = []
        seen: set[tuple[int, int]] = set()
        while (fid, off) not in seen:
            seen.add((fid, off))
            fields, ekey = self._entry_at(fid, off)
            if ekey != key:
                break
            dfid, _value = self._versioned_payload(fid, fields[5], fields[1], key, fields[2])
            out.append((dfid, fields[1], fields[6]))
            if not (fields[8] or fields[9]):
                break
            fid, off = fields[8], fields[9]
        return out

    def live_versions(self, keep_history: int | None = None
                      ) -> list[tuple[int, int, int, bytes, int, int]]:
        """(data file id, data offset, timestamp, key, length, crc) of every version of every
        live key of a user-mode namespace, newest version first per key, at most
        1 + keep_history versions per key (all when None). Read from the index maps only."""
        if self._seqmode:
            raise ZdbError("live_versions() is for user-mode namespaces")
        if self._early or self._late:
            self.write_out()
        out: list[tuple[int, int, int, bytes, int, int]] = []
        limit = -1 if keep_history is None else keep_history + 1
        ientry = self._ientry
        for key, p in self._keys.items():
            fid, off = p >> 32, p & U32
            n = 0
            seen: set[int] = set()
            while n != limit:
                _kl, doff, ln, _p, _fl, _did, ts, crc, pid, poff = ientry(fid, off)
                # user mode: a payload always sits in the data file of its index file's number
                out.append((fid, doff, ts, key, ln, crc))
                n += 1
                if not (pid or poff) or (pid << 32 | poff) in seen:
                    break
                seen.add(pid << 32 | poff)
                fid, off = pid, poff
        return out

    def payload_at(self, fileid: int, offset: int) -> bytes:
        """Payload of the data entry at (fileid, offset); ZdbError if it is torn."""
        found = self._read_data_entry(fileid, offset)
        if found is None or crc32(found[2]) != found[0][3]:
            raise ZdbError(f"namespace {self.name}: data entry d{fileid}:{offset} is damaged")
        return found[2]

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
        if self._sync:
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

    def data_raw(self, fileid: int, offset: int) -> tuple[bytes, int, int, int, int, bytes]:
        """DATA RAW: (key, previous, crc, flags, timestamp, payload) of the data entry at
        (fileid, offset); ZdbError('EOF') past the end."""
        if not 0 <= fileid <= self._data.fileid or offset < DHEAD:
            raise ZdbError("EOF")
        if offset + DENT > self._data_size(fileid):
            raise ZdbError("EOF")
        found = self._read_data_entry(fileid, offset)
        if found is None:
            raise ZdbError("EOF")
        (_kl, _ln, prev, crc, fl, ts), key, payload = found
        return key, prev, crc, fl, ts, payload

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
                    and _seq_unpack(key)[0] == self._seq_next:
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
