"""An HTTP(S) client for tests that acts from a grid host's namespace and resolves the
gateway's names itself (no DNS): a name is dialled at the address given, with TLS
checked against the gateway's internal CA."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from zerostack.grid import inside


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(namespace: str, url: str, address: str, cafile: Path | None = None,
          timeout: float = 5.0) -> Answer:
    """GET `url` from `namespace`, connecting to `address` (what a resolver would give
    for the url's host). Raises OSError (ssl.SSLError included) when it cannot."""
    scheme, rest = url.split("://", 1)
    authority, _, path = rest.partition("/")
    host, _, given = authority.partition(":")
    port = int(given) if given else 443 if scheme == "https" else 80
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with inside(namespace):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
        conn: socket.socket = sock
        if scheme == "https":
            ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            conn = ctx.wrap_socket(sock, server_hostname=host)
        conn.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                     "User-Agent: zerostack-test\r\n\r\n".encode())
        data = b""
        while len(data) < 1 << 20:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    if not lines or len(lines[0].split()) < 2:
        raise OSError(f"no HTTP answer from {address}: {data[:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Answer(int(lines[0].split()[1]), headers, body)
