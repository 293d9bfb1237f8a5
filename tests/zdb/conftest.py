"""Fixtures for Zero-DB server tests: start real `zerostack zdb` processes on free ports."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd


@dataclass
class ZdbProcess:
    """A running server: its process, port, directories and a way to restart it."""

    proc: subprocess.Popen[bytes]
    port: int
    data: Path
    index: Path
    args: list[str]
    log: Path

    def client(self, raw: bool = True) -> redis.Redis:
        """A redis-py client; `raw` drops redis-py's reply callbacks, so execute_command
        returns exactly what the server sent (SET answers the key, not OK)."""
        r = redis.Redis(port=self.port, socket_timeout=10)
        if raw:
            r.response_callbacks.clear()
        return r


ZdbStarter = Callable[..., ZdbProcess]


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zdb exited with {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {path}")


def start_zdb(group: ProcessGroup, root: Path, *extra: str, port: int | None = None,
              data: Path | None = None, index: Path | None = None) -> ZdbProcess:
    """Start `zerostack zdb` with data under `root` (or the given dirs) and wait until it listens."""
    port = port or free_port()
    data = data or root / "data"
    index = index or root / "index"
    args = [*zerostack_cmd(), "zdb", "--listen", "127.0.0.1", "--port", str(port),
            "--data", str(data), "--index", str(index), *extra]
    log = root / f"zdb-{port}.log"
    with open(log, "ab") as out:
        proc = group.start(args, stdout=out, stderr=out)
    try:
        if "--socket" in extra:
            wait_for_socket(Path(extra[extra.index("--socket") + 1]), proc)
        else:
            wait_for_port(port, proc=proc, timeout=30)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; server log:\n{log.read_text()}") from exc
    return ZdbProcess(proc=proc, port=port, data=data, index=index, args=args, log=log)


@pytest.fixture
def zdb_start(procs: ProcessGroup, tmp_path: Path) -> ZdbStarter:
    """Start a server: `zdb_start("--admin", "pw")`; each call gets fresh directories."""
    counter = iter(range(1000))

    def start(*extra: str, **kwargs: object) -> ZdbProcess:
        root = tmp_path / f"zdb{next(counter)}"
        root.mkdir()
        return start_zdb(procs, root, *extra, **kwargs)  # type: ignore[arg-type]

    return start


@pytest.fixture
def zdb(zdb_start: ZdbStarter) -> Iterator[ZdbProcess]:
    """A server with no admin password (every client is admin), mixed mode."""
    yield zdb_start()
