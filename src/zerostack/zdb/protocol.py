"""RESP2 for Zero-DB: split a client's byte stream into requests and encode replies.

Requests are arrays of bulk strings. Either parser checks each header as soon as it
arrives, so an oversized argument is refused from its declared size before its bytes are
buffered: typed code in the native build (setup.py), hiredis in the pure-Python one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from typing import Any, Final

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

# An argument at least this large that a read leaves unfinished is gathered on its own
# (see RequestParser.feed), so its bytes are copied once on their way to a request.
LARGE_ARG: Final = 64 * 1024


def _uninitialized_bytearray() -> Any:
    """CPython's PyByteArray_FromStringAndSize(NULL, n): a bytearray of n bytes that are
    not zeroed first (None where the C API is not reachable)."""
    try:
        fn: Any = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    fn.restype = ctypes.py_object
    return fn


_NEW_BYTEARRAY: Final[Any] = _uninitialized_bytearray()


def receive_buffer(size: int) -> bytearray:
    """A buffer for a large argument that the socket fills to its last byte before anyone
    reads it (see RequestParser.buffer): it is not zeroed, which cost about 5% of the
    server's CPU on a stream of 1 MiB SETs. A buffer left unfinished is dropped unread."""
    if _NEW_BYTEARRAY is None:
        return bytearray(size)
    buf: bytearray = _NEW_BYTEARRAY(None, size)
    return buf


# Commands whose third argument is a value to store: with keep_values, one gathered as a
# large argument is handed over in the buffer it was received into.
VALUE_COMMANDS: Final = frozenset({b"SET", b"SETX"})

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


CRLF: Final = b"\r\n"

# `$N\r\n` for the sizes most replies have: concatenating beats formatting each time.
BULK_HEADS: Final = [b"$%d\r\n" % n for n in range(1024)]


def bulk(value: bytes) -> bytes:
    n = len(value)
    if n < 1024:
        return BULK_HEADS[n] + value + b"\r\n"
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

    __slots__ = ("_args", "_count", "_crlf", "_hiredis", "_keep", "_large", "_large_fill",
                 "_large_size", "_need", "_pending")

    def __init__(self, typed: bool | None = None, keep_values: bool = False) -> None:
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
        # A large argument cut by a read: a buffer of its declared size, and how much of it
        # arrived. Its bytes go there directly (see buffer()), not via `_pending`; then the
        # CRLF after it is due (`_crlf`: how many of its bytes are still to come).
        self._large: bytearray | None = None
        self._large_size = 0
        self._large_fill = 0
        self._crlf = 0
        # The value of a SET gathered as a large argument stays the bytearray it arrived in.
        self._keep = keep_values

    def receiving(self) -> bool:
        """A large argument is unfinished: its bytes can be received with buffer()."""
        return self._large is not None

    def buffer(self) -> memoryview | None:
        """Where the next bytes of the stream go when a large argument is unfinished: a view
        of the part of its buffer still to fill, so a socket can receive straight into it
        (then call filled()). None: read anywhere and feed() what arrived."""
        large = self._large
        if large is None:
            return None
        return memoryview(large)[self._large_fill:]

    def filled(self, nbytes: int) -> None:
        """`nbytes` were received into the view buffer() returned. The request they belong
        to completes with the argument's CRLF, which comes with the next feed()."""
        fill = self._large_fill + nbytes
        self._large_fill = fill
        if fill >= self._large_size:
            self._take_large()

    def _take_large(self) -> None:
        """The large argument is whole: add it to the request; its CRLF is due next."""
        large = self._large
        assert large is not None
        self._large = None
        self._crlf = 2
        args = self._args
        if self._keep and len(args) == 2 and args[0].upper() in VALUE_COMMANDS:
            # No copy of the value: SET reads it as it is (see commands.write.cmd_set).
            kept: list[Any] = args
            kept.append(large)
        else:
            args.append(bytes(large))

    def feed(self, data: bytes) -> list[list[bytes]]:
        if self._hiredis is not None:
            return self._hiredis.feed(data)
        pos = 0
        large = self._large
        if large is not None:
            fill = self._large_fill
            take = self._large_size - fill
            if len(data) < take:
                large[fill:fill + len(data)] = data
                self._large_fill = fill + len(data)
                return []
            large[fill:] = memoryview(data)[:take]
            self._take_large()
            pos = take
        if self._crlf:
            # The end of a large argument: its CRLF, possibly cut by a read.
            end = len(data)
            if self._crlf == 2:
                if pos >= end:
                    return []
                if data[pos] != 13:
                    raise ProtocolViolation(MALFORMED_ARG, [])
                pos += 1
                self._crlf = 1
            if pos >= end:
                return []
            if data[pos] != 10:
                raise ProtocolViolation(MALFORMED_ARG, [])
            pos += 1
            self._crlf = 0
        pending = self._pending
        if pending is not None:
            pending += data
            if len(pending) < self._need:
                return []
            buf = bytes(pending)
        else:
            buf = data
        requests: list[list[bytes]] = []
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
                key_at, at = _get_request(buf, pos, end)
                if key_at:
                    # The bulk of pipelined loads, read in one step (see _get_request).
                    requests.append([GET, buf[key_at:at - 2]])
                    pos = at
                    continue
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
                    if size >= LARGE_ARG:
                        # Gathered apart from here on, in a buffer of its final size: no
                        # copy of the whole stream tail, no copy as it grows.
                        large = receive_buffer(size)
                        have = min(end, stop) - start
                        large[:have] = memoryview(buf)[start:start + have]
                        self._large = large
                        self._large_size = size
                        self._large_fill = have
                        pos = start + have
                        if have == size:
                            # Only (part of) its CRLF is missing.
                            self._args = args
                            self._count = count
                            self._take_large()
                            args = self._args
                            if pos < end:
                                if buf[pos] != 13:
                                    raise ProtocolViolation(MALFORMED_ARG, requests)
                                pos += 1
                                self._crlf = 1
                        need = -1
                        break
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
        if need <= 0:
            self._pending = None
        else:
            self._pending = bytearray(memoryview(buf)[pos:])
            self._need = need - pos
        return requests


