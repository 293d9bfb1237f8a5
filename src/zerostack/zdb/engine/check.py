"""Offline verification and repair of Zero-DB files (`zerostack zdb check [--repair]`).

Verifies every data entry's CRC, every index entry against the data it points at, and the
flags the engine sets in place. With repair=True it cuts torn tails, finishes interrupted
deletes/overwrites/swaps and, when an index file is lost or damaged, rebuilds the whole
index of the namespace from its data files (they are self-describing).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from zerostack.zdb.engine import swap
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import (
    DATA_ENTRY,
    DATA_HEADER,
    FLAG_DELETED,
    INDEX_ENTRY,
    INDEX_FLAGS_AT,
    INDEX_HEADER,
    MODE_SEQ,
    MODE_USER,
    NS_FILENAME,
    SEQ_ENTRY_SIZE,
    SEQ_KEY,
    NamespaceDescriptor,
    crc32,
    data_name,
    index_header,
    index_name,
    parse_data_header,
    parse_index_header,
)
from zerostack.zdb.engine.namespace import MAX_UNINDEXED_TAIL

DHEAD = DATA_HEADER.size
IHEAD = INDEX_HEADER.size
IENT = INDEX_ENTRY.size
DENT = DATA_ENTRY.size


@dataclass(frozen=True)
class Finding:
    """One problem, in plain words, and whether repair fixed it."""

    namespace: str
    file: str
    offset: int
    problem: str
    repaired: bool = False
    harmless: bool = False  # worth knowing, but reads and writes are not affected

    def __str__(self) -> str:
        state = "harmless" if self.harmless else "repaired" if self.repaired else "NOT repaired"
        return f"{self.namespace}/{self.file} @ {self.offset}: {self.problem} [{state}]"


@dataclass
class CheckReport:
    """What check_files() looked at and found."""

    namespaces: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    data_entries: int = 0
    index_entries: int = 0
    index_rebuilt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is left broken (every finding was repaired or is harmless)."""
        return all(f.repaired or f.harmless for f in self.findings)


@dataclass(slots=True)
class _Data:
    key: bytes
    length: int
    crc: int
    flags: int
    timestamp: int
    crc_ok: bool


def _count(root: Path, prefix: str) -> int:
    n = 0
    while (root / f"{prefix}{n}").exists():
        n += 1
    return n


