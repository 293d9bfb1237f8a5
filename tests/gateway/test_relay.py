"""The IPv6 relay of port forwards, on loopback: TCP spliced both ways (half-close
included), UDP datagrams both ways from one socket per client, a port already in use
refused, and nothing left listening once stopped."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from zerostack.gateway import GatewayError
from zerostack.gateway.relay import Relay, RelaySpec


@pytest.fixture
def tcp_upper() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers what it read, upper-cased, at EOF."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def udp_echo() -> Iterator[tuple[int, list[tuple[str, int]]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    seen: list[tuple[str, int]] = []

    def serve() -> None:
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except OSError:
                return
            seen.append(addr)
            sock.sendto(b"echo:" + data, addr)

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1], seen
    sock.close()


def test_tcp_is_spliced_both_ways(tcp_upper: int) -> None:
    port = free_port()
    relay = Relay(RelaySpec("tcp", "::1", port, "127.0.0.1", tcp_upper))
    relay.start()
    try:
        with pytest.raises(GatewayError, match="cannot listen"):
            Relay(RelaySpec("tcp", "::1", port, "127.0.0.1", tcp_upper)).start()
        payload = b"x" * 300_000
        with socket.create_connection(("::1", port), timeout=5) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := c.recv(65536):
                got += chunk
        assert got == payload.upper()
    finally:
        relay.stop()
    assert not relay.alive()
    with pytest.raises(OSError):
        socket.create_connection(("::1", port), timeout=2)


def test_udp_carries_datagrams_both_ways(udp_echo: tuple[int, list[tuple[str, int]]]) -> None:
    target, seen = udp_echo
    port = free_port()
    relay = Relay(RelaySpec("udp", "::1", port, "127.0.0.1", target))
    relay.start()
    clients = [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for i, c in enumerate(clients):
            c.settimeout(1)
            answer = None
            for _ in range(3):
                c.sendto(f"hello {i}".encode(), ("::1", port))
                try:
                    answer, _ = c.recvfrom(2048)
                    break
                except TimeoutError:
                    continue
            assert answer == f"echo:hello {i}".encode()
            c.sendto(b"again", ("::1", port))
            assert c.recvfrom(2048)[0] == b"echo:again"
        # one socket towards the target per client
        assert len({addr for addr in seen}) == 2
    finally:
        for c in clients:
            c.close()
        relay.stop()
    assert not relay.alive()
