"""Opening a namespace: replay its index files into memory and repair what a crash left
(torn entries, lost flags, an unindexed data tail), like the reference's index_loader.c.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from operator import itemgetter
from typing import Final

from zerostack.zdb.engine import swap
from zerostack.zdb.engine.config import Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.files import (
    AppendFile,
    Readers,
    create_pair,
    iter_data_entries,
    write_new_file,
)
from zerostack.zdb.engine.format import (
    FLAG_DELETED,
    INDEX_FLAGS_AT,
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
from zerostack.zdb.engine.nsfiles import (
    AUTO_WRITE_OUT,
    DELETED_BYTE,
    DENT,
    DHEAD,
    IENT,
    IHEAD,
    NamespaceFiles,
    idx_unpack,
    log,
)

# A crash leaves at most one write batch unindexed: the buffered tail plus one entry.
MAX_UNINDEXED_TAIL: Final = AUTO_WRITE_OUT + 2 * 8 * 1024 * 1024
# Cutting more dangling index entries than this on open means the data was lost or replaced,
# not torn by a crash: stop and let `check --repair` rebuild the index from the data.
MAX_REPAIRS: Final = 64
_u32: Final = struct.Struct("<I").unpack_from
_SEQ_FIELDS: Final = struct.Struct(f"<xII4xBI{SEQ_ENTRY_SIZE - 18}x").iter_unpack
_LOW_BIT: Final = bytes(b & FLAG_DELETED for b in range(256))  # translate table: flags -> deleted bit


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
    not flagged deleted, their payload bytes, number of entries). Replaying in order, the
    newest entry of a
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


class NamespaceRecovery(NamespaceFiles):
    """Loading and repair: everything that runs while a namespace is opened."""

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
        self._data = AppendFile(self._dpath(last), last, mapped=True, reserve=self._datasize)
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
            os.pwrite(fd, DELETED_BYTE, ioff + INDEX_FLAGS_AT)
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

    def _verify_newest(self, newest: tuple[int, int, int, int, int]) -> bool:
        """Check that the newest indexed payload is whole; if not, cut it and ask for a reload."""
        dfid, doff, _end, ifid, ioff = newest
        raw = self._read_index(ifid, ioff, IENT + MAX_KEY)
        kl, _d, ln, _p, fl, _di, _ts, crc, _pi, _po = idx_unpack(raw, 0)
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
            os.pwrite(fd, DELETED_BYTE, ioff + INDEX_FLAGS_AT)
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
            self._bytes -= idx_unpack(raw, 0)[2]
        log.warning("event=zdb.repair namespace=%s action=finish-delete file=%s offset=%d",
                    self.name, index_name(fid), ioff)
        fd = self._index.fd if fid == self._index.fileid else self._readers.fd(self._ipath(fid))
        os.pwrite(fd, DELETED_BYTE, ioff + INDEX_FLAGS_AT)
