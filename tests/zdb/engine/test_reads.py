"""Reads come from maps: however the data is laid out, a GET makes no system call once the
files it touches are mapped (the read path's cost does not grow with the number of files)."""

from __future__ import annotations

import random
from pathlib import Path

from zerostack.zdb.engine import Engine, EngineConfig


def read_syscalls() -> int:
    """Read-type system calls (read, pread, ...) this process made so far (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/self/io")


def test_gets_of_the_newest_and_oldest_files_make_no_system_call(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 datasize=64 * 1024))
    ns = engine.namespace("default")
    rnd = random.Random(3)
    values = {b"k%05d" % i: rnd.randbytes(rnd.randint(100, 4000)) for i in range(400)}
    for key, value in values.items():
        ns.set(key, value)
    engine.flush_all()
    # The newest entries sit past the maps made so far, by less than a remap's worth of
    # writes: reads of them must not stay on pread for good.
    keys = list(values)
    newest = keys[-10:]
    for key in newest * 10:  # warm-up: map what needs mapping
        assert ns.get(key) == values[key]
    for key in keys:
        assert ns.get(key) == values[key]
    before = read_syscalls()
    for _ in range(5):
        for key in keys:
            assert ns.get(key) == values[key]
    made = read_syscalls() - before
    assert made < 20, f"{made} read system calls for {5 * len(keys)} GETs"
    assert len(list((tmp_path / "data" / "default").glob("d*"))) > 10
    engine.close()


def test_get_many_answers_as_get_does_and_stops_past_its_budget(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 datasize=64 * 1024))
    ns = engine.namespace("default")
    rnd = random.Random(4)
    values = {b"k%05d" % i: rnd.randbytes(rnd.randint(1, 3000)) for i in range(300)}
    for key, value in values.items():
        ns.set(key, value)
    engine.flush_all()
    for key in list(values)[::7]:  # overwritten: some entries now in the buffered tail
        values[key] = rnd.randbytes(50)
        ns.set(key, values[key])
    ns.delete(b"k00003")
    del values[b"k00003"]
    keys = [b"k%05d" % rnd.randrange(320) for _ in range(200)]  # some never stored
    assert ns.get_many(keys, 1 << 30) == [ns.get(k) for k in keys]
    assert ns.get_many(keys, 1 << 30) == [values.get(k) for k in keys]
    assert len(list((tmp_path / "data" / "default").glob("d*"))) > 5
    # A budget: values up to the one that passes it, then nothing more.
    stored = [k for k in keys if k in values]
    got = ns.get_many(stored, 4000)
    assert got == [values[k] for k in stored[:len(got)]]
    assert sum(map(len, got[:-1])) <= 4000 < sum(map(len, got))  # type: ignore[arg-type]
    engine.close()
