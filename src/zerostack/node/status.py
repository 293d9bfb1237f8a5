"""A read-only local status endpoint: GET / returns the node's identity, contracts and
workloads as JSON; GET /logs?request=TOKEN answers an owner-signed log request, sealed to
that owner. It accepts nothing else: no shell, exec or write API exists."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

log = logging.getLogger("zerostack.node.status")

_STATUS = {200: b"200 OK", 400: b"400 Bad Request", 403: b"403 Forbidden",
           404: b"404 Not Found"}


class StatusServer:
    """Serves `snapshot()` to GET /, `logs(token)` to GET /logs; other methods get 405."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], port: int,
                 host: str = "127.0.0.1",
                 logs: Callable[[str], tuple[int, dict[str, Any]]] | None = None) -> None:
        self.snapshot = snapshot
        self.logs = logs
        self.port = port
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method = parts[0]
            target = urlsplit(parts[1].decode("latin-1") if len(parts) > 1 else "/")
            if method != b"GET":
                status, body = b"405 Method Not Allowed", b'{"error":"read-only endpoint"}'
            elif target.path == "/logs" and self.logs is not None:
                token = parse_qs(target.query).get("request", [""])[0]
                # Sealing and reading log files touches the disk: keep it off the loop.
                code, answer = await asyncio.to_thread(self.logs, token)
                status, body = _STATUS.get(code, b"400 Bad Request"), orjson.dumps(answer)
            elif target.path in ("/", ""):
                status, body = b"200 OK", orjson.dumps(self.snapshot(),
                                                       option=orjson.OPT_INDENT_2)
            else:
                status, body = b"404 Not Found", b'{"error":"no such endpoint"}'
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
