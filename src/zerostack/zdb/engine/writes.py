"""The write path of a namespace: SET (user and sequential keys) and DEL, appended to the
in-memory tails that write_out() hands to the OS (the reference's index_set.c, index_seq.c).
"""

from __future__ import annotations

import os
import struct
import time
from typing import Final

import crc32c as _crc32c

from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import (
    DATA_ENTRY,
    FLAG_DELETED,
    INDEX_ENTRY,
    INDEX_FLAGS_AT,
    MAX_KEY,
    SEQ_KEY,
    U32,
    crc32,
)
from zerostack.zdb.engine.nsfiles import (
    AUTO_WRITE_OUT,
    DELETED_BYTE,
    DENT,
    DHEAD,
    IENT,
)
from zerostack.zdb.engine.reads import NamespaceReads

_idx_pack: Final = INDEX_ENTRY.pack
_dat_pack: Final = DATA_ENTRY.pack
_seq_pack: Final = SEQ_KEY.pack
_idx_len_crc: Final = struct.Struct("<5xI13xI").unpack_from  # (length, crc) of an index entry
_crc: Final = _crc32c.crc32c
_now: Final = time.time
# entry header + key in one pack() call, one struct per key length
_IDX_WITH_KEY: Final = [struct.Struct(f"<BIIIBIIIII{n}s").pack for n in range(MAX_KEY + 1)]
_DAT_WITH_KEY: Final = [struct.Struct(f"<BIIIBI{n}s").pack for n in range(MAX_KEY + 1)]
# A value at least this large goes to the OS at once, behind what is buffered, in one
# pwritev: copying it into the data tail would cost more than the system call.
DIRECT_WRITE: Final = 128 * 1024


class NamespaceWrites(NamespaceReads):
    """Appends of values and tombstones."""

    def set(self, key: bytes, value: bytes | bytearray,
            timestamp: int | None = None) -> bytes | None:
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
        self._data_prev = doff
        if vl >= DIRECT_WRITE:
            # Data reaches the OS before its index entry, as in write_out().
            d.write_out_with(value)
        else:
            dbuf += value
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
        self._lc_store(key, fid << 32 | doff, vl)
        if self._sync:
            self.fsync()
        else:
            if not self._pending:
                self._pending = True
                self._on_dirty(self)
            if len(dbuf) > AUTO_WRITE_OUT:
                self.write_out()
        return key

    def _seq_set(self, key: bytes, value: bytes | bytearray,
                 timestamp: int | None) -> bytes | None:
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
            self._lc_forget(key)
        self._bytes -= ln
        self._written()

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

    def _check_writable(self) -> None:
        if self.frozen:
            raise ZdbError("Namespace is temporarily frozen (read-write disabled)")
        if self.locked:
            raise ZdbError("Namespace is temporarily locked (read-only)")

    def _flag_deleted(self, fid: int, ioff: int, late: bool) -> None:
        ix = self._index
        at = ioff + INDEX_FLAGS_AT
        if fid == ix.fileid and ix.patch(at, DELETED_BYTE):
            return
        (self._late if late else self._early).append((fid, at, DELETED_BYTE))
