"""Record encoders/decoders round-trip, and decoding never fails with anything but ZdbError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerostack.zdb.engine import ZdbError
from zerostack.zdb.engine.format import (
    DataEntry,
    IndexEntry,
    NamespaceDescriptor,
    crc32,
    parse_data_header,
    parse_index_header,
)

u32 = st.integers(0, 0xFFFFFFFF)
keys = st.binary(min_size=1, max_size=255)


def test_crc_is_castagnoli_without_final_xor() -> None:
    assert crc32(b"v") == 0x5739B3E5
    assert crc32(b"") == 0


@given(keys, u32, u32, u32, st.integers(0, 255), u32, u32, u32, u32, u32)
def test_index_entry_round_trip(key: bytes, doff: int, ln: int, prev: int, flags: int,
                                did: int, ts: int, crc: int, pid: int, poff: int) -> None:
    entry = IndexEntry(key, doff, ln, prev, flags, did, ts, crc, pid, poff)
    raw = entry.encode()
    assert len(raw) == 34 + len(key) == entry.size
    assert IndexEntry.decode(b"junk" + raw + b"tail", 4) == entry


@given(keys, st.binary(max_size=2000), u32, st.integers(0, 255), u32)
def test_data_entry_round_trip(key: bytes, payload: bytes, prev: int, flags: int, ts: int) -> None:
    entry = DataEntry(key, payload, prev, crc32(payload), flags, ts)
    raw = entry.encode()
    assert len(raw) == 18 + len(key) + len(payload)
    decoded = DataEntry.decode(raw)
    assert decoded == entry
    assert decoded.valid() or (entry.deleted and not payload)


@given(st.text(min_size=1, max_size=128).filter(lambda s: "\0" not in s),
       st.one_of(st.none(), st.text(min_size=1, max_size=60)),
       st.integers(0, 2**64 - 1), st.booleans(), st.booleans())
def test_descriptor_round_trip(name: str, pwd: str | None, maxsize: int, public: bool,
                               worm: bool) -> None:
    desc = NamespaceDescriptor(name, pwd, maxsize, public, worm)
    if len(name.encode()) > 255 or len((pwd or "").encode()) > 255:
        return
    raw = desc.encode()
    assert raw[14] & 4, "the extended flag is always set"
    assert NamespaceDescriptor.decode(raw) == desc


@settings(max_examples=300)
@given(st.binary(max_size=80), st.integers(0, 60))
def test_decoders_reject_garbage_with_zdb_error(raw: bytes, offset: int) -> None:
    for decode in (lambda: IndexEntry.decode(raw, offset), lambda: DataEntry.decode(raw, offset),
                   lambda: NamespaceDescriptor.decode(raw), lambda: parse_index_header(raw, "x"),
                   lambda: parse_data_header(raw, "x")):
        try:
            decode()
        except ZdbError:
            pass
