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


def _slot_of(ns: object, key: bytes) -> tuple[int, int, int, int]:
    """(byte offset, tag, value length, location) of `key`'s slot in the location cache."""
    from zerostack.zdb.engine.reads import LC_HASH, LC_SLOT, LC_TAG_SHIFT

    h = hash(key) & LC_HASH
    at = (h & ns._lc_mask) * LC_SLOT.size  # type: ignore[attr-defined]
    tag, ln, loc = LC_SLOT.unpack_from(ns._lc, at)  # type: ignore[attr-defined]
    assert tag == 0 or loc != 0
    return at, h >> LC_TAG_SHIFT, ln, loc


def test_the_location_cache_follows_every_write_and_reload(tmp_path: Path) -> None:
    """GETs answered from the location cache see each overwrite, delete, NSJUMP, FLUSH,
    compaction and reload at once, in older files and in the newest one."""
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 datasize=16 * 1024))
    ns = engine.namespace("default")
    rnd = random.Random(5)
    values = {b"k%04d" % i: rnd.randbytes(rnd.randint(1, 600)) for i in range(400)}
    for key, value in values.items():
        ns.set(key, value)
    engine.flush_all()
    for _ in range(3):  # the first GETs fill the cache, later ones are answered from it
        for key in values:
            assert ns.get(key) == values[key]
            assert ns.get_many([key, b"missing"], 1 << 20) == [values[key], None]
    cached = [key for key in values if _slot_of(ns, key)[3]]
    assert len(cached) > len(values) // 2, "the location cache is not used"
    for round_ in range(4):
        for key in rnd.sample(sorted(values), 60):
            if rnd.random() < 0.3:
                ns.delete(key)
                del values[key]
            else:
                values[key] = rnd.randbytes(rnd.randint(1, 600))
                ns.set(key, values[key])
        for key in rnd.sample(sorted(values), 20):
            values[b"new%d-" % round_ + key] = rnd.randbytes(40)
            ns.set(b"new%d-" % round_ + key, values[b"new%d-" % round_ + key])
        if round_ == 1:
            ns.jump()
        elif round_ == 2:
            engine.compact_namespace("default")
            ns = engine.namespace("default")
        elif round_ == 3:
            engine.close()
            engine = Engine(EngineConfig(data_dir=tmp_path / "data",
                                         index_dir=tmp_path / "index", datasize=16 * 1024))
            ns = engine.namespace("default")
        engine.flush_all()
        for _ in range(2):
            for key in [b"k%04d" % i for i in range(400)] + list(values):
                assert ns.get(key) == values.get(key)
            keys = list(values)
            assert ns.get_many(keys, 1 << 30) == [values[k] for k in keys]
    ns.flush()
    for key in values:
        assert ns.get(key) is None
    engine.close()


def test_a_cached_location_of_another_key_is_not_answered(tmp_path: Path) -> None:
    """A slot whose tag matches but whose data entry holds another key (two keys whose
    hashes share the slot and the tag) sends the GET through the key dict."""
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 datasize=4096))
    ns = engine.namespace("default")
    for i in range(100):
        ns.set(b"key-%03d" % i, b"value-%03d" % i)
    engine.flush_all()
    ns.jump()
    for _ in range(2):  # the first maps the files, the second fills the cache
        assert ns.get(b"key-001") == b"value-001"
    _at, _tag, ln, loc = _slot_of(ns, b"key-001")
    assert loc, "a GET of an older file did not fill the cache"
    from zerostack.zdb.engine.reads import LC_SLOT

    for other in (b"key-002", b"key-0020", b"absent"):
        at, tag, _ln, _loc = _slot_of(ns, other)
        LC_SLOT.pack_into(ns._lc, at, tag, ln, loc)  # key-001's entry, under other's tag
        expected = b"value-002" if other == b"key-002" else None
        assert ns.get(other) == expected
        at, tag, _ln, _loc = _slot_of(ns, other)
        LC_SLOT.pack_into(ns._lc, at, tag, ln, loc)
        assert ns.get_many([other, b"key-001"], 1 << 20) == [expected, b"value-001"]
    engine.close()


def test_a_set_leaves_its_new_location_in_the_cache(tmp_path: Path) -> None:
    """SET writes the slot of its key (whichever key the slot held): the GETs after it
    read the new value without the key dict once its entry is mapped, and never the old."""
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index"))
    ns = engine.namespace("default")
    values = {b"k%04d" % i: b"first-%04d" % i * 20 for i in range(400)}
    for key, value in values.items():
        ns.set(key, value)
    engine.flush_all()
    assert ns.get_many(list(values), 1 << 30) == list(values.values())  # makes the cache
    for i, key in enumerate(list(values)[::3]):
        values[key] = b"second-%04d" % i * (i % 7 + 1)
        ns.set(key, values[key])
        _at, tag, ln, loc = _slot_of(ns, key)
        assert tag and ln == len(values[key])
        assert loc >> 32 == 0 and loc & 0xFFFFFFFF > 0  # the newest data file, at its entry
    engine.flush_all()
    # Not mapped yet: through the key dict, the slot left as it is.
    for key in list(values)[::3]:
        assert ns.get(key) == values[key]
    # Mapped again (enough bytes written past the map): answered from the slot.
    for i in range(400):
        values[b"fill%04d" % i] = b"x" * 1000
        ns.set(b"fill%04d" % i, values[b"fill%04d" % i])
    engine.flush_all()
    ns.get(b"fill0399")
    assert ns._data.mapped == ns._data.disk_size  # type: ignore[attr-defined]
    for key, value in values.items():
        assert ns.get(key) == value
    keys = list(values)
    assert ns.get_many(keys, 1 << 30) == [values[k] for k in keys]
    engine.close()


def test_a_batch_that_maps_the_newest_file_again_reads_the_new_map(tmp_path: Path) -> None:
    """One GET of a batch reads past the map of the newest data file, which maps it again
    (the old map is closed); the GETs after it in the same batch read the new map."""
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index"))
    ns = engine.namespace("default")
    old = {b"old%04d" % i: b"o%04d" % i * 200 for i in range(300)}
    for key, value in old.items():
        ns.set(key, value)
    engine.flush_all()
    assert ns.get_many(list(old), 1 << 30) == list(old.values())
    assert ns.get_many(list(old), 1 << 30) == list(old.values())  # from the cache now
    new = {b"new%04d" % i: b"n%04d" % i * 200 for i in range(300)}
    for key, value in new.items():
        ns.set(key, value)
    engine.flush_all()
    first_map = ns._data.map  # type: ignore[attr-defined]
    keys = [b"old0001", b"new0007", b"old0002", b"old0003", b"new0100", b"old0299"]
    both = {**old, **new}
    assert ns.get_many(keys, 1 << 30) == [both[k] for k in keys]
    assert ns._data.map is not first_map  # type: ignore[attr-defined]
    engine.close()
