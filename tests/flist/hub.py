"""A throwaway hub for flist and container tests: a Zero-DB server on a free port."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd


def start_hub(procs: ProcessGroup, workdir: Path) -> str:
    """Start `zerostack zdb` in `workdir` and return its address (host:port)."""
    port = free_port()
    proc = procs.start(
        [*zerostack_cmd(), "zdb", "--listen", "127.0.0.1", "--port", str(port),
         "--data", str(workdir / "hub-data"), "--index", str(workdir / "hub-index")],
    )
    try:
        wait_for_port(port, proc=proc, timeout=20)
    except RuntimeError:
        # Zero-DB server not usable in this tree yet: a redis-server speaks the same RESP.
        redis = shutil.which("redis-server")
        assert redis is not None, "neither zerostack zdb nor redis-server can run a hub"
        port = free_port()
        proc = procs.start([redis, "--save", "", "--port", str(port), "--bind", "127.0.0.1"])
        wait_for_port(port, proc=proc)
    return f"127.0.0.1:{port}"
