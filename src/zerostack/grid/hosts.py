"""The kernel side of grid hosts: make what a Topology lists (namespaces, bridges, veths,
addresses, routes, NAT), run a process or a block of code inside a host's network
namespace, and remove exactly what a grid recorded (never anything picked by a pattern).

Only the network namespace is entered: processes stay in the root mount namespace, so
their files and mounts are the host's and the grid's teardown sees them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from zerostack.grid.errors import GridError
from zerostack.grid.topology import Step, Topology

log = logging.getLogger("zerostack.grid.hosts")

NETNS_DIR = Path("/run/netns")
RECORD = "grid.json"
CLONE_NEWNET = 0x40000000
KILL_WAIT = 5.0
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def ns_path(name: str) -> Path:
    return NETNS_DIR / name


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _enter_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def enter(name: str) -> None:
    """Move the calling thread into network namespace `name` (for good)."""
    _enter_path(str(ns_path(name)))


def preexec(name: str) -> Callable[[], None]:
    """A subprocess `preexec_fn` that starts the child inside `name`'s network namespace.
    The path is built here: between fork and exec the child does only open and setns."""
    path = str(ns_path(name))
    return lambda: _enter_path(path)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block in network namespace `name`: sockets created in it belong to that
    namespace (and keep working there after the block). Only this thread moves. Clients
    that connect lazily (redis-py, httpx) must do all their I/O inside the block: one
    that connects after it would do so from the root namespace."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(back)


def listen_socket(ns: str, address: str, port: int) -> socket.socket:
    """A TCP socket listening on `address`:`port` inside namespace `ns`."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with inside(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


MAX_PAGE = 1 << 20


def https_get(ns: str, host: str, address: str, cafile: Path, path: str = "/",
              timeout: float = 5.0) -> tuple[int, bytes]:
    """GET https://`host``path` from namespace `ns`, connecting to `address` (what a
    resolver would give for `host`) and checking the certificate against `cafile` (a
    gateway's internal CA). Returns (status, body: at most MAX_PAGE bytes); OSError when
    nothing sensible answers."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with inside(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    data = b""
    try:
        sock.connect((address, 443))
        conn = ssl.create_default_context(cafile=str(cafile)).wrap_socket(
            sock, server_hostname=host)
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                     "User-Agent: zerostack\r\n\r\n".encode())
        while len(data) < MAX_PAGE:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[1].isdigit():
        raise OSError(f"no HTTP answer from {address}")
    return int(status[1]), body[:MAX_PAGE]


def run_in(ns: str | None, args: list[str], stdin: str | None = None,
           timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command (in namespace `ns`, or the root one) and return its result."""
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False, preexec_fn=preexec(ns) if ns else None)


def _apply(step: Step) -> None:
    if step.kind == "netns":
        out = run_in(None, ["ip", "netns", *step.args])
    elif step.kind == "ip":
        out = run_in(None, ["ip", *(("-n", step.ns) if step.ns else ()), *step.args])
    elif step.kind == "nft":
        out = run_in(step.ns, ["nft", "-f", "-"], stdin=step.args[0])
    elif step.kind == "sysctl":
        key, value = step.args
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            if step.ns:
                with inside(step.ns):
                    path.write_text(value)
            else:
                path.write_text(value)
        except OSError as exc:
            raise GridError(f"sysctl {key}={value} in {step.ns or 'the root namespace'}: "
                            f"{exc.strerror}") from exc
        return
    else:
        raise GridError(f"unknown step {step.kind!r}")
    if out.returncode != 0:
        where = f" (in {step.ns})" if step.ns else ""
        raise GridError(f"{step.kind} {' '.join(step.args)[:200]}{where} failed: "
                        f"{out.stderr.strip()[:300]}")


def apply(steps: list[Step]) -> None:
    """Make the changes, in order; the first that fails raises GridError (what was made
    stays recorded, so the grid's teardown removes it)."""
    for step in steps:
        _apply(step)


# ---- the record --------------------------------------------------------------------


def save(folder: Path, topology: Topology) -> None:
    """Record the topology (written before anything of it is made, so a crash at any
    point leaves a record of everything that may exist)."""
    data = {"id": topology.grid, "sites": topology.sites,
            "hosts": [{"name": h.name, "site": h.site.index, "hidden": h.hidden}
                      for h in topology.hosts]}
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(folder / RECORD)


def load(folder: Path) -> Topology | None:
    """The recorded topology, rebuilt (so every name it yields is checked again), or None."""
    path = folder / RECORD
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        topology = Topology(str(data["id"]), int(data["sites"]))
        for h in data["hosts"]:
            topology.add_host(str(h["name"]), int(h["site"]), bool(h["hidden"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GridError(f"{path} is not a grid record: {exc}") from exc
    return topology


# ---- removal -----------------------------------------------------------------------


def _ns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is `name`."""
    target = _ns_id(ns_path(name))
    if target is None:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _ns_id(Path(entry.path) / "ns" / "net") == target:
            found.append(int(entry.name))
    return found


def namespace_exists(name: str) -> bool:
    return ns_path(name).exists()


def link_exists(name: str) -> bool:
    """Whether the root namespace has a link `name` (the caller is in the root namespace)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _kill_all(name: str) -> str:
    pids = pids_in(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + KILL_WAIT
        while (pids := pids_in(name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            return ""
    return f"processes {pids} in namespace {name} do not exit"


def remove(topology: Topology) -> list[str]:
    """Remove every namespace and root link the topology names (whatever of it exists):
    processes still inside its namespaces are stopped first, since a namespace with a
    process in it outlives its name. Returns what stays (empty: all gone)."""
    problems: list[str] = []
    for name in reversed(topology.namespaces()):  # hosts first, the router last
        if not namespace_exists(name):
            continue
        if problem := _kill_all(name):
            problems.append(problem)
            continue
        out = run_in(None, ["ip", "netns", "delete", name])
        if out.returncode != 0:
            problems.append(f"namespace {name} stays: {out.stderr.strip()[:200]}")
        else:
            log.info("event=netns_deleted name=%s", name)
    for link in topology.links():
        if link_exists(link):
            out = run_in(None, ["ip", "link", "delete", link])
            if out.returncode != 0 and link_exists(link):
                problems.append(f"link {link} stays: {out.stderr.strip()[:200]}")
            else:
                log.info("event=link_deleted name=%s", link)
    return problems


def release_record(folder: Path) -> list[str]:
    """Remove what the grid recorded in `folder` made; drop the record once all is gone."""
    try:
        topology = load(folder)
    except GridError as exc:
        return [str(exc)]
    if topology is None:
        return []
    problems = remove(topology)
    if not problems:
        (folder / RECORD).unlink(missing_ok=True)
    return problems
