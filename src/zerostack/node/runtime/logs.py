"""Container logs: stdout/stderr lines kept in size-rotated files readable by root only.

Each line is `<UTC time> <stream> <text>`. Standard library only: the shim imports it.
Reading never follows a link and never reads more than a bounded number of bytes.
Who may read the files is `logaccess`.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from zerostack.node.hostfs import PRIVATE_FILE, open_beneath, private_dir
from zerostack.node.runtime.spec import ContainerError

LOG_NAME = "container.log"
MAX_LINE = 16 * 1024
READ_MAX = 1 << 20  # the most a log read returns: the newest bytes, whole lines
_ROTATED = re.compile(re.escape(LOG_NAME) + r"\.([1-9][0-9]{0,3})")


class RotatingLog:
    """Appends lines to `dir/container.log`, rotating to `.1`, `.2`… past `max_bytes`."""

    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        private_dir(directory)
        self.path = directory / LOG_NAME
        self.max_bytes = max(max_bytes, 4096)
        self.keep = max(keep, 1)
        self.lock = threading.Lock()
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size

    def _open(self) -> int:
        # Never through a link: whatever sits at the name, the shim writes only a file of
        # its own.
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                       | os.O_NOFOLLOW, PRIVATE_FILE)

    def write(self, stream: str, line: bytes) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        ms = int(time.time() * 1000) % 1000
        text = line.rstrip(b"\n").replace(b"\n", b" ")
        record = f"{stamp}.{ms:03d}Z {stream} ".encode() + text + b"\n"
        with self.lock:
            if self.size + len(record) > self.max_bytes and self.size > 0:
                self._rotate()
            os.write(self.fd, record)
            self.size += len(record)

    def _rotate(self) -> None:
        os.close(self.fd)
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{LOG_NAME}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{LOG_NAME}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{LOG_NAME}.1"))
        self.fd = self._open()
        self.size = 0

    def pump(self, stream: str, pipe: IO[bytes]) -> None:
        """Copy `pipe` line by line until EOF (run in a thread per stream)."""
        while True:
            line = pipe.readline(MAX_LINE)
            if not line:
                return
            self.write(stream, line)

    def close(self) -> None:
        with self.lock:
            os.close(self.fd)


def read_logs(directory: Path, tail: int = 200, max_bytes: int = READ_MAX,
              beneath: Sequence[str] = ()) -> list[str]:
    """The last `tail` lines (0: as many as fit) across the rotated files, oldest first,
    from at most the newest `max_bytes` bytes; a line cut by that bound is dropped.

    The files are in `directory/beneath[0]/…`: `directory` is the node's own and trusted,
    no step below it may be a link, and only regular files are read. Raises
    ContainerError if one is a link or not a regular file, FileNotFoundError if a directory
    on the way is missing.
    """
    try:
        dfd = open_beneath(directory, beneath)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise ContainerError(f"log directory refused: {exc}") from None
    except OSError as exc:  # ELOOP or ENOTDIR: a link or a file on the way
        raise ContainerError(f"log directory refused: {exc.strerror}") from None
    try:
        rotated = sorted(int(m.group(1)) for n in os.listdir(dfd)
                          if (m := _ROTATED.fullmatch(n)) is not None)
        names = [LOG_NAME, *(f"{LOG_NAME}.{i}" for i in rotated)]  # newest first
        chunks: list[bytes] = []
        budget = max(max_bytes, 0)
        newlines = 0
        complete = True  # whether the oldest chunk read starts at a line boundary
        for name in names:
            if budget == 0 or (tail > 0 and newlines > tail):
                break
            data, whole = _read_end(dfd, name, budget)
            if data is None:
                continue
            chunks.append(data)
            budget -= len(data)
            newlines += data.count(b"\n")
            complete = whole
    finally:
        os.close(dfd)
    text = b"".join(reversed(chunks))
    if not complete:
        text = text.partition(b"\n")[2]  # the first line is cut: drop it
    lines = [raw.decode("utf-8", "replace") for raw in text.split(b"\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines[-tail:] if tail > 0 else lines


def _read_end(dfd: int, name: str, limit: int) -> tuple[bytes | None, bool]:
    """(the last `limit` bytes of the file `name` in `dfd`, whether that is all of it);
    (None, True) when there is no such file. Never follows a link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except FileNotFoundError:
        return None, True
    except OSError as exc:
        raise ContainerError(f"log file {name} refused (a link or unreadable): "
                             f"{exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ContainerError(f"log file {name} is not a regular file")
        start = max(st.st_size - limit, 0)
        data = os.pread(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    return data, start == 0

