"""Walking a namespace in write order: SCAN/RSCAN, HISTORY, the version chains compaction
copies, and raw data entries for replication (the reference's index_scan.c).
"""

from __future__ import annotations

from zerostack.zdb.engine.config import Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import (
    FLAG_DELETED,
    MAX_KEY,
    SEQ_ENTRY_SIZE,
    U32,
    crc32,
    index_name,
)
from zerostack.zdb.engine.nsfiles import (
    DENT,
    DHEAD,
    IENT,
    IHEAD,
    idx_unpack,
)
from zerostack.zdb.engine.reads import decode_cursor, encode_cursor
from zerostack.zdb.engine.writes import NamespaceWrites


class NamespaceHistory(NamespaceWrites):
    """Scans, history and raw entry reads."""

    def _entry_at(self, fid: int, off: int) -> tuple[tuple[int, ...], bytes]:
        raw = self._read_index(fid, off, IENT + MAX_KEY)
        if len(raw) < IENT or len(raw) < IENT + raw[0]:
            raise ZdbError("Invalid cursor")
        fields = idx_unpack(raw, 0)
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
        _kl, doff, ln, _p, _fl, did, ts, crc, pid, poff = fields
        _dfid, value = self._versioned_payload(fid, did, doff, key, ln, crc)
        older = encode_cursor(pid, poff) if (pid or poff) else None
        return older, ts, value

    def _versioned_payload(self, ifid: int, did: int, doff: int, key: bytes, ln: int,
                           crc: int) -> tuple[int, bytes]:
        """(data file id, payload) of the version whose index entry sits in file `ifid`."""
        # The reference writes data_id 0 for first inserts: the payload then sits in the
        # data file of the index file's number. A sequential deleted copy may also point at
        # an older file with data_id 0, so check the key, length and CRC and fall back to
        # d0: the newer value of the same slot can sit at the same offset of the index
        # file's own data file, with the same key and length (only its CRC differs).
        candidates = [did or ifid] + ([0] if did == 0 and ifid != 0 else [])
        loose: tuple[int, bytes] | None = None  # key and length match, CRC does not
        for dfid in candidates:
            if dfid > self._data.fileid:
                continue
            found = self._read_data_entry(dfid, doff)
            if found is not None and found[1] == key and found[0][1] == ln:
                if found[0][3] == crc:
                    return dfid, found[2]
                loose = loose or (dfid, found[2])
        if loose is not None:
            return loose
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
            dfid, _value = self._versioned_payload(fid, fields[5], fields[1], key, fields[2],
                                                   fields[7])
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
