"""Raw access to a namespace's data log for replication: read whole entries from a position,
compare entry heads, adopt a primary's file layout and cut a namespace back to a position.

Positions are (data file id, offset): where the next entry goes in the primary's data files.
Replaying entries in order (Namespace.replay_raw) reproduces the primary's files byte for byte.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from pathlib import Path

from zerostack.zdb.engine import swap
from zerostack.zdb.engine.config import Mode
from zerostack.zdb.engine.engine import Engine
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.files import iter_data_entries
from zerostack.zdb.engine.format import (
    DATA_ENTRY,
    DATA_HEADER,
    FLAG_DELETED,
    crc32,
    data_name,
    index_name,
)
from zerostack.zdb.engine.namespace import Namespace

log = logging.getLogger("zerostack.zdb.engine")

DHEAD = DATA_HEADER.size
DENT = DATA_ENTRY.size
START = (0, DHEAD)
_LENGTHS = struct.Struct("<BI").unpack_from

Position = tuple[int, int]


def data_size(ns: Namespace, fid: int) -> int:
    """Size of data file `fid` (buffered tail included); 0 when it does not exist."""
    return ns._data_size(fid)


def read_entries(ns: Namespace, pos: Position, limit: int) -> bytes:
    """Whole data entries of file pos[0] from offset pos[1], at most `limit` bytes (but at
    least one entry when one is there). Empty when the file has nothing after pos."""
    fid, off = pos
    end = ns._data_size(fid)
    if off >= end:
        return b""
    buf = ns._read_data(fid, off, min(end - off, limit))
    cut = 0
    size = len(buf)
    while cut + DENT <= size:
        kl, ln = _LENGTHS(buf, cut)
        nxt = cut + DENT + kl + ln
        if nxt > size:
            break
        cut = nxt
    if cut == 0:
        # One entry larger than the limit: ship it alone.
        kl, ln = _LENGTHS(ns._read_data(fid, off, DENT), 0)
        return ns._read_data(fid, off, DENT + kl + ln)
    return buf[:cut] if cut < size else buf


def entry_head(ns: Namespace, fid: int, off: int) -> bytes | None:
    """Header and key of the data entry at (fid, off), None when there is none."""
    if not 0 <= fid <= ns.position()[0] or off < DHEAD or off + DENT > ns._data_size(fid):
        return None
    head = ns._read_data(fid, off, DENT)
    kl, ln = _LENGTHS(head, 0)
    if off + DENT + kl + ln > ns._data_size(fid):
        return None
    return head + ns._read_data(fid, off + DENT, kl)


def position_problem(ns: Namespace, pos: Position) -> str | None:
    """Why `pos` is not a place a replica can hold namespace `ns` up to (None: it is).

    A valid position is the start of a data file, its end, or the start of a data entry:
    one whose previous-entry link points at an entry of the same file that ends exactly
    there and whose payload matches its CRC (a position inside an entry fails that)."""
    fid, off = pos
    last = ns.position()[0]
    if fid < 0 or off < 0:
        return "negative file id or offset"
    if fid > last:
        return f"data file {fid} does not exist (the newest is {last})"
    size = ns._data_size(fid)
    if off < DHEAD:
        return f"offset {off} is inside the file header ({DHEAD} bytes)"
    if off > size:
        return f"offset {off} is past the end of data file {fid} ({size} bytes)"
    if off in (DHEAD, size):
        return None
    found = ns._read_data_entry(fid, off)
    if found is None:
        return f"offset {off} of data file {fid} is not the start of an entry"
    fields, _key, payload = found
    kl, ln, prev, crc, flags = fields[0], fields[1], fields[2], fields[3], fields[4]
    entry_ok = (crc == 0 and ln == 0) if flags & FLAG_DELETED else crc32(payload) == crc
    if not entry_ok or kl == 0 or not DHEAD <= prev < off:
        return f"offset {off} of data file {fid} is not the start of an entry"
    before = ns._read_data(fid, prev, DENT)
    if len(before) < DENT:
        return f"offset {off} of data file {fid} is not the start of an entry"
    pkl, pln = _LENGTHS(before, 0)
    if prev + DENT + pkl + pln != off:
        return f"offset {off} of data file {fid} is not the start of an entry"
    return None


def last_entries(ns: Namespace, count: int) -> list[tuple[Position, bytes, Position]]:
    """Up to `count` newest data entries, newest first: (position, header+key, end)."""
    out: list[tuple[Position, bytes, Position]] = []
    fid = ns.position()[0]
    while fid >= 0 and len(out) < count:
        size = ns._data_size(fid)
        raw = ns._read_data(fid, 0, size)
        found = [(o, kl) for o, kl, ln, *_r in iter_data_entries(raw)]
        for o, kl in reversed(found):
            ln = _LENGTHS(raw, o)[1]
            out.append(((fid, o), bytes(raw[o:o + DENT + kl]), (fid, o + DENT + kl + ln)))
            if len(out) >= count:
                break
        fid -= 1
    return out


def distance(ns: Namespace, a: Position, b: Position) -> int:
    """Data bytes between positions a <= b of namespace `ns` (0 when a is not behind)."""
    if a >= b:
        return 0
    if a[0] == b[0]:
        return b[1] - a[1]
    total = max(0, ns._data_size(a[0]) - a[1])
    for fid in range(a[0] + 1, b[0]):
        total += max(0, ns._data_size(fid) - DHEAD)
    return total + b[1] - DHEAD


def adopt_layout(engine: Engine, datasize: int, mode: Mode) -> None:
    """Use a primary's --datasize and --mode, so files rotate at the same entries."""
    engine.config.datasize = datasize
    engine.config.mode = mode
    for ns in engine.namespaces.values():
        ns._datasize = datasize


