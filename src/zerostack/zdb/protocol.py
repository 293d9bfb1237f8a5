"""RESP2 for Zero-DB: split a client's byte stream into requests and encode replies.

Requests are arrays of bulk strings. The parser is written for the server's native build
(see setup.py): typed, allocation-light, and checking each header as soon as it arrives,
so an oversized argument is refused from its declared size before its bytes are buffered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

MAX_ARGS: Final = 1024
"""More arguments than this in one request -> `-Too many arguments`."""

MAX_ARG_SIZE: Final = 8 * 1024 * 1024
"""An argument declared larger than this -> `-Payload too big`, and the connection closes."""

# Reference error texts for framing problems; every one of them ends the connection.
MALFORMED: Final = "Malformed request, array expected"
MALFORMED_ARG: Final = "Malformed query string"
TOO_MANY_ARGS: Final = "Too many arguments"
PAYLOAD_TOO_BIG: Final = "Payload too big"

# A header line (`*N` / `$N`) longer than this without its CRLF is not RESP.
_MAX_HEADER: Final = 32

OK: Final = b"+OK\r\n"
PONG: Final = b"+PONG\r\n"
NIL: Final = b"$-1\r\n"
ZERO: Final = b":0\r\n"
ONE: Final = b":1\r\n"
EMPTY_ARRAY: Final = b"*0\r\n"


class ProtocolViolation(Exception):
    """The stream cannot be parsed further; `message` is the reply text (without '-').

    `requests` holds the complete requests that came before the violation in the stream:
    they are served before the error is sent and the connection closed.
    """

    def __init__(self, message: str, requests: list[list[bytes]]) -> None:
        super().__init__(message)
        self.message = message
        self.requests = requests


def error(message: str) -> bytes:
    """An error reply; `message` is the reference text without the leading '-'."""
    return b"-" + message.encode() + b"\r\n"


def status(message: str) -> bytes:
    return b"+" + message.encode() + b"\r\n"


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


# `$N\r\n` for the sizes most replies have: concatenating beats formatting each time.
_BULK_HEADS: Final = [b"$%d\r\n" % n for n in range(1024)]


def bulk(value: bytes) -> bytes:
    n = len(value)
    if n < 1024:
        return _BULK_HEADS[n] + value + b"\r\n"
    return b"$%d\r\n%b\r\n" % (n, value)


def bulk_or_nil(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    return bulk(value)


def array(items: Iterable[bytes]) -> bytes:
    """An array of already-encoded replies."""
    parts = list(items)
    return b"*%d\r\n" % len(parts) + b"".join(parts)


def encode_request(*args: bytes | str | int) -> bytes:
    """Encode one request as an array of bulk strings (what clients send)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        raw = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


class RequestParser:
    """Incremental request parser for one connection.

    `feed(data)` returns the complete requests found so far (a request is a list of bytes;
    an empty list stands for `*0`). After a framing violation it raises ProtocolViolation
    and must not be fed again.

    Every header is checked as soon as its line is complete, so an oversized argument or
    argument count is refused from what it declares, before its payload is buffered. When
    a read ends inside a request, the arguments already complete are kept and only the
    bytes of the unfinished one wait for the next read, so each byte is copied a bounded
    number of times however the stream is cut.
    """

    __slots__ = ("_args", "_count", "_need", "_pending")

    def __init__(self) -> None:
        # Bytes of the unfinished header or argument at the end of the stream (None: the
        # stream ends on a boundary), and the length they must reach before parsing again.
        self._pending: bytearray | None = None
        self._need = 0
        # The request in progress: its arguments so far and its declared count (-1: its
        # header is not read yet).
        self._args: list[bytes] = []
        self._count = -1

    def feed(self, data: bytes) -> list[list[bytes]]:
        pending = self._pending
        if pending is not None:
            pending += data
            if len(pending) < self._need:
                return []
            buf = bytes(pending)
        else:
            buf = data
        requests: list[list[bytes]] = []
        pos = 0
        end = len(buf)
        args = self._args
        count = self._count
        need = 0  # > 0: the stream ends inside a token; parse again at this length
        while need == 0:
            if count < 0:
                if pos >= end:
                    break
                if buf[pos] != 42:  # '*': inline commands and bare values are not requests
                    raise ProtocolViolation(MALFORMED, requests)
                count, at = _header(buf, pos, end, MALFORMED, requests)
                if at < 0:
                    count = -1
                    need = end + 1
                    break
                if count > MAX_ARGS:
                    raise ProtocolViolation(TOO_MANY_ARGS, requests)
                pos = at
                args = []
            while len(args) < count:
                if pos >= end:
                    need = pos + 1
                    break
                if buf[pos] != 36:  # '$': every argument is a bulk string
                    raise ProtocolViolation(MALFORMED_ARG, requests)
                size, start = _header(buf, pos, end, MALFORMED_ARG, requests)
                if start < 0:
                    need = end + 1
                    break
                if size > MAX_ARG_SIZE:
                    raise ProtocolViolation(PAYLOAD_TOO_BIG, requests)
                stop = start + size
                if stop + 2 > end:
                    need = stop + 2
                    break
                if buf[stop] != 13 or buf[stop + 1] != 10:
                    raise ProtocolViolation(MALFORMED_ARG, requests)
                args.append(buf[start:stop])
                pos = stop + 2
            else:
                requests.append(args)
                args = []
                count = -1
        self._args = args
        self._count = count
        if need == 0:
            self._pending = None
        else:
            self._pending = bytearray(memoryview(buf)[pos:])
            self._need = need - pos
        return requests


def _header(buf: bytes, pos: int, end: int, bad: str,
            requests: list[list[bytes]]) -> tuple[int, int]:
    """The count after the marker at buf[pos] and the offset after its CRLF; (0, -1) when
    the line is not all here yet. Only decimal digits are accepted (no sign: a negative
    count or size is no request)."""
    at = pos + 1
    limit = min(end, pos + _MAX_HEADER)
    value = 0
    while at < limit:
        c = buf[at]
        if 48 <= c <= 57:
            value = value * 10 + (c - 48)
            at += 1
            continue
        if c != 13 or at == pos + 1:
            raise ProtocolViolation(bad, requests)
        if at + 1 >= end:
            return 0, -1
        if buf[at + 1] != 10:
            raise ProtocolViolation(bad, requests)
        return value, at + 2
    if end - pos >= _MAX_HEADER:
        raise ProtocolViolation(bad, requests)
    return 0, -1
