"""Offline compaction: rewrite a namespace keeping live values (and their history, all of it
or the last N older versions), then swap the files in atomically (see swap.py).

Sequential namespaces are refused: their keys are positions in the index, so dropping
entries would change every later key.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zerostack.zdb.engine import swap
from zerostack.zdb.engine.config import EngineConfig, Mode
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import DATA_ENTRY, NS_FILENAME, crc32, data_name, index_name
from zerostack.zdb.engine.namespace import Namespace


@dataclass(frozen=True)
class CompactReport:
    """What a compaction did; sizes count every index and data file of the namespace."""

    namespace: str
    keys: int
    versions: int
    bytes_before: int
    bytes_after: int
    seconds: float

    @property
    def reclaimed_bytes(self) -> int:
        return self.bytes_before - self.bytes_after


def _files(root: Path, name: Callable[[int], str]) -> list[str]:
    out: list[str] = []
    while (root / name(len(out))).exists():
        out.append(name(len(out)))
    return out


def _size(index_root: Path, data_root: Path) -> int:
    return sum((index_root / n).stat().st_size for n in _files(index_root, index_name)) + \
        sum((data_root / n).stat().st_size for n in _files(data_root, data_name))


def _noop(_ns: Namespace) -> None:
    return None


def compact_namespace(index_dir: Path, data_dir: Path, name: str,
                      keep_history: int | None = None,
                      datasize: int = 256 * 1024 * 1024,
                      step: Callable[[str], None] | None = None) -> CompactReport:
    """Rewrite namespace `name` of a stopped server and report the space reclaimed.

    keep_history=None keeps every older version of live keys (only deleted keys and
    tombstones go); keep_history=N keeps the live value and at most N older versions.
    `step` is called at each stage (tests use it to simulate crashes).
    """
    if keep_history is not None and keep_history < 0:
        raise ZdbError("keep_history must be >= 0")
    started = time.monotonic()
    index_root, data_root = Path(index_dir) / name, Path(data_dir) / name
    if not (index_root / NS_FILENAME).exists() and not (index_root / index_name(0)).exists():
        raise ZdbError(f"namespace {name} not found in {index_dir}")
    config = EngineConfig(data_dir=Path(data_dir), index_dir=Path(index_dir), datasize=datasize)
    src = Namespace(name, index_root, data_root, config, _noop)
    try:
        if src.mode is Mode.SEQ:
            raise ZdbError(f"namespace {name} is sequential: its keys are index positions and "
                           "cannot be compacted")
        before = _size(index_root, data_root)
        iwork, dwork = swap.start_build(index_root, data_root)
        # Replay versions in their original write order so history links point backwards.
        versions = sorted(src.live_versions(keep_history))
        keys = src.dbsize()
        dst = Namespace(name, iwork, dwork, config, _noop, create_mode=Mode.USER)
        try:
            maps: dict[int, mmap.mmap] = {}
            try:
                for dfid, doff, ts, key, ln, crc in versions:
                    mm = maps.get(dfid)
                    if mm is None:
                        with open(data_root / data_name(dfid), "rb") as f:
                            mm = maps[dfid] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                    start = doff + DATA_ENTRY.size + len(key)
                    payload = mm[start:start + ln]
                    if len(payload) != ln or crc32(payload) != crc:
                        raise ZdbError(f"namespace {name}: the value of {key!r} in "
                                       f"{data_name(dfid)} at {doff} is damaged; run "
                                       "`zerostack zdb check` before compacting")
                    dst.set(key, payload, ts)
            finally:
                for mm in maps.values():
                    mm.close()
            dst.password, dst.maxsize, dst.public, dst.worm = (src.password, src.maxsize,
                                                               src.public, src.worm)
            dst._save_descriptor()
            dst.fsync()
        finally:
            dst.close()
        if step:
            step("written")
    finally:
        src.close()
    swap.install(index_root, data_root, _files(index_root, index_name),
                 _files(data_root, data_name), step)
    after = _size(index_root, data_root)
    return CompactReport(name, keys, len(versions), before, after, time.monotonic() - started)
