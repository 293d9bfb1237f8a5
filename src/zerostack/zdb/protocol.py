"""RESP2 for Zero-DB: split a client's byte stream into requests and encode replies.

Requests are arrays of bulk strings. hiredis does the parsing; when a read ends inside a
token, a small scanner checks that token's header, so an oversized argument is refused
from its declared size before its bytes are buffered.
"""

from __future__ import annotations

from collections.abc import Iterable

import hiredis

MAX_ARGS = 1024
"""More arguments than this in one request -> `-Too many arguments`."""

MAX_ARG_SIZE = 8 * 1024 * 1024
"""An argument declared larger than this -> `-Payload too big`, and the connection closes."""

# Reference error texts for framing problems; every one of them ends the connection.
MALFORMED = "Malformed request, array expected"
MALFORMED_ARG = "Malformed query string"
TOO_MANY_ARGS = "Too many arguments"
PAYLOAD_TOO_BIG = "Payload too big"

# A header line (`*N` / `$N`) longer than this without its CRLF is not RESP.
_MAX_HEADER = 32

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"
EMPTY_ARRAY = b"*0\r\n"


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


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def bulk_or_nil(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    return b"$%d\r\n%b\r\n" % (len(value), value)


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

    hiredis parses. Whenever a read ends inside a token (hiredis holds unconsumed bytes),
    the parser walks the token headers from the last known token boundary to find the
    incomplete one and checks what it declares, so an oversized argument is refused from
    its `$N` header before its payload is buffered. Reads ending on a token boundary, the
    common case, cost nothing beyond hiredis.
    """

    __slots__ = ("_reader", "_window")

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # Stream bytes from the last known token boundary, kept while hiredis holds an
        # incomplete token (None: the stream ends on a token boundary).
        self._window: bytearray | None = None

    def feed(self, data: bytes) -> list[list[bytes]]:
        if not data:
            return []
        reader = self._reader
        reader.feed(data)
        requests: list[list[bytes]] = []
        gets = reader.gets
        try:
            req = gets()
        except (hiredis.ProtocolError, MemoryError):
            # Inline commands end here: their first byte is no RESP type.
            raise ProtocolViolation(MALFORMED, requests) from None
        if req.__class__ is list and data[-1] == 10 and not reader.has_data() \
                and len(req) <= MAX_ARGS:
            # Fast path: the read held exactly one whole request (no pipelining).
            for arg in req:
                if arg.__class__ is not bytes:
                    raise ProtocolViolation(MALFORMED_ARG, requests)
            self._window = None
            requests.append(req)
            return requests
        while req is not False:
            if req.__class__ is not list:
                # `*-1`, a bare bulk, status or integer at the top level: not a request.
                raise ProtocolViolation(MALFORMED, requests)
            for arg in req:
                if arg.__class__ is not bytes:
                    raise ProtocolViolation(MALFORMED_ARG, requests)
            if len(req) > MAX_ARGS:
                raise ProtocolViolation(TOO_MANY_ARGS, requests)
            requests.append(req)
            try:
                req = gets()
            except (hiredis.ProtocolError, MemoryError):
                raise ProtocolViolation(MALFORMED, requests) from None
        if not reader.has_data():
            # Everything was consumed: the stream ends on a token boundary, or just after
            # the type byte of the next token (hiredis consumes that byte first).
            self._window = None if data[-1] == 10 else bytearray(data[-1:])
            return requests
        window = self._window
        if window is None:
            window = bytearray(data)
        else:
            window += data
        start = _incomplete_token(window, requests)
        del window[:start]
        self._window = window or None
        return requests


def _incomplete_token(window: bytearray, requests: list[list[bytes]]) -> int:
    """Walk complete tokens from window[0] (a token boundary); the offset of the incomplete
    last token, after checking what its header declares."""
    pos, end = 0, len(window)
    find = window.find
    while pos < end:
        marker = window[pos]
        if marker != 36 and marker != 42:  # '$' / '*': nothing else belongs in a request
            raise ProtocolViolation(MALFORMED if marker != 43 else MALFORMED_ARG, requests)
        eol = find(b"\r\n", pos, pos + _MAX_HEADER)
        if eol < 0:
            if end - pos >= _MAX_HEADER:
                raise ProtocolViolation(MALFORMED if marker == 42 else MALFORMED_ARG, requests)
            return pos
        try:
            n = int(window[pos + 1 : eol])
        except ValueError:
            raise ProtocolViolation(MALFORMED if marker == 42 else MALFORMED_ARG,
                                    requests) from None
        if marker == 42:
            if n > MAX_ARGS:
                raise ProtocolViolation(TOO_MANY_ARGS, requests)
            if n < 0:
                raise ProtocolViolation(MALFORMED, requests)
            pos = eol + 2
            continue
        if n > MAX_ARG_SIZE:
            raise ProtocolViolation(PAYLOAD_TOO_BIG, requests)
        if n < 0:
            raise ProtocolViolation(MALFORMED_ARG, requests)
        following = eol + 2 + n + 2
        if following > end:
            return pos
        pos = following
    return pos
