"""RESP2 for Zero-DB: split a client's byte stream into requests and encode replies.

Requests are arrays of bulk strings. hiredis does the parsing of complete frames; a small
scanner checks the headers of an incomplete frame so that an oversized argument is refused
from its declared size, before its bytes are buffered.
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


def _frames_size(requests: list[list[bytes]]) -> int:
    """Bytes the given requests (arrays of bulk strings) occupied on the wire."""
    lengths = [len(arg) for request in requests for arg in request]
    return (sum(lengths) + 5 * len(lengths) + sum(map(len, map(str, lengths)))
            + 3 * len(requests) + sum(len(str(len(request))) for request in requests))


class RequestParser:
    """Incremental request parser for one connection.

    `feed(data)` returns the complete requests found so far (a request is a list of bytes;
    an empty list stands for `*0`). After a framing violation it raises ProtocolViolation
    and must not be fed again.
    """

    __slots__ = ("_left", "_pos", "_reader", "_tail")

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # Bytes of the incomplete frame at the end of the stream (None: at a frame boundary).
        self._tail: bytearray | None = None
        self._pos = 0  # next header to check inside _tail
        self._left = -1  # arguments still to come in the frame being checked (-1: need `*N`)

    def feed(self, data: bytes) -> list[list[bytes]]:
        if not data:
            return []
        tail = self._tail
        stream: bytes | bytearray
        if tail is None:
            if data[0] != 42:  # not '*': an inline command
                raise ProtocolViolation(MALFORMED, [])
            stream = data
        else:
            tail += data
            stream = tail
        reader = self._reader
        reader.feed(data)
        requests: list[list[bytes]] = []
        gets = reader.gets
        while True:
            try:
                req = gets()
            except (hiredis.ProtocolError, MemoryError):
                raise ProtocolViolation(MALFORMED, requests) from None
            if req is False:
                break
            if req.__class__ is not list:
                # `*-1`, a bare bulk, status or integer at the top level: not a request.
                raise ProtocolViolation(MALFORMED, requests)
            for arg in req:
                if arg.__class__ is not bytes:
                    raise ProtocolViolation(MALFORMED_ARG, requests)
            if len(req) > MAX_ARGS:
                raise ProtocolViolation(TOO_MANY_ARGS, requests)
            requests.append(req)
        # Fast path: the stream ends exactly where the last request ends, so the next read
        # starts a new frame. hiredis consumed everything and the tail matches its encoding.
        if requests and not reader.has_data() and stream.endswith(encode_request(*requests[-1])):
            self._tail = None
            return requests
        # A frame is incomplete: keep its bytes and check the headers seen so far.
        consumed = _frames_size(requests)
        if consumed > len(stream):
            # Only non-bulk arguments (`+status` lines hiredis hands over as bytes) get here.
            raise ProtocolViolation(MALFORMED_ARG, requests)
        if tail is None:
            tail = self._tail = bytearray(data[consumed:])
            self._pos, self._left = 0, -1
        elif consumed:
            del tail[:consumed]
            self._pos, self._left = 0, -1
        if not tail:
            self._tail = None
            return requests
        message = self._check_tail(tail)
        if message is not None:
            raise ProtocolViolation(message, requests)
        return requests

    def _check_tail(self, tail: bytearray) -> str | None:
        """Walk the headers of the incomplete frame; a violation's reply text, or None."""
        pos, left, end_of_data = self._pos, self._left, len(tail)
        while pos < end_of_data:
            marker = tail[pos]
            if left < 0 and marker != 42:
                return MALFORMED
            if left >= 0 and marker != 36:  # '$'
                return MALFORMED_ARG
            eol = tail.find(b"\r\n", pos, pos + _MAX_HEADER)
            if eol < 0:
                if end_of_data - pos >= _MAX_HEADER:
                    return MALFORMED if left < 0 else MALFORMED_ARG
                break
            try:
                n = int(tail[pos + 1 : eol])
            except ValueError:
                return MALFORMED if left < 0 else MALFORMED_ARG
            if left < 0:
                if n > MAX_ARGS:
                    return TOO_MANY_ARGS
                left = n if n > 0 else -1
                pos = eol + 2
            else:
                if n > MAX_ARG_SIZE:
                    return PAYLOAD_TOO_BIG
                if n < 0:
                    return MALFORMED_ARG
                pos = eol + 2 + n + 2
                left -= 1
                if left == 0:
                    left = -1
        self._pos, self._left = pos, left
        return None

