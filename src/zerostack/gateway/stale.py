"""Stopping a gateway daemon (Caddy, HAProxy, dnsmasq): the agent's own child, and one
that an agent killed with -9 left running, only when its pid file names a process that
really is that daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def stop_stale(pidfile: Path, marker: str) -> None:
    """Kill the process `pidfile` names if one word of its command line is `marker` (the
    node's own configuration for it), and wait up to 5 s for it to go; anything else —
    no pid file, another process that reused the pid — is left alone."""
    try:
        pid = int(pidfile.read_text()[:20].strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if marker.encode() not in cmdline:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def stop_child(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to the agent's own daemon if it still runs; kill it if it has not
    gone 5 s later."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
