"""The read path of a namespace: GET and the lookups of EXISTS, CHECK, LENGTH, KEYTIME,
KEYCUR and DBSIZE (the reference's index_get.c and the read side of data.c).

GET goes through a location cache before the key dict: a flat table of 16-byte slots, one
per hash of a key, each holding (part of the key's hash, value length, data file id and
offset of its data entry). Most GETs then cost one read of the slot and one of the data
entry, which holds the key (compared to the one asked for) next to the value; the dict
lookup and the index entry it points to cost three or four reads from scattered memory
more, and on a namespace larger than the CPU caches each of them waits for memory.
A slot is filled when a GET reads the value through the dict, written with the new
location by a SET of the key, dropped by a delete, and the whole table is made anew when
the key dict is (load, compaction, FLUSH) or has outgrown it. Whatever changes a key's
entry in the dict must write or drop its slot (_lc_store, _lc_forget): a slot left
pointing at an older entry of the same key would answer its old value. A slot that names another key, or data not mapped
yet, only sends that GET through the dict.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

from zerostack.zdb.engine.config import Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import (
    U32,
    crc32,
)
from zerostack.zdb.engine.nsfiles import (
    DENT,
    IENT,
)
from zerostack.zdb.engine.recovery import NamespaceRecovery

_idx_head: Final = struct.Struct("<BII").unpack_from

LC_SLOT: Final = struct.Struct("<IIQ")  # hash tag, value length, data file id << 32 | offset
_lc_unpack: Final = LC_SLOT.unpack_from
_lc_pack: Final = LC_SLOT.pack_into
LC_HASH: Final = (1 << 60) - 1  # the bits of a key's hash used: slot from the low ones,
LC_TAG_SHIFT: Final = 28        # tag from bits 28-59
LC_MIN_SLOTS: Final = 1 << 12
LC_MAX_SLOTS: Final = 1 << 21   # 32 MiB
LC_SLOTS_PER_KEY: Final = 8  # made anew once the keys pass a quarter of the slots:
# 12-25% of the slots are in use, and at most about a fifth of the keys share theirs
LC_ONE_SLICE: Final = 4096      # values up to this size are sliced out with their key


CURSOR: Final = struct.Struct("<BIIQ")  # version 1, index file id, index offset, reserved: 17 bytes
CURSOR_VERSION: Final = 1


def encode_cursor(fid: int, off: int) -> bytes:
    return CURSOR.pack(CURSOR_VERSION, fid, off, 0)


def decode_cursor(cursor: bytes) -> tuple[int, int]:
    if len(cursor) != CURSOR.size or cursor[0] != CURSOR_VERSION:
        raise ZdbError("Invalid cursor")
    _v, fid, off, _r = CURSOR.unpack(cursor)
    return fid, off


class NamespaceReads(NamespaceRecovery):
    """Key lookups and value reads."""

    def get(self, key: bytes) -> bytes | None:
        """GET: the value of `key`, or None."""
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        if self._seqmode:
            found = self._seq_entry(key)
            if found is None:
                return None
            sfid, _soff, fields = found
            return self._payload(fields[5] or sfid, fields[1], fields[0], fields[2])
        table = self._keys
        lc = self._lc
        if lc is None or self._lc_for is not table or len(table) > self._lc_grow:
            lc = self._lc_reset()
        h: int = hash(key) & LC_HASH
        at: int = (h & self._lc_mask) << 4
        tag: int
        ln: int
        loc: int
        tag, ln, loc = _lc_unpack(lc, at)
        if loc and tag == h >> LC_TAG_SHIFT:
            value = self._lc_value(key, loc, ln)
            if value is not None:
                return value
        p = table.get(key)
        if p is None:
            return None
        return self._value_at(p, lc, at, h >> LC_TAG_SHIFT)

    def get_many(self, keys: list[bytes], budget: int) -> list[bytes | None]:
        """GET of each key in `keys`, in order, stopping after the value that takes the
        bytes returned past `budget` (the caller GETs the rest later, or not).

        The slots of the location cache are read together before any value is, so their
        cache misses overlap instead of queueing one behind the other: pipelined GETs of
        random keys spend most of their time waiting for memory."""
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        out: list[bytes | None] = []
        size = 0
        if self._seqmode:
            for key in keys:
                got = self.get(key)
                out.append(got)
                if got is not None:
                    size += len(got)
                    if size > budget:
                        break
            return out
        table = self._keys
        lc = self._lc
        if lc is None or self._lc_for is not table or len(table) > self._lc_grow:
            lc = self._lc_reset()
        mask: int = self._lc_mask
        # (hash() is taken once per key: half the hashes do not fit a machine integer of
        # the native build, and each operation on those makes an object)
        hashes = [hash(key) & LC_HASH for key in keys]
        slots = [_lc_unpack(lc, (h & mask) << 4) for h in hashes]
        d = self._data
        here: int = d.fileid
        here_map = d.map
        here_mapped: int = d.mapped
        dmaps = self._dmaps
        h: int
        tag: int
        ln: int
        loc: int
        fid: int
        start: int
        end: int
        kl: int
        for i in range(len(keys)):
            key = keys[i]
            tag, ln, loc = slots[i]
            h = hashes[i]
            value: bytes | None = None
            if loc and tag == h >> LC_TAG_SHIFT:
                # _lc_value(), inlined
                fid = loc >> 32
                start = (loc & U32) + DENT
                kl = len(key)
                end = start + kl + ln
                dm: mmap.mmap | None
                if fid == here:
                    dm = here_map if end <= here_mapped else None
                else:
                    dm = dmaps.get(fid)
                    if dm is not None and end > len(dm):
                        dm = None
                if dm is not None:
                    if ln <= LC_ONE_SLICE:
                        entry = dm[start:end]
                        if entry.startswith(key):
                            value = entry[kl:]
                    elif dm[start:start + kl] == key:
                        value = dm[start + kl:end]
            if value is None:
                p = table.get(key)
                if p is not None:
                    value = self._value_at(p, lc, (h & mask) << 4, h >> LC_TAG_SHIFT)
                    # (a read past the map maps the file again, closing the old map)
                    here_map = d.map
                    here_mapped = d.mapped
            out.append(value)
            if value is not None:
                size += len(value)
                if size > budget:
                    break
        return out

    # ---------------------------------------------------------- location cache

    def _lc_reset(self) -> mmap.mmap:
        """A new, empty location cache for the key dict as it is now: LC_SLOTS_PER_KEY
        slots per key (a power of two, LC_MIN_SLOTS to LC_MAX_SLOTS), made again once the
        keys pass a quarter of that. Anonymous memory, so only the slots used take any."""
        keys = self._keys
        slots = LC_MIN_SLOTS
        while slots < LC_SLOTS_PER_KEY * len(keys) and slots < LC_MAX_SLOTS:
            slots <<= 1
        old = self._lc
        self._lc = None
        if old is not None:
            old.close()
        # Private (a shared anonymous map gets no huge pages), in huge pages where the
        # kernel has them: random reads over the table then miss the TLB far less.
        lc = mmap.mmap(-1, slots * LC_SLOT.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            lc.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        self._lc = lc
        self._lc_mask = slots - 1
        self._lc_grow = slots // 4 if slots < LC_MAX_SLOTS else 1 << 62
        self._lc_for = keys
        return lc

    def _lc_forget(self, key: bytes) -> None:
        """Drop the cached location of `key`: every change of the key dict calls this.
        (The slot is cleared whichever key it holds: one a GET fills again.)"""
        lc = self._lc
        if lc is not None:
            _lc_pack(lc, ((hash(key) & LC_HASH) & self._lc_mask) << 4, 0, 0, 0)

    def _lc_store(self, key: bytes, loc: int, ln: int) -> None:
        """SET stored `key`'s value (`ln` bytes) in the data entry at `loc` (data file id
        << 32 | offset): its slot now says so, whichever key it held, so the GETs that
        follow a write find it without the key dict. (Until the entry is mapped, a GET
        reading the slot goes through the dict, see _lc_value.)"""
        lc = self._lc
        if lc is not None:
            h: int = hash(key) & LC_HASH
            _lc_pack(lc, (h & self._lc_mask) << 4, h >> LC_TAG_SHIFT, ln, loc)

    def _lc_value(self, key: bytes, loc: int, ln: int) -> bytes | None:
        """The value at data location `loc` when the entry there is `key`'s and mapped;
        None otherwise (the caller goes through the key dict)."""
        fid: int = loc >> 32
        start: int = (loc & U32) + DENT
        kl: int = len(key)
        d = self._data
        if fid == d.fileid:
            if start + kl + ln > d.mapped:
                return None
            dm = d.map
        else:
            dm = self._dmaps.get(fid)
            if dm is None or start + kl + ln > len(dm):
                return None
        if dm is None:
            return None
        if ln <= LC_ONE_SLICE:
            # key and value in one slice: one copy out of the map instead of two
            entry = dm[start:start + kl + ln]
            return entry[kl:] if entry.startswith(key) else None
        if dm[start:start + kl] != key:
            return None
        return dm[start + kl:start + kl + ln]

    def _value_at(self, p: int, lc: mmap.mmap | None = None, at: int = 0,
                  tag: int = 0) -> bytes:
        """The value of the live entry at `p` (`fid << 32 | index offset`); a value read
        from a map also fills the location cache `lc`'s slot at byte `at` with `tag`."""
        # inlined _ientry() + _payload() for the common cases: an entry of an older pair, or
        # of the current pair; both are slices of maps, without a system call.
        fid = p >> 32
        ioff = p & U32
        ix = self._index
        # Typed, so the native build does this arithmetic on machine integers.
        _kl: int
        doff: int
        ln: int
        start: int
        end: int
        if fid != ix.fileid:
            mm = self._maps.get(fid)
            if mm is not None and ioff + IENT <= len(mm):
                _kl, doff, ln = _idx_head(mm, ioff)
                dm = self._dmaps.get(fid)
                if dm is None:
                    dm = self._data_map(fid)
                start = doff + DENT + _kl
                end = start + ln
                if end <= len(dm):
                    if lc is not None:
                        _lc_pack(lc, at, tag, ln, fid << 32 | doff)
                    return dm[start:end]
        else:
            d = self._data
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
                if lc is not None:
                    _lc_pack(lc, at, tag, ln, fid << 32 | doff)
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
        value = d.read(start, ln) if fid == d.fileid else self._data_map(fid)[start:start + ln]
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
