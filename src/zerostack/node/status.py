"""A read-only local status endpoint: GET / returns the node's identity, contracts and
workloads as JSON. It accepts nothing else: no shell, exec or write API exists."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("zerostack.node.status")


class StatusServer:
    """Serves `snapshot()` on 127.0.0.1 to any GET; every other method gets 405."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], port: int,
                 host: str = "127.0.0.1") -> None:
        self.snapshot = snapshot
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
            method = head.split(b" ", 1)[0]
            if method == b"GET":
                status, body = b"200 OK", orjson.dumps(self.snapshot(),
                                                       option=orjson.OPT_INDENT_2)
            else:
                status, body = b"405 Method Not Allowed", b'{"error":"read-only endpoint"}'
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
