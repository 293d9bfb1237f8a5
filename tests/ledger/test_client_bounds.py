"""The ledger clients read a bounded answer: a server that streams without end is cut off
with a clear error, whatever it claims, and memory stays bounded."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from zerostack.ledger import client as ledger_client
from zerostack.ledger.client import AsyncLedgerClient, LedgerClient
from zerostack.ledger.errors import LedgerError


@contextmanager
def endless_server(chunked: bool) -> Iterator[str]:
    """An HTTP server that answers every request with 200 and zeros until the client
    hangs up (chunked, or with a false Content-Length)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)  # so the loop sees `stop`
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(65536)
                head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        + (b"transfer-encoding: chunked\r\n\r\n" if chunked
                           else b"content-length: 1000000000\r\n\r\n"))
                try:
                    conn.sendall(head)
                    block = b"0" * 65536
                    frame = b"%x\r\n" % len(block) + block + b"\r\n" if chunked else block
                    while not stop.is_set():
                        conn.sendall(frame)
                except OSError:
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("chunked", [True, False])
def test_an_endless_answer_is_cut_off(monkeypatch: pytest.MonkeyPatch, chunked: bool) -> None:
    monkeypatch.setattr(ledger_client, "MAX_ANSWER", 4 << 20)
    with endless_server(chunked) as url:
        with LedgerClient(url, timeout=10) as client, \
                pytest.raises(LedgerError, match="answered more than 4194304 bytes"):
            client.head()

        async def main() -> None:
            async with AsyncLedgerClient(url, timeout=10) as aclient:
                with pytest.raises(LedgerError, match="answered more than"):
                    await aclient.contract(1)

        asyncio.run(main())
