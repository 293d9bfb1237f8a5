"""A throwaway hub for flist and container tests: zerostack's Zero-DB server on a free port."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd


def start_hub(procs: ProcessGroup, workdir: Path, *extra: str) -> str:
    """Start `zerostack zdb` with its files in `workdir` and `extra` options (e.g.
    `--admin pw`); return its address (host:port)."""
    port = free_port()
    proc = procs.start(
        [*zerostack_cmd(), "zdb", "--listen", "127.0.0.1", "--port", str(port),
         "--data", str(workdir / "hub-data"), "--index", str(workdir / "hub-index"), *extra],
    )
    wait_for_port(port, proc=proc, timeout=20)
    return f"127.0.0.1:{port}"
