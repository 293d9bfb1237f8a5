"""Byte layout of 0-db v2 files: namespace descriptor, index file and data file records.

All integers are little-endian and structs are packed, exactly as the reference writes them.
Hot paths use the `struct.Struct` objects directly; the dataclasses are for tools and tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import crc32c as _crc32c

from zerostack.zdb.engine.errors import ZdbError

# <index>/<ns>/zdb-namespace: u32 version, u8 name_len, u8 pass_len, u64 maxsize, u8 flags
NS_DESCRIPTOR: Final = struct.Struct("<IBBQB")
NS_VERSION: Final = 1
NS_PUBLIC: Final = 1
NS_WORM: Final = 2
NS_EXTENDED: Final = 4  # always set by the reference
NS_FILENAME: Final = "zdb-namespace"

# i<N>: "IDX0", u32 version, u64 created, u64 opened, u32 fileid, u8 mode
INDEX_HEADER: Final = struct.Struct("<4sIQQIB")
INDEX_MAGIC: Final = b"IDX0"
INDEX_VERSION: Final = 4
# entry: u8 key_len, u32 data_offset, u32 length, u32 previous, u8 flags, u32 data_id,
#        u32 timestamp, u32 crc, u32 parent_id, u32 parent_offset, then the key
INDEX_ENTRY: Final = struct.Struct("<BIIIBIIIII")
INDEX_FLAGS_AT: Final = 13  # byte offset of `flags` inside an index entry (patched in place)

# d<N>: "DAT0", u32 version, u64 0, u64 0, u32 fileid
DATA_HEADER: Final = struct.Struct("<4sIQQI")
DATA_MAGIC: Final = b"DAT0"
DATA_VERSION: Final = 3
# entry: u8 key_len, u32 payload_len, u32 previous, u32 crc, u8 flags, u32 timestamp, key, payload
DATA_ENTRY: Final = struct.Struct("<BIIIBI")

FLAG_DELETED: Final = 1
FLAG_TRUNCATED: Final = 2  # data entries only; never written by zerostack

MODE_USER: Final = 0
MODE_SEQ: Final = 1
SEQ_KEY: Final = struct.Struct("<Q")  # sequential keys are the 8-byte little-endian slot number
SEQ_ENTRY_SIZE: Final = INDEX_ENTRY.size + SEQ_KEY.size

MAX_KEY: Final = 255
U32: Final = 0xFFFFFFFF

_crc: Final = _crc32c.crc32c


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), start value 0, no final XOR — what 0-db stores for payloads."""
    return _crc(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


def index_name(fileid: int) -> str:
    return f"i{fileid}"


def data_name(fileid: int) -> str:
    return f"d{fileid}"


def index_header(fileid: int, mode: int) -> bytes:
    # created/opened stay 0: the reference 2.0.7 writes zeros there too.
    return INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, 0, fileid, mode)


def data_header(fileid: int) -> bytes:
    return DATA_HEADER.pack(DATA_MAGIC, DATA_VERSION, 0, 0, fileid)


def parse_index_header(raw: bytes, where: str) -> tuple[int, int]:
    """(fileid, mode) of an index file header; ZdbError when it is not one."""
    if len(raw) < INDEX_HEADER.size:
        raise ZdbError(f"{where}: index header is truncated ({len(raw)} bytes)")
    magic, version, _created, _opened, fileid, mode = INDEX_HEADER.unpack_from(raw, 0)
    if magic != INDEX_MAGIC:
        raise ZdbError(f"{where}: not a 0-db index file (magic {magic!r})")
    if version != INDEX_VERSION:
        raise ZdbError(f"{where}: index version {version} is not supported (expected {INDEX_VERSION})")
    if mode not in (MODE_USER, MODE_SEQ):
        raise ZdbError(f"{where}: unknown index mode {mode}")
    return fileid, mode


def parse_data_header(raw: bytes, where: str) -> int:
    """fileid of a data file header; ZdbError when it is not one."""
    if len(raw) < DATA_HEADER.size:
        raise ZdbError(f"{where}: data header is truncated ({len(raw)} bytes)")
    magic, version, _a, _b, fileid = DATA_HEADER.unpack_from(raw, 0)
    if magic != DATA_MAGIC:
        raise ZdbError(f"{where}: not a 0-db data file (magic {magic!r})")
    if version != DATA_VERSION:
        raise ZdbError(f"{where}: data version {version} is not supported (expected {DATA_VERSION})")
    return int(fileid)


