"""Health probes run from the node inside a container's network namespace (TCP or HTTP).

A container has its own netns, so the probe socket is created by a short-lived thread
that first joins that netns (setns only moves the calling thread); the socket stays bound
to the namespace it was created in, whichever thread then uses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading

from zerostack.node.runtime.spec import HealthProbe

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def socket_in_netns(pid: int) -> socket.socket:
    """A TCP socket living in the network namespace of process `pid`."""
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the container's netns failed")
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=make, name="netns-probe")
    t.start()
    t.join()
    out = result[0]
    if isinstance(out, BaseException):
        raise out
    return out


def probe(pid: int, check: HealthProbe) -> tuple[bool, str]:
    """(healthy, detail): connect to 127.0.0.1:port in the container; GET path for HTTP."""
    try:
        sock = socket_in_netns(pid)
    except OSError as exc:
        return False, f"cannot enter the container's network: {exc}"
    with sock:
        sock.settimeout(check.timeout)
        try:
            sock.connect(("127.0.0.1", check.port))
            if not check.http_path:
                return True, f"tcp {check.port} open"
            path = check.http_path if check.http_path.startswith("/") else "/" + check.http_path
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n"
                         "User-Agent: zerostack-health\r\n\r\n".encode())
            head = sock.recv(256).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as exc:
            return False, f"port {check.port}: {exc.strerror or exc}"
    parts = head.split()
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1][:1] in ("2", "3"):
        return True, f"http {path}: {parts[1]}"
    return False, f"http {path}: {head[:80] or 'no answer'}"