class _NamespaceCheck:
    def __init__(self, report: CheckReport, name: str, index_root: Path, data_root: Path,
                 repair: bool) -> None:
        self.report = report
        self.name = name
        self.index_root = index_root
        self.data_root = data_root
        self.repair = repair
        self.data: dict[tuple[int, int], _Data] = {}
        self.data_files = 0
        self.mode = MODE_USER
        self.mode_known = False
        self.referenced: set[tuple[int, int]] = set()

    def note(self, file: str, offset: int, problem: str, repaired: bool = False,
             harmless: bool = False) -> None:
        self.report.findings.append(Finding(self.name, file, offset, problem, repaired,
                                            harmless))

    def run(self) -> None:
        iwork, _dwork = swap.work_dirs(self.index_root, self.data_root)
        if iwork.exists() or (self.index_root / swap.RETIRED).exists():
            if self.repair:
                swap.recover(self.index_root, self.data_root)
            self.note("compact/", 0, "an interrupted compaction or repair left files behind",
                      self.repair)
        self.check_descriptor()
        self.check_data()
        first = len(self.report.findings)
        if not self.check_index():
            if self.repair:
                # the rebuilt index replaces everything found wrong with the old one
                found = self.report.findings
                found[first:] = [Finding(f.namespace, f.file, f.offset, f.problem, True)
                                 for f in found[first:]]
                self.rebuild_index()
            else:
                self.note(index_name(0), 0, "the index must be rebuilt from the data files "
                          "(run with --repair)")

    def check_descriptor(self) -> None:
        path = self.index_root / NS_FILENAME
        try:
            NamespaceDescriptor.decode(path.read_bytes(), str(path))
        except (OSError, ZdbError) as exc:
            if self.repair:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(NS_FILENAME + ".tmp")
                tmp.write_bytes(NamespaceDescriptor(self.name).encode())
                os.replace(tmp, path)
            self.note(NS_FILENAME, 0, f"settings unreadable ({exc}); "
                      + ("recreated with defaults: set password/maxsize/public/worm again"
                         if self.repair else "repair recreates them with defaults"), self.repair)

    def check_data(self) -> None:
        self.data_files = _count(self.data_root, "d")
        prev = 0
        for fid in range(self.data_files):
            path = self.data_root / data_name(fid)
            # mapped, not read: data files can be 256 MiB each
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw: mmap.mmap | bytes = (mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                                          if size else b"")
            try:
                prev = self._scan_data_file(fid, path, raw, prev)
            finally:
                if isinstance(raw, mmap.mmap):
                    raw.close()
        self.report.data_entries += len(self.data)

    def _scan_data_file(self, fid: int, path: Path, raw: mmap.mmap | bytes, prev: int) -> int:
        """Record every entry of one data file; returns the offset of its last entry."""
        try:
            parse_data_header(raw[:DHEAD], str(path))
        except ZdbError as exc:
            self.note(path.name, 0, str(exc))
            return prev
        off = DHEAD
        while off + DENT <= len(raw):
            kl, ln, p, crc, fl, ts = DATA_ENTRY.unpack_from(raw, off)
            end = off + DENT + kl + ln
            if kl == 0 or end > len(raw):
                break
            payload = raw[off + DENT + kl:end]
            ok = (crc == 0 and ln == 0) if fl & FLAG_DELETED else crc32(payload) == crc
            if not ok:
                self.note(path.name, off, f"payload of key {raw[off + DENT:off + DENT + kl]!r}"
                          " does not match its CRC (the value is damaged)")
            if p != prev:
                self.note(path.name, off, f"previous-entry link is {p}, expected {prev}",
                          harmless=True)
            self.data[(fid, off)] = _Data(raw[off + DENT:off + DENT + kl], ln, crc, fl, ts, ok)
            prev = off
            off = end
        if off != len(raw):
            last = fid == self.data_files - 1
            what = f"{len(raw) - off} bytes at the end cannot be read as an entry"
            if last and self.repair:
                with open(path, "r+b") as f:  # the map never reads past `off` again
                    f.truncate(off)
            self.note(path.name, off, what + (" (torn tail: cut)" if last and self.repair
                                              else " (torn tail)" if last else ""),
                      last and self.repair)
        return prev

    def _resolve(self, ifid: int, did: int, doff: int, key: bytes) -> _Data | None:
        for dfid in [did or ifid] + ([0] if did == 0 and ifid else []):
            found = self.data.get((dfid, doff))
            if found is not None and found.key == key:
                return found
        return None

    def check_index(self) -> bool:
        """Check the index against the data; False if it must be rebuilt."""
        files = _count(self.index_root, "i")
        if files == 0:
            if self.data_files:
                self.note(index_name(0), 0, "index files are missing")
                return False
            return True
        if files != self.data_files:
            last = self.data_files - 1
            if files == last and not any(fid == last for fid, _off in self.data):
                # a crash while rotating: d<N> is created before i<N>
                if self.repair:
                    (self.index_root / index_name(last)).write_bytes(
                        index_header(last, self._i0_mode()))
                self.note(index_name(last), 0, "index file was never created (a crash while "
                          "starting a new file pair)", self.repair)
            else:
                self.note(index_name(files), 0,
                          f"{files} index files for {self.data_files} data files")
                return False
        live: dict[bytes, tuple[int, int]] = {}
        healthy = True
        modes = set()
        for fid in range(files):
            path = self.index_root / index_name(fid)
            raw = path.read_bytes()
            try:
                _hfid, mode = parse_index_header(raw, str(path))
            except ZdbError as exc:
                self.note(path.name, 0, str(exc))
                return False
            modes.add(mode)
            self.mode = mode
            self.mode_known = True
            off = IHEAD
            while off + IENT <= len(raw):
                kl, doff, ln, _p, fl, did, ts, crc, _pi, _po = INDEX_ENTRY.unpack_from(raw, off)
                end = off + IENT + kl
                if kl == 0 or end > len(raw) or (mode == MODE_SEQ and kl != SEQ_KEY.size):
                    break
                key = raw[off + IENT:end]
                self.report.index_entries += 1
                found = self._resolve(fid, did, doff, key)
                self.referenced.add((did or fid, doff))
                if found is None or (found.length, found.crc, found.timestamp) != (ln, crc, ts):
                    self.note(path.name, off, f"entry of key {key!r} points at data that is "
                              "missing or does not match")
                    healthy = False
                elif not fl & FLAG_DELETED:
                    if mode == MODE_USER and key in live:
                        ofid, ooff = live[key]
                        self._flag(ofid, ooff, "an overwritten entry is not flagged deleted")
                    live[key] = (fid, off)
                elif mode == MODE_USER and live.get(key) is not None:
                    del live[key]
                off = end
            if off != len(raw):
                last = fid == files - 1
                if last and self.repair:
                    with open(path, "r+b") as f:
                        f.truncate(off)
                self.note(path.name, off, f"{len(raw) - off} bytes at the end cannot be read as "
                          "an entry" + (" (torn tail)" if last else ""), last and self.repair)
                if not last:
                    healthy = False
        if len(modes) > 1:
            self.note(index_name(0), 0, "index files disagree on the namespace mode")
            return False
        if healthy and self.mode == MODE_USER:
            self.check_tombstones(live)
        if healthy:
            return self.check_unindexed_tail()
        return healthy

    def _i0_mode(self) -> int:
        try:
            return parse_index_header((self.index_root / index_name(0)).read_bytes()[:IHEAD],
                                      "i0")[1]
        except (OSError, ZdbError):
            return MODE_USER

    def check_unindexed_tail(self) -> bool:
        """Data written after the newest indexed entry of the last data file was never
        acknowledged (a crash between data and index): the engine cuts it on open. More
        than a crash can leave means the index is damaged: False (rebuild instead)."""
        last = self.data_files - 1
        mine = [off for (fid, off) in self.referenced if fid == last]
        start = max(mine) if mine else 0
        for (fid, off), d in sorted(self.data.items()):
            if fid != last or off <= start or d.flags & FLAG_DELETED:
                continue
            path = self.data_root / data_name(fid)
            size = path.stat().st_size
            if size - off > MAX_UNINDEXED_TAIL:
                self.note(path.name, off, f"{size - off} bytes of data are not in the index")
                return False
            if self.repair:
                with open(path, "r+b") as f:
                    f.truncate(off)
                for pos in [p for p in self.data if p[0] == fid and p[1] >= off]:
                    del self.data[pos]
            self.note(path.name, off, f"{size - off} bytes of data were never indexed "
                      "(an interrupted write; cut when the namespace opens)", self.repair)
            return True
        return True

    def _flag(self, fid: int, off: int, problem: str) -> None:
        if self.repair:
            with open(self.index_root / index_name(fid), "r+b") as f:
                f.seek(off + INDEX_FLAGS_AT)
                f.write(bytes([FLAG_DELETED]))
        self.note(index_name(fid), off, problem, self.repair)

    def check_tombstones(self, live: dict[bytes, tuple[int, int]]) -> None:
        # a tombstone newer than the live entry of its key: the delete's flag never landed
        for (dfid, doff), entry in self.data.items():
            if entry.flags & FLAG_DELETED and entry.key in live:
                ifid, ioff = live[entry.key]
                raw = (self.index_root / index_name(ifid)).read_bytes()
                kdoff = INDEX_ENTRY.unpack_from(raw, ioff)[1]
                if (dfid, doff) > (ifid, kdoff):
                    self._flag(ifid, ioff, f"key {entry.key!r} was deleted but its index entry "
                               "is not flagged")
                    del live[entry.key]

    def guess_mode(self) -> int:
        """Without any readable index header: sequential if the data keys are slots 0, 1…"""
        keys = [d.key for d in self.data.values() if not d.flags & FLAG_DELETED]
        if keys and keys[0] == bytes(8) and all(len(k) == SEQ_KEY.size for k in keys):
            return MODE_SEQ
        return MODE_USER

    def _indexed_sets(self) -> set[tuple[int, int]]:
        """Data positions that old index entries (read leniently, damaged headers and all)
        point at with matching key, length, CRC and timestamp: entries a SET wrote."""
        found: set[tuple[int, int]] = set()
        for fid in range(_count(self.index_root, "i")):
            try:
                raw = (self.index_root / index_name(fid)).read_bytes()
            except OSError:
                continue
            off = IHEAD
            while off + IENT <= len(raw):
                kl, doff, ln, _p, _fl, did, ts, crc, _pi, _po = INDEX_ENTRY.unpack_from(raw, off)
                end = off + IENT + kl
                if kl == 0 or end > len(raw):
                    break
                key = raw[off + IENT:end]
                for dfid in [did or fid] + ([0] if did == 0 and fid else []):
                    d = self.data.get((dfid, doff))
                    if d is not None and (d.key, d.length, d.crc, d.timestamp) == (key, ln, crc, ts):
                        found.add((dfid, doff))
                off = end
        return found

    def rebuild_index(self) -> None:
        """Write a new index from the data files and swap it in."""
        iwork, _dwork = swap.start_build(self.index_root, self.data_root)
        mode = self.mode if self.mode_known else self.guess_mode()
        bufs = [bytearray(index_header(fid, mode)) for fid in range(max(1, self.data_files))]
        live: dict[bytes, tuple[int, int]] = {}
        prev = 0
        slots: list[tuple[int, int]] = []  # sequential: slot -> (fid, offset)

        def append(fid: int, entry: bytes) -> int:
            nonlocal prev
            off = len(bufs[fid])
            bufs[fid] += entry
            prev = off
            return off

        indexed = self._indexed_sets()
        for (fid, doff), d in sorted(self.data.items()):
            if not d.crc_ok:
                continue
            deleted = d.flags & FLAG_DELETED
            if not deleted and d.length == 0 and (fid, doff) not in indexed:
                # A tombstone whose deleted flag is damaged reads as SET key "" (no payload,
                # CRC 0 matches): only an old index entry proves a SET wrote it. Without
                # one, serving "" could be a value that was never written: delete instead.
                deleted = FLAG_DELETED
                self.note(data_name(fid), doff, f"empty value of key {d.key!r} is in no index "
                          "entry: it may be a delete whose flag is damaged, so the key is "
                          "treated as deleted (SET it again if it held an empty value)")
            if deleted:
                loc = live.pop(d.key, None)
                if loc is not None:
                    bufs[loc[0]][loc[1] + INDEX_FLAGS_AT] = FLAG_DELETED
                continue
            old = live.get(d.key)
            if mode == MODE_SEQ:
                slot = SEQ_KEY.unpack(d.key)[0] if len(d.key) == SEQ_KEY.size else -1
                if slot == len(slots):
                    slots.append((fid, append(fid, INDEX_ENTRY.pack(
                        8, doff, d.length, prev, 0, fid, d.timestamp, d.crc, 0, 0) + d.key)))
                    live[d.key] = slots[-1]
                elif 0 <= slot < len(slots) and old is not None:
                    # like the engine: a deleted copy of the old version takes the next slot,
                    # and the slot is rewritten with the copy as its parent
                    sfid, soff = old
                    f = INDEX_ENTRY.unpack_from(bufs[sfid], soff)
                    coff = append(fid, INDEX_ENTRY.pack(
                        f[0], f[1], f[2], prev, f[4] | FLAG_DELETED, *f[5:]) + d.key)
                    slots.append((fid, coff))
                    bufs[sfid][soff:soff + SEQ_ENTRY_SIZE] = INDEX_ENTRY.pack(
                        8, doff, d.length, f[3], 0, fid, d.timestamp, d.crc, fid, coff) + d.key
                else:
                    self.note(data_name(fid), doff, f"entry with key {d.key!r} is not a valid "
                              "sequential slot; left out of the rebuilt index")
                continue
            pid, poff = old if old is not None else (0, 0)
            if old is not None:
                bufs[pid][poff + INDEX_FLAGS_AT] = FLAG_DELETED
            live[d.key] = (fid, append(fid, INDEX_ENTRY.pack(
                len(d.key), doff, d.length, prev, 0, fid, d.timestamp, d.crc, pid, poff) + d.key))
        for fid, buf in enumerate(bufs):
            (iwork / index_name(fid)).write_bytes(bytes(buf))
        old_files = [index_name(i) for i in range(_count(self.index_root, "i"))]
        swap.install(self.index_root, self.data_root, old_files, [])
        self.report.index_rebuilt.append(self.name)
        self.note(index_name(0), 0, f"index rebuilt from {len(self.data)} data entries", True)


def check_files(index_dir: Path, data_dir: Path, namespace: str | None = None,
                repair: bool = False) -> CheckReport:
    """Check (and with repair=True, fix) the namespaces of a stopped server.

    Returns a report; `report.ok` is False when something is still broken.
    """
    index_dir, data_dir = Path(index_dir), Path(data_dir)
    names = sorted(p.name for p in index_dir.iterdir() if p.is_dir()) if index_dir.exists() else []
    if data_dir.exists():
        names = sorted(set(names) | {p.name for p in data_dir.iterdir() if p.is_dir()})
    if namespace is not None:
        if namespace not in names:
            raise ZdbError(f"namespace {namespace} not found in {index_dir} or {data_dir}")
        names = [namespace]
    report = CheckReport(namespaces=names)
    for name in names:
        _NamespaceCheck(report, name, index_dir / name, data_dir / name, repair).run()
    return report
