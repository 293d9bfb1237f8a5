"""Engine settings: where files live, the server mode and the durability policy."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class Mode(enum.Enum):
    """Server mode (`--mode`); a namespace is always USER or SEQ, MIXED lets each choose."""

    USER = "user"
    SEQ = "seq"
    MIXED = "mixed"


@dataclass
class EngineConfig:
    """How and where the engine stores namespaces (the reference's --data/--index/... flags)."""

    data_dir: Path
    index_dir: Path
    mode: Mode = Mode.MIXED
    datasize: int = 256 * 1024 * 1024  # rotate files when the next write would pass it
    sync: bool = False                 # fsync data+index before each write returns
    # With sync: fsync at the next flush_all() instead, once for every write since the last
    # one. The server flushes before it sends any reply, so a write is still durable
    # before it is acknowledged, and a pipeline of writes shares one fsync.
    group_commit: bool = False
    synctime: int = 0                  # >0: fsync at most every N seconds (sync_if_due())
    maxsize: int = 0                   # default maxsize for new namespaces (0 = unlimited)
