"""RESP2 for Zero-DB: split a client's byte stream into requests and encode replies.

Requests are arrays of bulk strings. Either parser checks each header as soon as it
arrives, so an oversized argument is refused from its declared size before its bytes are
buffered: typed code in the native build (setup.py), hiredis in the pure-Python one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import hiredis

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


def _compiled() -> bool:
    # Functions of the native build are C functions, without a code object.
    return not hasattr(_compiled, "__code__")


COMPILED: Final = _compiled()
"""True in the native build (setup.py), where this module is a compiled extension."""


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

    __slots__ = ("_args", "_count", "_hiredis", "_need", "_pending")

    def __init__(self, typed: bool | None = None) -> None:
        # Typed code parses in the native build; interpreted, hiredis is faster (None:
        # whichever suits this build; tests run both).
        self._hiredis = HiredisParser() if not (COMPILED if typed is None else typed) else None
        # Bytes of the unfinished header or argument at the end of the stream (None: the
        # stream ends on a boundary), and the length they must reach before parsing again.
        self._pending: bytearray | None = None
        self._need = 0
        # The request in progress: its arguments so far and its declared count (-1: its
        # header is not read yet).
        self._args: list[bytes] = []
        self._count = -1

    def feed(self, data: bytes) -> list[list[bytes]]:
        if self._hiredis is not None:
            return self._hiredis.feed(data)
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


class HiredisParser:
    """RequestParser's engine in the pure-Python build, where a C parser beats typed code
    run by the interpreter: hiredis parses.

    Whenever a read ends inside a token (hiredis holds unconsumed bytes), the parser walks
    the token headers from the last known token boundary to find the incomplete one and
    checks what it declares, so an oversized argument is refused from its `$N` header
    before its payload is buffered. Reads ending on a token boundary, the common case,
    cost nothing beyond hiredis.
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
