"""An independent reader of 0-db v2 files for tests: decodes with plain struct calls and
asserts every layout rule, so engine bugs cannot hide behind the engine's own decoder."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

IDX_HEAD = struct.Struct("<4sIQQIB")
IDX_ENT = struct.Struct("<BIIIBIIIII")
DAT_HEAD = struct.Struct("<4sIQQI")
DAT_ENT = struct.Struct("<BIIIBI")
NS_DESC = struct.Struct("<IBBQB")


def crc(data: bytes) -> int:
    return crc32c.crc32c(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclass
class Layout:
    """What a namespace's files hold, decoded independently of the engine."""

    name: str
    password: str | None
    maxsize: int
    flags: int
    mode: int
    live: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)  # key -> (value, ts)
    history: dict[bytes, list[bytes]] = field(default_factory=dict)     # newest first
    index_entries: int = 0
    data_entries: int = 0


def _files(root: Path, prefix: str) -> list[Path]:
    out = []
    while (root / f"{prefix}{len(out)}").exists():
        out.append(root / f"{prefix}{len(out)}")
    return out


def read_layout(index_root: Path, data_root: Path) -> Layout:
    desc = (index_root / "zdb-namespace").read_bytes()
    version, nlen, plen, maxsize, flags = NS_DESC.unpack_from(desc)
    assert version == 1 and flags & 4, "descriptor version 1 with the extended flag"
    assert len(desc) == NS_DESC.size + nlen + plen, "descriptor has no trailing bytes"
    name = desc[15:15 + nlen].decode()
    pwd = desc[15 + nlen:].decode() or None

    # data files: every entry whole, CRC right, `previous` chained across files
    dfiles = _files(data_root, "d")
    data: dict[tuple[int, int], tuple[bytes, bytes, int, int, int]] = {}
    prev = 0
    for fid, path in enumerate(dfiles):
        raw = path.read_bytes()
        assert DAT_HEAD.unpack_from(raw) == (b"DAT0", 3, 0, 0, fid), path
        off = DAT_HEAD.size
        while off < len(raw):
            kl, ln, p, c, fl, ts = DAT_ENT.unpack_from(raw, off)
            assert kl > 0 and p == prev, (path, off, p, prev)
            key = raw[off + 18:off + 18 + kl]
            payload = raw[off + 18 + kl:off + 18 + kl + ln]
            assert len(payload) == ln, (path, off)
            if fl & 1:
                assert ln == 0 and c == 0 and fl == 1, "tombstone: no payload, crc 0"
            else:
                assert fl == 0 and c == crc(payload), (path, off)
            data[(fid, off)] = (key, payload, c, fl, ts)
            prev = off
            off += 18 + kl + ln
        assert off == len(raw), f"{path} ends inside an entry"

    # index files: entries end exactly at EOF, point at matching data, `previous` chained
    ifiles = _files(index_root, "i")
    assert len(ifiles) == len(dfiles), "index and data files go in pairs"
    modes = set()
    entries: dict[tuple[int, int], tuple[bytes, int, int, int, int, int, int, int]] = {}
    order: list[tuple[int, int]] = []
    prev = 0
    for fid, path in enumerate(ifiles):
        raw = path.read_bytes()
        magic, version, created, opened, hfid, mode = IDX_HEAD.unpack_from(raw)
        assert (magic, version, created, opened, hfid) == (b"IDX0", 4, 0, 0, fid), path
        modes.add(mode)
        off = IDX_HEAD.size
        while off < len(raw):
            kl, doff, ln, p, fl, did, ts, c, pid, poff = IDX_ENT.unpack_from(raw, off)
            key = raw[off + 34:off + 34 + kl]
            assert len(key) == kl > 0
            assert fl in (0, 1)
            if mode == 1:
                assert kl == 8
            else:
                assert p == prev, (path, off, p, prev)
                assert did == fid, "user-mode payloads live in the data file of the same number"
            dkey, payload, dc, dfl, dts = data[(did, doff)]
            assert (dkey, len(payload), dc, dfl, dts) == (key, ln, c, 0, ts), (path, off)
            entries[(fid, off)] = (key, doff, ln, fl, did, ts, pid, poff)
            order.append((fid, off))
            prev = off
            off += 34 + kl
        assert off == len(raw), f"{path} ends inside an entry"
    assert len(modes) == 1
    layout = Layout(name, pwd, maxsize, flags, modes.pop(), index_entries=len(entries),
                    data_entries=len(data))

    for pos in order:
        key, doff, ln, fl, did, ts, pid, poff = entries[pos]
        if fl & 1:
            continue
        if layout.mode == 0:
            assert key not in layout.live, "one live index entry per key"
        else:
            slot = int.from_bytes(key, "little")
            assert pos == _slot_position(ifiles, slot), "a sequential key is its slot"
        layout.live[key] = (data[(did, doff)][1], ts)
        versions = [data[(did, doff)][1]]
        while pid or poff:
            okey, odoff, _oln, ofl, odid, _ots, pid, poff = entries[(pid, poff)]
            assert okey == key and ofl & 1, "history links point at older, deleted versions"
            versions.append(data[(odid, odoff)][1])
        layout.history[key] = versions
    return layout


def _slot_position(ifiles: list[Path], slot: int) -> tuple[int, int]:
    for fid, path in enumerate(ifiles):
        n = (path.stat().st_size - IDX_HEAD.size) // 42
        if slot < n:
            return fid, IDX_HEAD.size + slot * 42
        slot -= n
    raise AssertionError("slot beyond the index")
