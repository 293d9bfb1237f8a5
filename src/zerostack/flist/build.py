"""Turn a tree of files (a directory, or an imported image's layers) into a manifest + chunks."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from zerostack.flist.manifest import CHUNK_SIZE, Entry, EntryType, FlistError, ImageConfig, Manifest
from zerostack.flist.store import ChunkStore


@dataclass
class SourceEntry:
    """A path about to enter a manifest; `open` yields a file's content when it is chunked."""

    path: str
    type: EntryType
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    target: str = ""
    size: int = 0
    open: Callable[[], IO[bytes]] | None = None


class _ChunkWriter:
    """Collects new chunks and writes them to the store in batches, once each."""

    def __init__(self, store: ChunkStore, batch_bytes: int = 16 * 1024 * 1024) -> None:
        self.store = store
        self.seen: set[bytes] = set()
        self.pending: list[tuple[bytes, bytes]] = []
        self.pending_bytes = 0
        self.batch_bytes = batch_bytes
        self.new_bytes = 0

    def add(self, data: bytes) -> str:
        key = hashlib.blake2b(data, digest_size=32).digest()
        if key not in self.seen:
            self.seen.add(key)
            self.pending.append((key, data))
            self.pending_bytes += len(data)
            self.new_bytes += len(data)
            if self.pending_bytes >= self.batch_bytes:
                self.flush()
        return key.hex()

    def flush(self) -> None:
        if self.pending:
            self.store.put_many(self.pending)
            self.pending, self.pending_bytes = [], 0


def assemble(sources: Iterable[SourceEntry], store: ChunkStore, config: ImageConfig | None = None,
             name: str = "", chunk_size: int = CHUNK_SIZE) -> Manifest:
    """Chunk every file into `store` and return the (unsigned) manifest, sorted by path."""
    writer = _ChunkWriter(store)
    entries: list[Entry] = []
    for src in sorted(sources, key=lambda s: s.path):
        chunks: list[str] = []
        size = 0
        if src.type == "file":
            if src.open is None:
                raise FlistError(f"{src.path}: no content")
            with src.open() as f:
                while True:
                    data = f.read(chunk_size)
                    if not data:
                        break
                    # read() may return short; top a chunk up so chunk boundaries are fixed.
                    while len(data) < chunk_size:
                        more = f.read(chunk_size - len(data))
                        if not more:
                            break
                        data += more
                    size += len(data)
                    chunks.append(writer.add(data))
        entries.append(Entry(
            path=src.path, type=src.type, mode=src.mode & 0o7777, uid=src.uid, gid=src.gid,
            size=size, mtime=max(src.mtime, 0), target=src.target, chunks=tuple(chunks),
        ))
    writer.flush()
    manifest = Manifest(name=name, chunk_size=chunk_size, config=config or ImageConfig(),
                        entries=tuple(entries))
    manifest.check()
    return manifest


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: open(path, "rb", buffering=0)


def _entry(rel: str, st: os.stat_result, kind: EntryType, target: str = "",
           opener: Callable[[], IO[bytes]] | None = None) -> SourceEntry:
    return SourceEntry(path=rel, type=kind, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                       mtime=int(st.st_mtime), target=target, open=opener)


def scan_dir(root: Path) -> tuple[list[SourceEntry], list[str]]:
    """Every path under `root` (not following symlinks). Returns (entries, skipped paths):
    device nodes, sockets and FIFOs have no place in an image and are skipped."""
    if not root.is_dir():
        raise FlistError(f"{root} is not a directory")
    found: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            found.append((rel, os.lstat(os.path.join(dirpath, name))))
    found.sort()
    out: list[SourceEntry] = []
    skipped: list[str] = []
    inodes: dict[tuple[int, int], str] = {}
    for rel, st in found:
        if stat.S_ISDIR(st.st_mode):
            out.append(_entry(rel, st, "dir"))
        elif stat.S_ISLNK(st.st_mode):
            out.append(_entry(rel, st, "symlink", target=os.readlink(root / rel)))
        elif stat.S_ISREG(st.st_mode):
            ino = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and ino in inodes:
                out.append(_entry(rel, st, "hardlink", target=inodes[ino]))
                continue
            inodes[ino] = rel
            out.append(_entry(rel, st, "file", opener=_opener(root / rel)))
        else:
            skipped.append(rel)
    return out, skipped


def build_dir(root: Path, store: ChunkStore, config: ImageConfig | None = None,
              name: str = "") -> tuple[Manifest, list[str]]:
    """Manifest of the directory `root`, chunks written to `store`; plus skipped paths."""
    sources, skipped = scan_dir(root)
    return assemble(sources, store, config, name), skipped