def settings(ns: Namespace) -> tuple[str, str, int, bool, bool, bool, bool]:
    """(mode, password, maxsize, public, worm, locked, frozen): what NSSET can change."""
    return (ns.mode.value, ns.password or "", ns.maxsize, ns.public, ns.worm, ns.locked,
            ns.frozen)


def apply_settings(ns: Namespace, mode: str, password: str, maxsize: int, public: bool,
                   worm: bool, locked: bool, frozen: bool) -> None:
    """Make `ns` carry a primary's settings (the descriptor file comes out identical)."""
    if ns.mode.value != mode:
        # Only an empty namespace changes mode; the default namespace and single-mode
        # servers refuse NSSET mode, but a replica must follow its primary's choice.
        saved = ns._config.mode
        ns._config.mode = Mode.MIXED
        try:
            ns._set_mode(mode)
        finally:
            ns._config.mode = saved
    if ns.name == "default":
        return  # nobody can change the default namespace's settings
    if (ns.password or "", ns.maxsize, ns.public, ns.worm) != (password, maxsize, public, worm):
        ns.password = password or None
        ns.maxsize = maxsize
        ns.public = public
        ns.worm = worm
        ns._save_descriptor()
    ns.locked = locked
    ns.frozen = frozen


def apply_entries(ns: Namespace, pos: Position, chunk: bytes) -> Position:
    """Append entries shipped from position `pos` of the primary; returns the new position.

    ZdbError when this namespace is not at `pos` (diverged) or the chunk is damaged."""
    while ns.position()[0] < pos[0]:
        ns.jump()
    here = ns.position()
    if here != pos:
        raise ZdbError(f"namespace {ns.name}: at {here[0]}:{here[1]} but the primary ships "
                       f"from {pos[0]}:{pos[1]}")
    done = 0
    view = memoryview(chunk)
    try:
        for off, kl, ln, _prev, _crc, flags, ts in iter_data_entries(view, 0):
            start = off + DENT
            ns.replay_raw(bytes(view[start:start + kl]), flags, ts,
                          bytes(view[start + kl:start + kl + ln]))
            done = start + kl + ln
    finally:
        view.release()
    if done != len(chunk):
        raise ZdbError(f"namespace {ns.name}: shipped entries at {pos[0]}:{pos[1] + done} are "
                       "damaged (CRC or length)")
    after = ns.position()
    if after != (pos[0], pos[1] + done):
        raise ZdbError(f"namespace {ns.name}: replay ended at {after[0]}:{after[1]}, expected "
                       f"{pos[0]}:{pos[1] + done}; check that --datasize matches the primary")
    return after


