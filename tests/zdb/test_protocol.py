"""RESP request parsing: framing, limits checked from declared sizes, and fuzzing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostack.zdb.protocol import (
    LARGE_ARG,
    MALFORMED,
    MALFORMED_ARG,
    MAX_ARG_SIZE,
    MAX_ARGS,
    PAYLOAD_TOO_BIG,
    TOO_MANY_ARGS,
    ProtocolViolation,
    RequestParser,
    bulk,
    bulk_or_nil,
    encode_request,
    integer,
)

PARSER = {"typed": True}


@pytest.fixture(autouse=True, scope="module", params=[True, False], ids=["typed", "hiredis"])
def parser_kind(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Every test runs against both parsers: typed code (the native build) and hiredis
    (the pure-Python build)."""
    PARSER["typed"] = request.param
    yield request.param
    PARSER["typed"] = True


def new_parser() -> RequestParser:
    return RequestParser(typed=PARSER["typed"])


def feed_all(chunks: list[bytes]) -> list[list[bytes]]:
    parser = new_parser()
    out: list[list[bytes]] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def violation(chunks: list[bytes]) -> ProtocolViolation:
    parser = new_parser()
    with pytest.raises(ProtocolViolation) as info:
        for chunk in chunks:
            parser.feed(chunk)
    return info.value


def test_pipelined_requests_come_out_in_order() -> None:
    data = encode_request("SET", "k", "v") + encode_request("GET", "k") + encode_request("PING")
    assert feed_all([data]) == [[b"SET", b"k", b"v"], [b"GET", b"k"], [b"PING"]]


def test_every_split_point_gives_the_same_requests() -> None:
    data = encode_request("SET", b"\x00\r\nkey", b"v" * 300) + encode_request("GET", "k")
    for cut in range(1, len(data)):
        assert feed_all([data[:cut], data[cut:]]) == [[b"SET", b"\x00\r\nkey", b"v" * 300],
                                                      [b"GET", b"k"]]


def test_byte_by_byte() -> None:
    data = encode_request("SET", "key", "value") * 3
    assert feed_all([data[i : i + 1] for i in range(len(data))]) == [[b"SET", b"key", b"value"]] * 3


def test_inline_command_is_refused() -> None:
    exc = violation([b"PING\r\n"])
    assert exc.message == MALFORMED and exc.requests == []


def test_inline_after_valid_requests_keeps_them() -> None:
    exc = violation([encode_request("PING") + b"GET x\r\n"])
    assert exc.message == MALFORMED
    assert exc.requests == [[b"PING"]]


def test_inline_after_a_partial_frame_boundary() -> None:
    exc = violation([encode_request("PING")[:5], encode_request("PING")[5:] + b"PI", b"NG\r\n"])
    assert exc.message == MALFORMED


def test_empty_array_is_an_empty_request() -> None:
    assert feed_all([b"*0\r\n" + encode_request("PING")]) == [[], [b"PING"]]


def test_too_many_arguments_complete_frame() -> None:
    exc = violation([encode_request(*(["x"] * (MAX_ARGS + 1)))])
    assert exc.message == TOO_MANY_ARGS


def test_too_many_arguments_refused_from_the_header() -> None:
    assert violation([b"*999999\r\n$1\r\n"]).message == TOO_MANY_ARGS


def test_payload_too_big_refused_before_buffering() -> None:
    parser = new_parser()
    parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n")
    with pytest.raises(ProtocolViolation) as info:
        parser.feed(b"$%d\r\n" % (MAX_ARG_SIZE + 1) + b"x" * 100)
    assert info.value.message == PAYLOAD_TOO_BIG


def test_argument_of_exactly_the_limit_is_accepted() -> None:
    value = b"v" * MAX_ARG_SIZE
    data = encode_request(b"SET", b"k", value)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert feed_all(chunks) == [[b"SET", b"k", value]]


@pytest.mark.parametrize("frame", [
    b"*1\r\n$-5\r\n", b"*1\r\n:1\r\n", b"*2\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n", b"*1\r\n$abc\r\n",
    b"*1\r\n$-1\r\n", b"*x\r\n", b"*-3\r\n", b"+OK\r\n", b"$3\r\nfoo\r\n",
])
def test_malformed_frames(frame: bytes) -> None:
    exc = violation([frame])
    assert exc.message in (MALFORMED, MALFORMED_ARG)


def test_negative_array_length_is_malformed() -> None:
    assert violation([b"*-1\r\n"]).message == MALFORMED


def test_header_without_end_is_refused() -> None:
    assert violation([b"*1\r\n$" + b"1" * 40]).message == MALFORMED_ARG


