"""Large values go to the OS in one pwritev behind the buffered tail, without a copy into
the buffer: the files must come out exactly as if they had been buffered."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from zerostack.zdb.engine import Engine, EngineConfig
from zerostack.zdb.engine.check import check_files
from zerostack.zdb.engine.writes import DIRECT_WRITE


def engine_at(root: Path, datasize: int = 256 * 1024 * 1024) -> Engine:
    return Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index",
                               datasize=datasize))


def test_large_and_small_values_interleaved_read_back_before_and_after_reopen(
        tmp_path: Path) -> None:
    rnd = random.Random(5)
    engine = engine_at(tmp_path, datasize=2 * 1024 * 1024)
    ns = engine.namespace("default")
    values: dict[bytes, bytes] = {}
    for i in range(40):
        size = DIRECT_WRITE + rnd.randint(0, 600_000) if i % 3 == 0 else rnd.randint(1, 5000)
        key = b"k%03d" % (i % 30)  # some keys overwritten, by large and small values
        values[key] = rnd.randbytes(size)
        ns.set(key, values[key])
        # read back at once: the large value is on disk, the small ones still buffered
        assert ns.get(key) == values[key]
    engine.flush_all()
    for key, value in values.items():
        assert ns.get(key) == value
    assert len(list((tmp_path / "data" / "default").glob("d*"))) > 2  # rotations happened
    engine.close()
    engine = engine_at(tmp_path, datasize=2 * 1024 * 1024)
    ns = engine.namespace("default")
    for key, value in values.items():
        assert ns.get(key) == value
    engine.close()
    report = check_files(tmp_path / "index", tmp_path / "data", "default")
    assert report.ok and not report.findings, report.findings
    assert report.data_entries == 40


def test_a_failed_large_write_keeps_what_the_os_did_not_take_buffered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_at(tmp_path)
    ns = engine.namespace("default")
    ns.set(b"small", b"s" * 100)  # buffered, not yet handed to the OS
    real = os.pwritev
    calls = {"n": 0}

    def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # the OS takes part of it, then the disk fails
            first = bytes(buffers[0]) + bytes(buffers[1][:1000])
            return real(fd, [first], offset)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwritev", flaky)
    big = b"B" * (DIRECT_WRITE + 12345)
    with pytest.raises(OSError):
        ns.set(b"big", big)
    monkeypatch.setattr(os, "pwritev", real)
    assert calls["n"] == 2
    # The rest of the entry waits in the tail: once written, the data file is framed whole
    # (the big entry is data without an index entry, like one cut off by a crash).
    ns.set(b"after", b"a" * 10)
    engine.flush_all()
    assert ns.get(b"small") == b"s" * 100
    assert ns.get(b"after") == b"a" * 10
    assert ns.get(b"big") is None
    engine.close()
    engine = engine_at(tmp_path)
    ns = engine.namespace("default")
    assert ns.get(b"after") == b"a" * 10 and ns.get(b"big") is None
    engine.close()
    report = check_files(tmp_path / "index", tmp_path / "data", "default")
    assert report.ok, report.findings


def test_data_files_are_preallocated_ahead_and_given_back_on_close(tmp_path: Path) -> None:
    mib = 1024 * 1024
    engine = engine_at(tmp_path)
    ns = engine.namespace("default")
    data = tmp_path / "data" / "default" / "d0"
    ahead = []
    for i in range(10):
        ns.set(b"k%d" % i, bytes([i]) * mib)
        engine.flush_all()
        st = data.stat()
        # The size is where the entries end; the blocks reserved past it stay under the
        # size of the file (a small file reserves little).
        assert i * mib < st.st_size < (i + 1) * mib + 4096
        ahead.append(st.st_blocks * 512 - st.st_size)
        assert ahead[-1] <= st.st_size + 64 * 1024
    assert max(ahead) >= 2 * mib  # reserved ahead of the appends
    engine.close()
    st = data.stat()
    assert st.st_blocks * 512 < st.st_size + 64 * 1024  # given back on close
    engine = engine_at(tmp_path)
    ns = engine.namespace("default")
    for i in range(10):
        assert ns.get(b"k%d" % i) == bytes([i]) * mib
    engine.close()
    report = check_files(tmp_path / "index", tmp_path / "data", "default")
    assert report.ok and not report.findings, report.findings


def test_preallocation_stays_within_the_datasize(tmp_path: Path) -> None:
    engine = engine_at(tmp_path, datasize=3 * 1024 * 1024)
    ns = engine.namespace("default")
    for i in range(12):
        ns.set(b"k%d" % i, bytes([i]) * (700 * 1024))
        engine.flush_all()
        for path in (tmp_path / "data" / "default").glob("d*"):
            assert path.stat().st_blocks * 512 <= 4 * 1024 * 1024, path
    engine.close()
    for path in (tmp_path / "data" / "default").glob("d*"):
        st = path.stat()
        assert st.st_blocks * 512 < st.st_size + 64 * 1024


def test_closing_when_the_reserve_cannot_be_given_back_keeps_the_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_at(tmp_path)
    ns = engine.namespace("default")
    for i in range(4):
        ns.set(b"k%d" % i, bytes([i]) * (1024 * 1024))
    engine.flush_all()

    def refuse(fd: int, size: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", refuse)
    engine.close()  # the reserve stays, nothing else changes
    monkeypatch.undo()
    engine = engine_at(tmp_path)
    ns = engine.namespace("default")
    for i in range(4):
        assert ns.get(b"k%d" % i) == bytes([i]) * (1024 * 1024)
    engine.close()
    report = check_files(tmp_path / "index", tmp_path / "data", "default")
    assert report.ok and not report.findings, report.findings
