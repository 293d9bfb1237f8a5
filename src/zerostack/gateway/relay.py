"""A port of the gateway's public IPv6 address relayed to an IPv4 target on a user
network: what a `port_forward` does over IPv6, where nftables cannot translate (no NAT64)
and user networks have no IPv6. The relay runs in the node agent, in its namespace (the
node's), on a thread of its own: TCP connections are spliced byte for byte, UDP
datagrams are sent from one socket per client and the target's answers go back to that
client. The target sees the gateway's address on its network, as with IPv4.

Everything from outside is bounded: connections and UDP clients at once (the oldest UDP
client is dropped when a new one comes), bytes read at a time, the idle time of a UDP
client and of a TCP connection that waits for its target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import cast

from zerostack.gateway.errors import GatewayError

log = logging.getLogger("zerostack.gateway.relay")

MAX_TCP = 256
MAX_UDP_CLIENTS = 256
CHUNK = 65536
CONNECT_TIMEOUT = 5.0
UDP_IDLE = 60.0
STOP_WAIT = 5.0


@dataclass(frozen=True)
class RelaySpec:
    protocol: str  # "tcp" | "udp"
    listen: str  # the gateway's public IPv6 address
    port: int
    target: str  # IPv4 address on the user network
    target_port: int


class _UdpClient(asyncio.DatagramProtocol):
    """One client's socket towards the target: what comes back goes to the client."""

    def __init__(self, relay: Relay, client: tuple[str, int]) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None
        self.seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector loop's datagram transport is not a DatagramTransport subclass
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen = time.monotonic()
        if self.relay._udp is not None:
            self.relay._udp.sendto(data, self.client)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._from_client(data, addr)


class Relay:
    """One relayed port; `start` binds it (GatewayError when it cannot), `stop` ends it
    and every connection it carries."""

    def __init__(self, spec: RelaySpec) -> None:
        if spec.protocol not in ("tcp", "udp"):
            raise GatewayError(f"cannot relay protocol {spec.protocol!r}")
        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._clients: dict[tuple[str, int], _UdpClient] = {}
        self._pending: set[tuple[str, int]] = set()
        self._tcp = 0

    # ---- life -------------------------------------------------------------------------

    def start(self) -> None:
        s = self.spec
        kind = socket.SOCK_STREAM if s.protocol == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET6, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((s.listen, s.port))
            if s.protocol == "tcp":
                sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise GatewayError(f"cannot listen on [{s.listen}]:{s.port}/{s.protocol}: "
                               f"{exc.strerror or exc}") from None
        self._sock = sock
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name=f"relay-{s.protocol}-{s.port}")
        self._thread.start()
        if not ready.wait(STOP_WAIT):
            self.stop()
            raise GatewayError(f"the relay of port {s.port}/{s.protocol} did not start")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_WAIT)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        assert self._sock is not None
        server: asyncio.Server | None = None
        try:
            if self.spec.protocol == "tcp":
                server = loop.run_until_complete(
                    asyncio.start_server(self._connection, sock=self._sock,
                                         limit=CHUNK))
            else:
                transport, _ = loop.run_until_complete(
                    loop.create_datagram_endpoint(lambda: _UdpListener(self), sock=self._sock))
                self._udp = transport
                loop.create_task(self._sweep())
            ready.set()
            loop.run_forever()
        except Exception:
            log.exception("event=relay_failed port=%s", self.spec.port)
        finally:
            if server is not None:
                server.close()
            for client in self._clients.values():
                if client.transport is not None:
                    client.transport.close()
            if self._udp is not None:
                self._udp.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # ---- TCP --------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._tcp >= MAX_TCP:
            writer.close()
            return
        self._tcp += 1
        try:
            try:
                t_reader, t_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.spec.target, self.spec.target_port,
                                            limit=CHUNK), CONNECT_TIMEOUT)
            except (TimeoutError, OSError):
                return
            try:
                await asyncio.gather(self._pump(reader, t_writer),
                                     self._pump(t_reader, writer))
            finally:
                t_writer.close()
        finally:
            self._tcp -= 1
            writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            writer.close()

    # ---- UDP --------------------------------------------------------------------------

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        client_addr = (str(addr[0]), int(addr[1]))
        client = self._clients.get(client_addr)
        if client is not None and client.transport is not None:
            client.seen = time.monotonic()
            client.transport.sendto(data)
            return
        if client_addr in self._pending:
            return  # its socket is being made: this datagram is dropped, as UDP may
        if len(self._clients) + len(self._pending) >= MAX_UDP_CLIENTS:
            oldest = min(self._clients.values(), key=lambda c: c.seen, default=None)
            if oldest is None:
                return
            self._drop(oldest)
        self._pending.add(client_addr)
        self._loop.create_task(self._open(client_addr, data))

    async def _open(self, client_addr: tuple[str, int], first: bytes) -> None:
        try:
            transport, proto = await self._loop.create_datagram_endpoint(
                lambda: _UdpClient(self, client_addr),
                remote_addr=(self.spec.target, self.spec.target_port))
        except OSError:
            return
        finally:
            self._pending.discard(client_addr)
        assert isinstance(proto, _UdpClient)
        self._clients[client_addr] = proto
        transport.sendto(first)

    def _drop(self, client: _UdpClient) -> None:
        self._clients.pop(client.client, None)
        if client.transport is not None:
            client.transport.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(UDP_IDLE / 4)
            now = time.monotonic()
            for client in [c for c in self._clients.values() if now - c.seen > UDP_IDLE]:
                self._drop(client)