@dataclass(frozen=True)
class IndexEntry:
    """One index record: where a key's payload lives and the link to its older version."""

    key: bytes
    data_offset: int
    length: int
    previous: int
    flags: int
    data_id: int
    timestamp: int
    crc: int
    parent_id: int
    parent_offset: int

    @property
    def size(self) -> int:
        return INDEX_ENTRY.size + len(self.key)

    @property
    def deleted(self) -> bool:
        return bool(self.flags & FLAG_DELETED)

    def encode(self) -> bytes:
        return INDEX_ENTRY.pack(len(self.key), self.data_offset, self.length, self.previous,
                                self.flags, self.data_id, self.timestamp, self.crc,
                                self.parent_id, self.parent_offset) + self.key

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> IndexEntry:
        """Decode the entry at `offset`; ZdbError if it runs past the end of `buf`."""
        if offset + INDEX_ENTRY.size > len(buf):
            raise ZdbError(f"index entry at {offset} is truncated")
        kl, doff, ln, prev, fl, did, ts, crc, pid, poff = INDEX_ENTRY.unpack_from(buf, offset)
        start = offset + INDEX_ENTRY.size
        if start + kl > len(buf):
            raise ZdbError(f"index entry key at {offset} is truncated")
        return cls(bytes(buf[start:start + kl]), doff, ln, prev, fl, did, ts, crc, pid, poff)


@dataclass(frozen=True)
class DataEntry:
    """One data record: key, payload and its CRC (a tombstone has flags=deleted, no payload)."""

    key: bytes
    payload: bytes
    previous: int
    crc: int
    flags: int
    timestamp: int

    @property
    def size(self) -> int:
        return DATA_ENTRY.size + len(self.key) + len(self.payload)

    @property
    def deleted(self) -> bool:
        return bool(self.flags & FLAG_DELETED)

    def valid(self) -> bool:
        """The payload matches its stored CRC (tombstones carry crc 0 and no payload)."""
        if self.deleted and not self.payload:
            return self.crc == 0
        return crc32(self.payload) == self.crc

    def encode(self) -> bytes:
        return DATA_ENTRY.pack(len(self.key), len(self.payload), self.previous, self.crc,
                               self.flags, self.timestamp) + self.key + self.payload

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> DataEntry:
        """Decode the entry at `offset`; ZdbError if it runs past the end of `buf`."""
        if offset + DATA_ENTRY.size > len(buf):
            raise ZdbError(f"data entry at {offset} is truncated")
        kl, ln, prev, crc, fl, ts = DATA_ENTRY.unpack_from(buf, offset)
        start = offset + DATA_ENTRY.size
        if start + kl + ln > len(buf):
            raise ZdbError(f"data entry at {offset} is truncated")
        return cls(bytes(buf[start:start + kl]), bytes(buf[start + kl:start + kl + ln]),
                   prev, crc, fl, ts)


@dataclass(frozen=True)
class NamespaceDescriptor:
    """The persistent settings of a namespace (the `zdb-namespace` file)."""

    name: str
    password: str | None = None
    maxsize: int = 0
    public: bool = True
    worm: bool = False

    def encode(self) -> bytes:
        name = self.name.encode("utf-8", "surrogateescape")
        pwd = (self.password or "").encode("utf-8", "surrogateescape")
        flags = NS_EXTENDED | (NS_PUBLIC if self.public else 0) | (NS_WORM if self.worm else 0)
        return NS_DESCRIPTOR.pack(NS_VERSION, len(name), len(pwd), self.maxsize, flags) + name + pwd

    @classmethod
    def decode(cls, raw: bytes, where: str = "zdb-namespace") -> NamespaceDescriptor:
        if len(raw) < NS_DESCRIPTOR.size:
            raise ZdbError(f"{where}: namespace descriptor is truncated ({len(raw)} bytes)")
        version, nlen, plen, maxsize, flags = NS_DESCRIPTOR.unpack_from(raw, 0)
        if version != NS_VERSION:
            raise ZdbError(f"{where}: namespace descriptor version {version} is not supported")
        start = NS_DESCRIPTOR.size
        if len(raw) < start + nlen + plen:
            raise ZdbError(f"{where}: namespace descriptor is truncated ({len(raw)} bytes)")
        name = raw[start:start + nlen].decode("utf-8", "surrogateescape")
        pwd = raw[start + nlen:start + nlen + plen].decode("utf-8", "surrogateescape")
        return cls(name, pwd or None, maxsize, bool(flags & NS_PUBLIC), bool(flags & NS_WORM))