GET: Final = b"GET"
"""The name of every GET request _get_request() reads (one bytes object for them all)."""


def _get_request(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(where the key starts, where the request ends) when buf[pos:end] starts with a whole
    GET framed as clients send it, `*2\r\n$3\r\nGET\r\n$N\r\nKEY\r\n` with N of one to four
    digits and no leading zero; (0, 0) otherwise, and RequestParser.feed reads the request
    (and refuses it, if it must) the general way. What this accepts, the general way
    accepts too and reads as the same request."""
    at = pos + 14
    if at + 4 > end:  # the shortest: "1\r\nk\r\n"
        return 0, 0
    if buf[pos + 1] != 50 or buf[pos + 2] != 13 or buf[pos + 3] != 10 \
            or buf[pos + 4] != 36 or buf[pos + 5] != 51 or buf[pos + 6] != 13 \
            or buf[pos + 7] != 10 or buf[pos + 8] != 71 or buf[pos + 9] != 69 \
            or buf[pos + 10] != 84 or buf[pos + 11] != 13 or buf[pos + 12] != 10 \
            or buf[pos + 13] != 36:  # *2 CR LF $3 CR LF G E T CR LF $
        return 0, 0
    c = buf[at]
    if c < 49 or c > 57:  # 1-9
        return 0, 0
    size = c - 48
    at += 1
    limit = min(end, at + 3)
    while at < limit:
        c = buf[at]
        if c < 48 or c > 57:
            break
        size = size * 10 + c - 48
        at += 1
    if at + 1 >= end or buf[at] != 13 or buf[at + 1] != 10:
        return 0, 0
    start = at + 2
    stop = start + size
    if stop + 2 > end or buf[stop] != 13 or buf[stop + 1] != 10:
        return 0, 0
    return start, stop + 2


class HiredisParser:
    """RequestParser's engine in the pure-Python build, where a C parser beats typed code
    run by the interpreter: hiredis parses.

    hiredis knows nothing of our limits, so a small scanner follows the stream's framing
    alongside it and applies the native parser's rules to every header as soon as its line
    is whole: the same refusals, at the same point of the stream. The scanner keeps only
    counters between reads (arguments still due, payload bytes still to pass) and the
    bytes of a header line cut by a read, never payload bytes. Whole requests that sit in
    a read framed canonically (the usual case) are recognised from what hiredis returned
    and skipped without scanning: hiredis refuses numbers with leading zeros or signs, so
    where each header's marker and each payload's CRLF are where the sizes put them, those
    are the bytes it parsed.
    """

    __slots__ = ("_cr", "_head", "_left", "_reader", "_skip")

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # Framing state at the end of what was fed: arguments still due in the current
        # request (-1: at a request boundary), payload bytes (CRLF included) still to pass,
        # the start of a header line cut by a read, and the CR byte of a payload end whose
        # LF has not arrived yet (-1: none).
        self._left = -1
        self._skip = 0
        self._head: bytes | None = None
        self._cr = -1

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
            self._scan(data, requests, 0, 0, False)
            raise ProtocolViolation(MALFORMED, requests) from None
        at_boundary = self._left < 0 and not self._skip and self._head is None
        if at_boundary and req.__class__ is list and len(req) <= MAX_ARGS \
                and _frame_end(data, 0, req) == len(data):
            # Fast path: the read held exactly one whole request.
            requests.append(req)
            return requests
        clean = True
        while req is not False:
            if req.__class__ is not list or len(req) > MAX_ARGS:
                clean = False
                break
            for arg in req:
                if arg.__class__ is not bytes:
                    clean = False
                    break
            if not clean:
                break
            requests.append(req)
            try:
                req = gets()
            except (hiredis.ProtocolError, MemoryError):
                clean = False
                break
        buf, pos, done = data, 0, 0
        if not at_boundary:  # first the rest of the request in progress
            buf, pos, done = self._scan(data, requests, 0, 0, True)
        if clean:
            pos, done = _frames_end(buf, pos, requests, done)
        if pos < len(buf):
            # The native parser's refusal, if any; hiredis choking on something the native
            # rules accept is still no request.
            self._scan(buf, requests, pos, done, False)
        if not clean:
            raise ProtocolViolation(MALFORMED, requests)
        return requests

    def _scan(self, data: bytes, requests: list[list[bytes]], pos: int, done: int,
              one: bool) -> tuple[bytes, int, int]:
        """Follow the framing through data[pos:] with the native parser's checks, `done`
        requests of this read being complete before pos; with `one`, stop where the request
        in progress ends. Returns (the bytes scanned, where it stopped, requests complete);
        on a violation raises it with the requests completed before it."""
        if self._head is not None:
            data = self._head + data[pos:]
            pos = 0
            self._head = None
        end = len(data)
        left = self._left
        skip = self._skip
        try:
            while True:
                if skip:
                    stop = pos + skip
                    if stop > end:
                        if stop - end == 1 and end > pos:
                            self._cr = data[end - 1]  # the payload's CR; its LF comes next
                        skip = stop - end
                        pos = end
                        break
                    if skip == 1:
                        cr, self._cr = self._cr, -1
                    else:
                        cr = data[stop - 2]
                    if cr != 13 or data[stop - 1] != 10:
                        raise ProtocolViolation(MALFORMED_ARG, requests)
                    pos = stop
                    skip = 0
                    if left == 0:
                        left = -1
                        done += 1
                        if one:
                            break
                if pos >= end:
                    break
                if left < 0:
                    if data[pos] != 42:  # '*'
                        raise ProtocolViolation(MALFORMED, requests)
                    count, at = _header(data, pos, end, MALFORMED, requests)
                    if at < 0:
                        self._head = data[pos:]
                        pos = end
                        break
                    if count > MAX_ARGS:
                        raise ProtocolViolation(TOO_MANY_ARGS, requests)
                    pos = at
                    if count == 0:
                        done += 1  # `*0`: an empty request
                        if one:
                            break
                    else:
                        left = count
                    continue
                if data[pos] != 36:  # '$'
                    raise ProtocolViolation(MALFORMED_ARG, requests)
                size, at = _header(data, pos, end, MALFORMED_ARG, requests)
                if at < 0:
                    self._head = data[pos:]
                    pos = end
                    break
                if size > MAX_ARG_SIZE:
                    raise ProtocolViolation(PAYLOAD_TOO_BIG, requests)
                pos = at
                left -= 1
                skip = size + 2
        except ProtocolViolation as exc:
            exc.requests = requests[:done]  # only those completed before the violation
            raise
        self._left = left
        self._skip = skip
        return data, pos, done


# Length of the decimal text of 0..9999, the sizes nearly every header carries.
_DIGITS: Final = bytes(len(str(n)) for n in range(10000))


def _frame_end(data: bytes, pos: int, request: Sequence[object]) -> int:
    """Where `request`, as hiredis returned it, ends when it sits at data[pos] framed
    canonically: its markers and payload CRLFs where the sizes put them. -1 when it does
    not. Elements are whatever hiredis made of the stream, hence `object`."""
    end = len(data)
    if pos >= end or data[pos] != 42:  # '*'
        return -1
    digits = _DIGITS
    count = len(request)
    pos += 3 + (digits[count] if count < 10000 else len(str(count)))
    for arg in request:
        if not isinstance(arg, bytes) or pos >= end or data[pos] != 36:  # '$'
            return -1
        n = len(arg)
        pos += 5 + n + (digits[n] if n < 10000 else len(str(n)))
        if pos > end or data[pos - 2] != 13 or data[pos - 1] != 10:
            return -1
    return pos


def _frames_end(data: bytes, pos: int, requests: list[list[bytes]], done: int
                ) -> tuple[int, int]:
    """_frame_end() over requests[done:] (elements known to be bytes) from data[pos]:
    (where the last one recognised ends, how many requests are recognised in all)."""
    end = len(data)
    digits = _DIGITS
    count = len(requests)
    while done < count:
        request = requests[done]
        if pos >= end or data[pos] != 42:  # '*'
            break
        n = len(request)
        at = pos + 3 + (digits[n] if n < 10000 else len(str(n)))
        for arg in request:
            if at >= end or data[at] != 36:  # '$'
                return pos, done
            n = len(arg)
            at += 5 + n + (digits[n] if n < 10000 else len(str(n)))
            if at > end or data[at - 2] != 13 or data[at - 1] != 10:
                return pos, done
        pos = at
        done += 1
    return pos, done


def _header(buf: bytes, pos: int, end: int, bad: str,
            requests: list[list[bytes]]) -> tuple[int, int]:
    """The count after the marker at buf[pos] and the offset after its CRLF; (0, -1) when
    the line is not all here yet. Only decimal digits are accepted, without a leading zero
    (no sign: a negative count or size is no request)."""
    at = pos + 1
    limit = min(end, pos + _MAX_HEADER)
    value = 0
    while at < limit:
        c = buf[at]
        if 48 <= c <= 57:
            if value == 0 and at > pos + 1:
                raise ProtocolViolation(bad, requests)  # a leading zero: hiredis refuses it too
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
