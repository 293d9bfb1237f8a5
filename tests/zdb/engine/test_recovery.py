"""Opening files left by a crash: torn tails are cut, nothing torn is served, garbage is a
ZdbError and never a crash."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.zdb.engine.layout import read_layout
from zerostack.zdb.engine import Engine, EngineConfig, ZdbError


def config(root: Path) -> EngineConfig:
    return EngineConfig(data_dir=root / "data", index_dir=root / "index")


def write_keys(root: Path, n: int) -> list[tuple[bytes, bytes, int, int]]:
    """Write n keys one by one; returns (key, value, data size, index size) after each."""
    engine = Engine(config(root))
    ns = engine.namespace("default")
    rnd = random.Random(7)
    out = []
    for i in range(n):
        key, value = b"key-%d" % i, rnd.randbytes(rnd.randint(0, 200))
        ns.set(key, value)
        engine.flush_all()
        out.append((key, value, *_sizes(root)))
    engine.close()
    return out


def _sizes(root: Path) -> tuple[int, int]:
    return ((root / "data/default/d0").stat().st_size, (root / "index/default/i0").stat().st_size)


def test_every_crash_cut_opens_with_exactly_the_whole_entries(tmp_path: Path) -> None:
    master = tmp_path / "master"
    written = write_keys(master, 12)
    full_d, full_i = _sizes(master)
    rnd = random.Random(1)
    # A crash leaves a prefix of each file; the index never runs ahead of the data
    # (data is handed to the OS first), so cut data anywhere and the index anywhere below.
    cases = [(d, rnd.randint(29, full_i)) for d in range(28, full_d + 1, 37)]
    for dcut, icut in cases:
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(master, work)
        expect = [(k, v) for k, v, ds, is_ in written if ds <= dcut and is_ <= icut]
        with open(work / "data/default/d0", "r+b") as f:
            f.truncate(dcut)
        with open(work / "index/default/i0", "r+b") as f:
            f.truncate(min(icut, max([29] + [is_ for *_x, ds, is_ in written if ds <= dcut])))
        engine = Engine(config(work))
        ns = engine.namespace("default")
        for k, _v, *_ in written:
            assert ns.get(k) == dict(expect).get(k), (dcut, icut, k)
        assert ns.dbsize() == len(expect)
        ns.set(b"after", b"crash")
        engine.flush_all()
        engine.close()
        layout = read_layout(work / "index/default", work / "data/default")
        assert {k: v for k, (v, _t) in layout.live.items()} == {**dict(expect), b"after": b"crash"}


def test_unfinished_delete_is_finished_on_open(tmp_path: Path) -> None:
    engine = Engine(config(tmp_path))
    ns = engine.namespace("default")
    ns.set(b"a", b"1")
    ns.set(b"b", b"2")
    engine.flush_all()
    index_before = (tmp_path / "index/default/i0").read_bytes()
    ns.delete(b"a")
    engine.flush_all()
    engine.close()
    # crash after the tombstone reached the data file but before the index flag did
    (tmp_path / "index/default/i0").write_bytes(index_before)
    engine = Engine(config(tmp_path))
    assert engine.namespace("default").get(b"a") is None
    assert engine.namespace("default").get(b"b") == b"2"
    engine.close()
    assert read_layout(tmp_path / "index/default", tmp_path / "data/default").live.keys() == {b"b"}


def test_torn_payload_behind_a_whole_index_entry_is_cut(tmp_path: Path) -> None:
    engine = Engine(config(tmp_path))
    ns = engine.namespace("default")
    ns.set(b"a", b"first")
    ns.set(b"b", b"second value")
    engine.close()
    # power loss: the index entry survived, the end of the payload did not
    path = tmp_path / "data/default/d0"
    raw = bytearray(path.read_bytes())
    raw[-3:] = b"\0\0\0"
    path.write_bytes(bytes(raw))
    engine = Engine(config(tmp_path))
    ns = engine.namespace("default")
    assert ns.get(b"a") == b"first"
    assert ns.get(b"b") is None
    ns.set(b"b", b"again")
    engine.close()
    layout = read_layout(tmp_path / "index/default", tmp_path / "data/default")
    assert {k: v for k, (v, _t) in layout.live.items()} == {b"a": b"first", b"b": b"again"}


names = st.sampled_from(["zdb-namespace", "i0", "d0", "i1", "d1"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(names, st.integers(0, 400), st.binary(max_size=120)), max_size=6),
       st.booleans())
def test_garbage_files_fail_with_zdb_error_only(edits: list[tuple[str, int, bytes]],
                                                truncate: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engine = Engine(config(root))
        ns = engine.namespace("default")
        for i in range(8):
            ns.set(b"k%d" % i, b"v" * i * 10)
        ns.delete(b"k3")
        ns.jump()
        ns.set(b"k1", b"other")
        engine.close()
        for name, offset, junk in edits:
            folder = root / ("data" if name.startswith("d") else "index") / "default"
            path = folder / name
            raw = bytearray(path.read_bytes()) if path.exists() else bytearray()
            raw[offset:offset + len(junk)] = junk
            if truncate:
                raw = raw[:offset + len(junk)]
            path.write_bytes(bytes(raw))
        try:
            engine = Engine(config(root))
        except ZdbError:
            return
        try:
            ns = engine.namespace("default")
            cursor = None
            while True:
                try:
                    cursor, items = ns.scan(cursor, count=4)
                    for key, _length, _ts in items:
                        ns.get(key)
                        ns.check(key)
                        ns.history(key)
                except ZdbError:
                    break
            ns.set(b"new", b"value")
            assert ns.get(b"new") == b"value"
        except ZdbError:
            pass
        finally:
            engine.close()


def test_lost_index_is_refused_not_cut(tmp_path: Path) -> None:
    from zerostack.zdb.engine.check import check_files

    cfg = EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index", datasize=4096)
    engine = Engine(cfg)
    ns = engine.namespace("default")
    for i in range(200):
        ns.set(b"k%d" % i, b"v" * 50)
    engine.close()
    last = max(int(p.name[1:]) for p in (tmp_path / "index/default").glob("i*"))
    data = (tmp_path / "data/default" / f"d{last}").read_bytes()
    (tmp_path / "index/default" / f"i{last}").unlink()
    try:
        Engine(cfg)
    except ZdbError as exc:
        assert "check --repair" in str(exc)
    else:
        raise AssertionError("a lost index file must stop the namespace from loading")
    assert (tmp_path / "data/default" / f"d{last}").read_bytes() == data, "nothing was cut"
    assert check_files(tmp_path / "index", tmp_path / "data", repair=True).ok
    engine = Engine(cfg)
    assert all(engine.namespace("default").get(b"k%d" % i) == b"v" * 50 for i in range(200))
    engine.close()


def test_missing_or_replaced_data_is_refused(tmp_path: Path) -> None:
    cfg = EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index")
    engine = Engine(cfg)
    ns = engine.namespace("default")
    for i in range(300):
        ns.set(b"k%d" % i, b"v" * 30)
    engine.close()
    index = (tmp_path / "index/default/i0").read_bytes()
    data = tmp_path / "data/default/d0"
    saved = data.read_bytes()
    data.unlink()
    try:
        Engine(cfg)
    except ZdbError as exc:
        assert "data file d0 is missing" in str(exc)
    else:
        raise AssertionError("an index without its data must not load")
    data.write_bytes(saved[:28])  # an empty data file: far more missing than a crash leaves
    try:
        Engine(cfg)
    except ZdbError as exc:
        assert "check --repair" in str(exc)
    else:
        raise AssertionError("an index far ahead of its data must not load")
    assert len((tmp_path / "index/default/i0").read_bytes()) >= len(index) - 64 * 40
