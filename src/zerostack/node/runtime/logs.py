"""Container logs: stdout/stderr lines kept in size-rotated files readable by root only.

Each line is `<UTC time> <stream> <text>`. Standard library only: the shim imports it.
Who may read the files, and how, is `logaccess`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

LOG_NAME = "container.log"
MAX_LINE = 16 * 1024


class RotatingLog:
    """Appends lines to `dir/container.log`, rotating to `.1`, `.2`… past `max_bytes`."""

    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / LOG_NAME
        self.max_bytes = max(max_bytes, 4096)
        self.keep = max(keep, 1)
        self.lock = threading.Lock()
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

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


def read_logs(directory: Path, tail: int = 200) -> list[str]:
    """The last `tail` lines across the rotated files, oldest first (0: all of them)."""
    files = sorted(directory.glob(f"{LOG_NAME}.*"), key=lambda p: -int(p.suffix[1:] or 0))
    files.append(directory / LOG_NAME)
    lines: deque[str] = deque(maxlen=tail if tail > 0 else None)
    for path in files:
        try:
            with open(path, "rb") as f:
                for raw in f:
                    lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
        except FileNotFoundError:
            continue
    return list(lines)
