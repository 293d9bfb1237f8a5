"""Calls one Zero-DB node makes to another of its replica set: ask for a vote in a new
term (REPLVOTE) and announce the primary of a term (REPLLEADER). Short-lived connections,
authenticated with the REPLAUTH handshake (both ends prove the password), every reply
bounded."""

from __future__ import annotations

import asyncio

import hiredis

from zerostack.zdb.engine.raw import Position
from zerostack.zdb.protocol import encode_request
from zerostack.zdb.replication.handshake import ClientHandshake, Unproven, address_text, escape

CALL_TIMEOUT = 2.0
MAX_REPLY = 64 * 1024


class PeerError(Exception):
    """A peer refused a call or answered something unexpected."""


async def _call(host: str, port: int, password: str | None,
                *args: bytes | str | int) -> object:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CALL_TIMEOUT)
    try:
        parser = hiredis.Reader()
        received = 0

        async def reply() -> object:
            nonlocal received
            while (got := parser.gets()) is False:
                data = await asyncio.wait_for(reader.read(MAX_REPLY), CALL_TIMEOUT)
                if not data:
                    raise EOFError(f"{host}:{port} closed the connection")
                received += len(data)
                if received > MAX_REPLY:
                    raise PeerError(f"{host}:{port} answered more than {MAX_REPLY} bytes")
                parser.feed(data)
            if isinstance(got, hiredis.ReplyError):
                raise PeerError(escape(str(got)))
            return got

        if password:  # the peer proves it knows the password before this node does
            sock = writer.get_extra_info("socket")
            if sock is None:
                raise PeerError(f"{host}:{port}: no socket address to authenticate")
            handshake = ClientHandshake(password, address_text(sock.getpeername()))
            writer.write(encode_request(*handshake.challenge()))
            try:
                proof = handshake.answer(await reply())
            except (Unproven, PeerError) as exc:
                raise PeerError(f"{host}:{port} is not a proven peer: {exc}") from exc
            writer.write(encode_request(*proof) + encode_request(*args))
            await reply()
        else:
            writer.write(encode_request(*args))
        return await reply()
    finally:
        writer.close()


async def request_vote(host: str, port: int, password: str | None, term: int, candidate: str,
                       log_term: int, positions: dict[str, tuple[int, Position]]
                       ) -> tuple[bool, int, str]:
    """(granted, the peer's term, its reason). `positions`: per namespace, the generation
    of the candidate's files and how much of them it holds (see role.positions)."""
    args: list[bytes | str | int] = [b"REPLVOTE", term, candidate, log_term]
    for name, (generation, (fid, off)) in positions.items():
        args += [name.encode("utf-8", "surrogateescape"), generation, fid, off]
    reply = await _call(host, port, password, *args)
    if not isinstance(reply, list) or len(reply) != 3:
        raise PeerError(f"unexpected REPLVOTE reply {reply!r:.100}")
    return reply[0] == 1, int(reply[1]), bytes(reply[2]).decode("utf-8", "replace")[:200]


async def announce(host: str, port: int, password: str | None, term: int, leader: str) -> int:
    """Tell a peer the primary of `term` is `leader`; returns the peer's term."""
    reply = await _call(host, port, password, b"REPLLEADER", term, leader)
    if not isinstance(reply, int):
        raise PeerError(f"unexpected REPLLEADER reply {reply!r:.100}")
    return reply
