"""File-level operations on one namespace's index and data files: create, append, read, scan.

Kept free of key/namespace logic so replication (append raw entries) and compaction
(rewrite file pairs) can reuse them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.format import (
    DATA_ENTRY,
    DATA_HEADER,
    FLAG_DELETED,
    crc32,
    data_header,
    index_header,
)

# Opening many old files for reads costs descriptors; keep at most this many around.
MAX_READERS: Final = 64
# A mapped file is mapped again once this many bytes were written past the mapping, or once
# this many reads fell past it (no more writes may come to widen the gap); reads of the
# newest bytes use pread until then.
REMAP_AFTER: Final = 256 * 1024
REMAP_MISSES: Final = 64
# A data file's blocks are reserved ahead of its appends, as far ahead as the file is
# large already and at most this far (never past its datasize): ext4 then finds each
# written block allocated instead of reserving it (delayed allocation) inside every write,
# about a third of the kernel's work per byte of a 1 MiB append.
PREALLOCATE: Final = 64 * 1024 * 1024
FALLOC_FL_KEEP_SIZE: Final = 1  # the file's size stays where the appends end


def _load_fallocate() -> Any:
    """libc's fallocate(2), or None where the C library has none (the files then grow
    block by block, as without it)."""
    try:
        fn: Any = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE: Final[Any] = _load_fallocate()


class AppendFile:
    """An index or data file open for appending, with an in-memory tail.

    Appends land in `buf` and reach the OS on `write_out()`; `read()` sees both the file
    and the buffered tail, so readers never notice the buffering. With mapped=True, reads
    of bytes already on disk come from a read-only shared map (no system call per read);
    the map is dropped before the file is cut or closed, so it never covers a hole.
    """

    __slots__ = ("_mappable", "buf", "disk_size", "fd", "fileid", "map", "mapped", "misses",
                 "path", "reserve", "reserved")

    def __init__(self, path: Path, fileid: int, mapped: bool = False, reserve: int = 0) -> None:
        self.path = path
        self.fileid = fileid
        self.fd = os.open(path, os.O_RDWR)
        self.disk_size = os.fstat(self.fd).st_size
        self.buf = bytearray()
        # Blocks are preallocated up to `reserved`, in steps, while it stays under `reserve`
        # (0: never); the file's size is untouched, close() gives back what was not used.
        self.reserve = reserve if _FALLOCATE is not None else 0
        self.reserved = self.disk_size
        self._mappable = mapped
        # Bytes [0, mapped) of the file can be read as map[a:b]; mapped lazily, on a read.
        self.map: mmap.mmap | None = None
        self.mapped = 0
        self.misses = 0  # reads past the map since it was made

    @property
    def size(self) -> int:
        return self.disk_size + len(self.buf)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) (fewer at the end of the file)."""
        disk = self.disk_size
        if offset >= disk:
            start = offset - disk
            return bytes(self.buf[start:start + length])
        end = offset + length
        if end <= disk:
            if end <= self.mapped:
                return self.map[offset:end]  # type: ignore[index]
            if self._mappable and (disk - self.mapped >= REMAP_AFTER
                                   or self.misses >= REMAP_MISSES):
                self.remap()
                return self.map[offset:end]  # type: ignore[index]
            self.misses += 1
            return os.pread(self.fd, length, offset)
        head = os.pread(self.fd, disk - offset, offset)
        return head + bytes(self.buf[:offset + length - disk])

    def remap(self) -> None:
        """Map everything on disk now (reads up to disk_size need no system call)."""
        self.unmap()
        self.misses = 0
        if self.disk_size:
            self.map = mmap.mmap(self.fd, self.disk_size, prot=mmap.PROT_READ)
            self.mapped = self.disk_size

    def unmap(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        self.mapped = 0

    def patch(self, offset: int, data: bytes) -> bool:
        """Overwrite bytes still in the buffer; False when they are already on disk."""
        if offset < self.disk_size:
            return False
        start = offset - self.disk_size
        self.buf[start:start + len(data)] = data
        return True

    def preallocate(self, end: int) -> None:
        """Reserve the file's blocks up to `end` and a step ahead (the file's size, at most
        PREALLOCATE, within `reserve`) when a write goes past what is reserved. A small
        file thus reserves little: what is reserved and unused stays under the size of the
        file and 64 MiB, until close() gives it back."""
        if end <= self.reserved or self.reserved >= self.reserve:
            return
        start = max(self.reserved, self.disk_size)
        length = max(end - start, min(PREALLOCATE, self.disk_size, self.reserve - start))
        if _FALLOCATE(self.fd, FALLOC_FL_KEEP_SIZE, start, length) != 0:
            self.reserve = 0  # not supported here (or no space): grow as the writes go
            return
        self.reserved = start + length

    def release(self) -> None:
        """Give back the blocks reserved past the end of the file (if that fails, they
        stay reserved: the file's content and size are not affected)."""
        if not self.buf:
            try:
                os.ftruncate(self.fd, self.disk_size)
            except OSError:
                return
            self.reserved = self.disk_size

    def write_out(self) -> None:
        """Hand the buffered tail to the OS (not fsync)."""
        buf = self.buf
        if not buf:
            return
        if self.reserve:
            self.preallocate(self.disk_size + len(buf))
        view = memoryview(buf)
        done = 0
        try:
            while done < len(buf):
                done += os.pwrite(self.fd, view[done:], self.disk_size + done)
        finally:
            view.release()
            self.disk_size += done
            del buf[:done]

    def write_out_with(self, tail: bytes | bytearray) -> None:
        """write_out() with `tail` appended after the buffered bytes, in one system call:
        a large value reaches the OS without being copied into the buffer first.

        If the OS takes only part of it and then fails, what it did not take stays
        buffered, as with write_out(), so the file never holds a torn entry in its middle.
        """
        buf = self.buf
        head = len(buf)
        total = head + len(tail)
        if self.reserve:
            self.preallocate(self.disk_size + total)
        done = 0
        view = memoryview(buf)
        rest = memoryview(tail)
        try:
            while done < total:
                # (the slices live only for the call: the buffer is resized below)
                done += os.pwritev(self.fd, [view[done:], rest] if done < head
                                   else [rest[done - head:]], self.disk_size + done)
        finally:
            view.release()
            self.disk_size += done
            if done < head:
                del buf[:done]
                buf += tail
            else:
                buf.clear()
                if done < total:
                    buf += rest[done - head:]
            rest.release()

    def fsync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        """Cut the file (and drop any buffered tail) at `size`."""
        self.unmap()  # touching a mapped page past the end of the file is SIGBUS
        self.buf.clear()
        os.ftruncate(self.fd, size)
        self.disk_size = size
        self.reserved = size

    def close(self) -> None:
        if self.fd >= 0:
            self.write_out()
            self.unmap()
            if self.reserve:
                self.release()  # (also what a crash left reserved past the end)
            os.close(self.fd)
            self.fd = -1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, content: bytes, durable: bool = True) -> None:
    """Create `path` holding `content`, replacing it atomically if it exists."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def create_pair(index_path: Path, data_path: Path, fileid: int, mode: int,
                durable: bool = True) -> None:
    """Create data file then index file N with their headers (data first: an index file
    never exists without its data file)."""
    write_new_file(data_path, data_header(fileid), durable)
    write_new_file(index_path, index_header(fileid, mode), durable)


class Readers:
    """A small cache of read/write descriptors for files other than the current pair."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                raise ZdbError(f"{path} is missing") from None
            if len(self._fds) >= MAX_READERS:
                old = next(iter(self._fds))
                os.close(self._fds.pop(old))
            self._fds[path] = fd
        return fd

    def forget(self, path: Path) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def iter_data_entries(buf: bytes | memoryview, start: int = DATA_HEADER.size
                      ) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """Walk the data entries of a whole data file from `start`.

    Yields (offset, key_len, payload_len, previous, crc, flags, timestamp) for every entry
    that fits in `buf` and whose payload matches its CRC; stops at the first torn or bad one
    (the caller compares the last yielded end with len(buf) to find a torn tail).
    """
    end = len(buf)
    off = start
    head = DATA_ENTRY.size
    while off + head <= end:
        kl, ln, prev, crc, fl, ts = DATA_ENTRY.unpack_from(buf, off)
        stop = off + head + kl + ln
        if kl == 0 or stop > end:
            return
        if fl & FLAG_DELETED and ln == 0:
            if crc != 0:
                return
        elif crc32(buf[off + head + kl:stop]) != crc:
            return
        yield off, kl, ln, prev, crc, fl, ts
        off = stop
