"""What the benchmarks share: how to run the zerostack CLI, free ports, starting and
stopping servers in their own process groups, percentiles, their blocks in
docs/benchmarks.md."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def zerostack_cli() -> list[str]:
    """The command that runs `zerostack`: the venv's script, else the module."""
    exe = Path(sys.executable).parent / "zerostack"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zerostack.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None,
              timeout: float = 60.0) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; fail early when
    `proc`, the server meant to listen there, exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening "
                               f"on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout:g} s")


def spawn(args: list[str], log: Path | None = None,
          src: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so stop() reaches its children too), its
    output appended to `log` (or dropped); with `src`, zerostack is imported from there."""
    out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
    try:
        return subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True,
                                env=env)
    finally:
        if not isinstance(out, int):
            out.close()  # the child holds its own copy


def start(args: list[str], port: int, log: Path | None = None,
          src: Path | None = None) -> subprocess.Popen[bytes]:
    """spawn() a server and wait until it listens on `port`."""
    proc = spawn(args, log, src)
    try:
        wait_port(port, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL it if it has not exited after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


@contextmanager
def ledger_server(log: Path | None = None, src: Path | None = None) -> Iterator[str]:
    """A `zerostack ledger serve` on a fresh file and a free port; yields its URL. With
    `src`, the server runs the zerostack sources found there (another version)."""
    tmp = Path(tempfile.mkdtemp(prefix="zs-bench-ledger-"))
    port = free_port()
    proc = start([*zerostack_cli(), "ledger", "serve", "--db", str(tmp / "ledger.db"),
                  "--listen", f"127.0.0.1:{port}"], port, log, src=src)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank `p`th percentile of `values`."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def approve_until_ok(client: Any, holder: Any, cid: int, deployment_hash: str,
                     timeout: float = 30.0) -> float:
    """As the stakeholder's 3Bot `holder` does it (open the sealed deployment, check it,
    sign), submit the approval that completes contract `cid`'s quorum, and follow the
    ledger's events until the node reports every workload `ok`; returns the seconds."""
    since: int | str = int(client.head()["height"])
    t0 = time.perf_counter()
    holder.approve(cid, deployment_hash)
    while True:
        ev = client.events(since, timeout=timeout, contract=cid, type="contract.report")
        since = ev["next"]
        if not ev["events"]:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"contract {cid}: no report after {timeout:g} s")
            continue
        c = client.contract(cid)
        states = [w["state"] for w in ((c or {}).get("report") or {}).get("workloads", [])]
        if states and all(s == "ok" for s in states):
            return time.perf_counter() - t0
        if "error" in states:
            raise RuntimeError(f"contract {cid} reported {(c or {}).get('report')}")


def wait_node(client: Any, farm: int, timeout: float = 30.0) -> int:
    """The id of the first node registered in `farm`, once one is."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = client.nodes(farm=farm)
        if nodes:
            return int(nodes[0]["id"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no node registered in farm {farm} after {timeout:g} s")
        time.sleep(0.05)


def write_block(doc_path: Path, start: str, end: str, text: str, section: str,
                after: str | None = None) -> None:
    """Put `text` between the markers `start` and `end` of `doc_path`, replacing what was
    there; a file without them gets the block after `after` (default: the `section`
    heading), or `section` and the block at its end."""
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}{end}"
    anchor = after or section
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + block + rest.split(end, 1)[1]
    elif anchor in doc:
        doc = doc.replace(anchor, f"{anchor}\n\n{block}", 1)
    else:
        doc = doc.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    doc_path.write_text(doc)