def test_reply_encoders() -> None:
    assert bulk(b"ab") == b"$2\r\nab\r\n"
    assert bulk_or_nil(None) == b"$-1\r\n"
    assert integer(-3) == b":-3\r\n"


args_st = st.lists(st.binary(max_size=300), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(args_st, min_size=1, max_size=6), st.lists(st.integers(1, 2000), max_size=8))
def test_round_trip_with_random_splits(requests: list[list[bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_request(*r) for r in requests)
    points = sorted({c % len(data) for c in cuts} - {0})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert feed_all(chunks) == requests


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_bytes_never_crash(chunks: list[bytes]) -> None:
    parser = new_parser()
    try:
        for chunk in chunks:
            for request in parser.feed(chunk):
                assert all(isinstance(a, bytes) for a in request)
                assert len(request) <= MAX_ARGS
    except ProtocolViolation as exc:
        assert exc.message in (MALFORMED, MALFORMED_ARG, TOO_MANY_ARGS, PAYLOAD_TOO_BIG)


resp_token = st.one_of(
    st.sampled_from([b"*", b"$", b":", b"+", b"-", b"\r\n", b"\r", b"\n", b"-1", b"0"]),
    st.integers(-5, 10**12).map(lambda n: str(n).encode()),
    st.binary(max_size=8),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(resp_token, max_size=30), st.integers(1, 50))
def test_resp_like_noise_never_crashes(tokens: list[bytes], step: int) -> None:
    data = b"*" + b"".join(tokens)
    parser = new_parser()
    try:
        for i in range(0, len(data), step):
            for request in parser.feed(data[i : i + step]):
                assert all(isinstance(a, bytes) for a in request)
    except ProtocolViolation as exc:
        assert exc.message in (MALFORMED, MALFORMED_ARG, TOO_MANY_ARGS, PAYLOAD_TOO_BIG)


def test_payload_too_big_when_the_read_ends_after_the_type_byte() -> None:
    parser = new_parser()
    parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$")
    with pytest.raises(ProtocolViolation) as info:
        parser.feed(b"%d\r\nxx" % (MAX_ARG_SIZE + 1))
    assert info.value.message == PAYLOAD_TOO_BIG


def test_oversized_argument_is_refused_after_a_few_bytes() -> None:
    """The refusal comes from the header: nothing near the declared size is ever buffered."""
    parser = new_parser()
    with pytest.raises(ProtocolViolation) as info:
        parser.feed(b"*2\r\n$3\r\nGET\r\n$1000000000000\r\nabc")
    assert info.value.message == PAYLOAD_TOO_BIG


def test_elements_other_than_bulk_strings_are_malformed_arguments() -> None:
    for element in (b":1\r\n", b"-ERR\r\n", b"*1\r\n$1\r\na\r\n", b"+OK\r\n"):
        assert violation([b"*2\r\n$3\r\nGET\r\n" + element]).message == MALFORMED_ARG


def test_headers_cut_anywhere_keep_their_limits() -> None:
    # Count and size are checked once their line is whole, wherever reads end.
    frames = [(b"*1\r\n$%d\r\n" % (MAX_ARG_SIZE + 1), PAYLOAD_TOO_BIG),
              (b"*1025\r\n", TOO_MANY_ARGS), (b"*1025\r\n$3\r\nGET\r\n", TOO_MANY_ARGS)]
    for frame, message in frames:
        for cut in range(1, len(frame)):
            assert violation([frame[:cut], frame[cut:]]).message == message


def test_a_lone_oversized_count_is_refused_at_once() -> None:
    # The pure-Python build used to wait for the first element after `*1025`, so a client
    # that sent only the header never got an answer.
    exc = violation([b"*1025\r\n"])
    assert exc.message == TOO_MANY_ARGS and exc.requests == []
    exc = violation([encode_request("PING") + b"*1025\r\n"])
    assert exc.message == TOO_MANY_ARGS and exc.requests == [[b"PING"]]
    assert feed_all([b"*1024\r\n"]) == []


@pytest.mark.parametrize("frame", [b"*01\r\n$1\r\na\r\n", b"*1\r\n$01\r\na\r\n", b"*00\r\n"])
def test_leading_zeros_are_refused(frame: bytes) -> None:
    assert violation([frame]).message in (MALFORMED, MALFORMED_ARG)


def test_a_payload_must_end_with_crlf() -> None:
    for chunks in ([b"*1\r\n$1\r\naXY"], [b"*1\r\n$1\r\na\r", b"Y"], [b"*1\r\n$1\r\na", b"X\n"]):
        assert violation(chunks).message == MALFORMED_ARG


def test_a_large_argument_cut_anywhere_gives_the_same_requests() -> None:
    # A large argument left unfinished by a read is gathered on its own: cut before, in
    # and after its header, inside its payload and inside its CRLF, with requests after it
    # in the same read.
    value = bytes(range(256)) * (LARGE_ARG // 256 + 3)
    data = encode_request("SET", "k", value) + encode_request("GET", "k") * 2
    head = data.index(value)
    end = head + len(value)
    cuts = [1, head - 3, head, head + 1, head + 4096, end - 1, end, end + 1, end + 2, end + 5]
    want = [[b"SET", b"k", value], [b"GET", b"k"], [b"GET", b"k"]]
    for cut in cuts:
        assert feed_all([data[:cut], data[cut:]]) == want, cut
    for a in cuts:
        for b in cuts:
            if a < b:
                assert feed_all([data[:a], data[a:b], data[b:]]) == want, (a, b)
    assert feed_all([data[i : i + 1000] for i in range(0, len(data), 1000)]) == want


def test_a_large_argument_must_end_with_crlf() -> None:
    value = b"v" * LARGE_ARG
    frame = encode_request("SET", "k", value)
    for bad in (frame[:-2] + b"XY", frame[:-1] + b"X", frame[:-2] + b"\n\r"):
        for cut in (30, len(bad) - 2, len(bad) - 1):
            assert violation([bad[:cut], bad[cut:]]).message == MALFORMED_ARG
    # the request before the bad argument in the same read is still parsed
    parser = new_parser()
    assert parser.feed(encode_request("GET", "a") + frame[:100]) == [[b"GET", b"a"]]
    with pytest.raises(ProtocolViolation) as info:
        parser.feed(frame[100:-2] + b"XY")
    assert info.value.message == MALFORMED_ARG


def test_a_request_fed_in_small_pieces_is_parsed_in_linear_time() -> None:
    # Many large arguments arriving in small reads: only the unfinished argument is kept
    # between reads, never the whole request again (which would copy ~8 GB here).
    args = [b"%04d" % i + b"x" * 8188 for i in range(MAX_ARGS - 24)]
    data = encode_request(*args)
    parser = new_parser()
    out: list[list[bytes]] = []
    started = time.perf_counter()
    for i in range(0, len(data), 512):
        out.extend(parser.feed(data[i : i + 512]))
    assert time.perf_counter() - started < 2.0
    assert out == [args]


# Streams built from RESP fragments: both parsers must end in the same state (the same
# requests, then the same refusal or none) however the stream is cut into reads.
frame_token = st.one_of(
    st.sampled_from([b"*", b"$", b":", b"+", b"\r\n", b"\r", b"\n", b"0", b"1", b"2", b"01",
                     b"1024", b"1025", b"8388608", b"8388609", b"abc", b"*1\r\n", b"$1\r\n",
                     b"*2\r\n$3\r\nGET\r\n", b"*1025\r\n", b"$8388609\r\n"]),
    st.binary(max_size=6),
)


def outcome(typed: bool, chunks: list[bytes]) -> tuple[list[list[bytes]], str | None]:
    parser = RequestParser(typed=typed)
    out: list[list[bytes]] = []
    try:
        for chunk in chunks:
            out.extend(parser.feed(chunk))
    except ProtocolViolation as exc:
        return out + exc.requests, exc.message
    return out, None


@settings(max_examples=1500, deadline=None)
@given(st.lists(args_st, max_size=3), st.lists(frame_token, max_size=30),
       st.lists(st.integers(1, 400), max_size=6))
def test_both_parsers_answer_every_stream_alike(valid: list[list[bytes]], tokens: list[bytes],
                                                cuts: list[int]) -> None:
    data = b"".join(encode_request(*r) for r in valid) + b"".join(tokens)
    if not data:
        return
    points = sorted({c % len(data) for c in cuts} - {0})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert outcome(False, chunks) == outcome(True, chunks)


def receive(parser: RequestParser, data: bytes, read: int) -> list[list[bytes]]:
    """Feed `data` the way the server reads a socket: into the unfinished large argument's
    own buffer when the parser offers one (buffer() / filled()), else `read` bytes at most
    through feed()."""
    out: list[list[bytes]] = []
    pos = 0
    while pos < len(data):
        view = parser.buffer()
        if view is None:
            out.extend(parser.feed(data[pos : pos + read]))
            pos += min(read, len(data) - pos)
            continue
        n = min(len(view), len(data) - pos, read)
        view[:n] = data[pos : pos + n]
        view.release()
        parser.filled(n)
        pos += n
    return out


def test_large_arguments_received_into_their_own_buffer() -> None:
    value = bytes(range(256)) * (LARGE_ARG // 256 * 3 + 1)
    data = (encode_request("SET", "k", value) + encode_request("GET", "k")
            + encode_request("SET", "k", value, "12") + encode_request("PING"))
    want = [[b"SET", b"k", value], [b"GET", b"k"], [b"SET", b"k", value, b"12"], [b"PING"]]
    for read in (1, 2, 3, 7, 1000, 4096, LARGE_ARG - 1, LARGE_ARG + 1, 10 * LARGE_ARG):
        assert receive(new_parser(), data, read) == want, read
    if not PARSER["typed"]:
        assert new_parser().buffer() is None  # hiredis gathers everything itself


def test_a_received_large_argument_must_end_with_crlf() -> None:
    value = b"v" * (2 * LARGE_ARG)
    frame = encode_request("SET", "k", value)
    for bad in (frame[:-2] + b"XY", frame[:-1] + b"X", frame[:-2] + b"\n\r"):
        for read in (1, 100, 4096):
            with pytest.raises(ProtocolViolation) as info:
                receive(new_parser(), bad, read)
            assert info.value.message == MALFORMED_ARG


def test_only_a_sets_value_is_kept_in_its_receive_buffer() -> None:
    # With keep_values (the server's parser), the value of SET/SETX gathered as a large
    # argument is handed over without a copy; every other argument is bytes.
    value = b"x" * (2 * LARGE_ARG)
    data = (encode_request("set", "k", value) + encode_request("SETX", "k", value)
            + encode_request("SET", value, "v") + encode_request("NSSET", "ns", value)
            + encode_request("SET", "k", value, value))
    parser = RequestParser(typed=PARSER["typed"], keep_values=True)
    got = receive(parser, data, 4096)
    assert got == [[b"set", b"k", value], [b"SETX", b"k", value], [b"SET", value, b"v"],
                   [b"NSSET", b"ns", value], [b"SET", b"k", value, value]]
    types = [[type(arg) for arg in request] for request in got]
    if PARSER["typed"]:
        assert types[0][2] is bytearray and types[1][2] is bytearray
        assert types[4][2] is bytearray and types[4][3] is bytes
    else:
        assert types[0][2] is bytes  # hiredis: bytes throughout
    assert types[2] == [bytes, bytes, bytes] and types[3] == [bytes, bytes, bytes]
    # Without keep_values (replication's parsers) every argument is bytes.
    plain = receive(RequestParser(typed=PARSER["typed"]), data, 4096)
    assert all(type(arg) is bytes for request in plain for arg in request)


GET_FRAMES = [
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000012345\r\n",
    b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n",                 # CRLF inside the key
    b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n",                       # empty key: GET's own refusal
    b"*2\r\n$3\r\nGET\r\n$1000\r\n" + b"k" * 1000 + b"\r\n",  # four digits
    b"*2\r\n$3\r\nGET\r\n$10000\r\n" + b"k" * 10000 + b"\r\n",  # five: the general way
    b"*2\r\n$3\r\nget\r\n$1\r\nk\r\n",
    b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\nx\r\n",
    b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n",                     # leading zero
    b"*2\r\n$3\r\nGET\r\n$2\r\nk\r\n",                      # shorter than declared
    b"*2\r\n$3\r\nGET\r\n$1\r\nkk\r\n",                     # longer than declared
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\n\r",
    b"*2\r\n$3\r\nGET\r\n$-1\r\n",
    b"*2\r\n$3\r\nGET\r\n:1\r\n",
    b"*2\r\n$3\r\nGEX\r\n$1\r\nk\r\n",
    b"*2\r\n$4\r\nGET\r\n$1\r\nk\r\n",
    b"*2\n\r$3\r\nGET\r\n$1\r\nk\r\n",
]


@pytest.mark.parametrize("frame", GET_FRAMES)
def test_gets_read_in_one_step_parse_as_the_general_way(frame: bytes) -> None:
    """The typed parser reads a whole GET framed the usual way in one step: every GET-like
    frame, whole or cut at any byte, in a pipeline or alone, gives what hiredis gives
    (the same requests, the same refusal)."""
    other = encode_request(b"SET", b"a", b"b")
    for stream in (frame, frame * 3, other + frame + frame, frame + other):
        assert outcome(True, [stream]) == outcome(False, [stream])
        for cut in range(1, len(stream)):
            chunks = [stream[:cut], stream[cut:]]
            assert outcome(True, chunks) == outcome(False, chunks), (stream, cut)
