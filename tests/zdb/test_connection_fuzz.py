"""Random byte streams through a real Connection (parser + dispatch + engine, no socket):
nothing raises, every connection ends in a reply or a clean close, stored data is untouched."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import hiredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerostack.zdb.engine import EngineConfig
from zerostack.zdb.server import Connection, ServerConfig, ZdbServer


class RecordingTransport:
    """Stands in for the socket transport: keeps what the server writes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.data += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: object) -> None:
        # (a large argument's bytes would be read by another protocol; no socket here)
        pass

    def get_extra_info(self, name: str) -> None:
        return None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once


token = st.one_of(
    st.sampled_from([b"*", b"$", b":", b"+", b"-", b"\r\n", b"\n", b"*1\r\n", b"*3\r\n",
                     b"$3\r\n", b"$-1\r\n", b"*-1\r\n", b"*0\r\n", b"$99999999999\r\n",
                     b"*99999\r\n", b"SET", b"DEL", b"GET", b"FLUSH", b"NSDEL", b"default",
                     b"PING", b"k1", b"\x00"]),
    st.integers(-3, 10**10).map(lambda n: str(n).encode()),
    st.binary(max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(token, max_size=20).map(b"".join), min_size=1, max_size=5))
def test_random_streams_never_change_stored_data(chunks: list[bytes]) -> None:
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(engine=EngineConfig(data_dir=Path(tmp) / "d",
                                                  index_dir=Path(tmp) / "i"),
                              admin_password="secret", protect=True)
        server = ZdbServer(config)
        try:
            ns = server.engine.namespace("default")
            stored = {b"k%d" % i: b"value-%d" % i for i in range(20)}
            for key, value in stored.items():
                ns.set(key, value)
            server.engine.flush_all()

            async def feed() -> RecordingTransport:
                transport = RecordingTransport()
                conn = Connection(server)
                conn.connection_made(transport)  # type: ignore[arg-type]
                for chunk in chunks:
                    conn.data_received(chunk)
                    await asyncio.sleep(0)
                conn.connection_lost(None)
                return transport

            transport = loop.run_until_complete(feed())
            # What the client got is a sequence of well-formed RESP replies.
            reader = hiredis.Reader()
            reader.feed(bytes(transport.data))
            while reader.gets() is not False:
                pass
            assert not reader.has_data()
            # Non-admin, read-only in a protected 'default': nothing may have changed.
            assert ns.dbsize() == len(stored)
            for key, value in stored.items():
                assert ns.get(key) == value
        finally:
            server.engine.close()
            loop.close()