def _noop(_ns: Namespace) -> None:
    return None


def _names(root: Path, name: Callable[[int], str]) -> list[str]:
    out: list[str] = []
    while (root / name(len(out))).exists():
        out.append(name(len(out)))
    return out


def truncate_to(engine: Engine, name: str, pos: Position) -> int:
    """Cut namespace `name` back to position `pos`: its files become what they were when
    the data log ended there. Rebuilt by replaying the kept entries into new files that are
    swapped in atomically. Returns the number of entries dropped."""
    ns = engine.namespace(name)
    mode = ns.mode
    ns.close()
    engine._dirty.discard(ns)
    index_root, data_root = ns.index_root, ns.data_root
    dropped = 0
    try:
        iwork, dwork = swap.start_build(index_root, data_root)
        dst = Namespace(name, iwork, dwork, engine.config, _noop, create_mode=mode)
        try:
            fid = 0
            while (data_root / data_name(fid)).exists():
                with open(data_root / data_name(fid), "rb") as f:
                    raw = f.read()
                for off, kl, ln, _prev, _crc, flags, ts in iter_data_entries(raw):
                    if (fid, off) >= pos:
                        dropped += 1
                        continue
                    while dst.position()[0] < fid:
                        dst.jump()
                    s = off + DENT
                    dst.replay_raw(raw[s:s + kl], flags, ts, raw[s + kl:s + kl + ln])
                fid += 1
            while dst.position() < pos and dst.position()[0] < pos[0]:
                dst.jump()
            dst.password, dst.maxsize, dst.public, dst.worm = (ns.password, ns.maxsize,
                                                               ns.public, ns.worm)
            dst._save_descriptor()
            dst.fsync()
        finally:
            dst.close()
        swap.install(index_root, data_root, _names(index_root, index_name),
                     _names(data_root, data_name))
    finally:
        ns.reopen()
    log.warning("event=zdb.replica.truncate namespace=%s position=%d:%d entries_dropped=%d",
                name, pos[0], pos[1], dropped)
    return dropped


def start_copy(engine: Engine, name: str) -> Namespace:
    """An empty namespace built next to namespace `name` (in its `compact/` folders) while
    `name` itself stays as it is: a replica copies a rewritten namespace into it and swaps
    it in with install_copy() once complete. A crash before that leaves the old files (the
    unfinished build is discarded when the namespace opens)."""
    ns = engine.namespace(name)
    iwork, dwork = swap.start_build(ns.index_root, ns.data_root)
    return Namespace(name, iwork, dwork, engine.config, _noop, create_mode=ns.mode)


def drop_copy(engine: Engine, name: str, copy: Namespace) -> None:
    """Give up a copy made by start_copy(): its files go, namespace `name` stays."""
    copy.close()
    ns = engine.namespaces.get(name)
    if ns is not None:
        swap.recover(ns.index_root, ns.data_root)


def install_copy(engine: Engine, name: str, copy: Namespace) -> None:
    """Swap a complete copy (see start_copy) in for namespace `name`, atomically."""
    ns = engine.namespace(name)
    copy.password, copy.maxsize, copy.public, copy.worm = (ns.password, ns.maxsize, ns.public,
                                                           ns.worm)
    copy._save_descriptor()
    copy.fsync()
    copy.close()
    ns.close()
    engine._dirty.discard(ns)
    try:
        swap.install(ns.index_root, ns.data_root, _names(ns.index_root, index_name),
                     _names(ns.data_root, data_name))
    finally:
        ns.reopen()


def file_names(root: Path) -> list[str]:
    """Names of the files directly under `root`, sorted (used to compare replicas)."""
    return sorted(p.name for p in root.iterdir() if p.is_file()) if root.exists() else []


__all__ = ["START", "Position", "adopt_layout", "apply_entries", "apply_settings", "data_size",
           "distance", "drop_copy", "entry_head", "file_names", "install_copy", "last_entries",
           "position_problem", "read_entries", "settings", "start_copy", "truncate_to"]
