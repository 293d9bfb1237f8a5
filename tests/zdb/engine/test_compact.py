"""Compaction keeps live values and history, reclaims space, and survives a crash at every
step of the swap."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.zdb.engine.layout import read_layout
from zerostack.zdb.engine import Engine, EngineConfig, Mode, Namespace, ZdbError
from zerostack.zdb.engine.compact import compact_namespace

NAME = "store"


def config(root: Path) -> EngineConfig:
    return EngineConfig(data_dir=root / "data", index_dir=root / "index", datasize=4096)


def populate(root: Path) -> None:
    engine = Engine(config(root))
    ns = engine.create_namespace(NAME)
    rnd = random.Random(3)
    for i in range(300):
        key = b"k%02d" % rnd.randrange(40)
        if rnd.random() < 0.2 and ns.exists(key):
            ns.delete(key)
        else:
            ns.set(key, rnd.randbytes(rnd.randint(1, 120)), 1_700_000_000 + i)
    ns.set_property("password", "pw")
    ns.set_property("maxsize", "1000000")
    engine.close()


def snapshot(root: Path) -> dict[bytes, tuple[bytes, int, list[bytes]]]:
    engine = Engine(config(root))
    try:
        ns = engine.namespace(NAME)
        out = {}
        cursor = None
        while True:
            try:
                cursor, items = ns.scan(cursor, count=50)
            except ZdbError:
                break
            for key, _l, ts in items:
                out[key] = (ns.get(key) or b"", ts, history(ns, key))
        return out
    finally:
        engine.close()


def history(ns: Namespace, key: bytes) -> list[bytes]:
    out = []
    found = ns.history(key)
    while found is not None:
        out.append(found[2])
        found = ns.history(key, found[0]) if found[0] is not None else None
    return out


def test_compaction_keeps_live_values_and_history(tmp_path: Path) -> None:
    populate(tmp_path)
    before = snapshot(tmp_path)
    report = compact_namespace(tmp_path / "index", tmp_path / "data", NAME, datasize=4096)
    assert report.keys == len(before)
    assert report.reclaimed_bytes > 0
    assert snapshot(tmp_path) == before
    layout = read_layout(tmp_path / "index" / NAME, tmp_path / "data" / NAME)
    assert layout.password == "pw" and layout.maxsize == 1_000_000
    # only live versions are left: no tombstones, no deleted keys
    assert layout.index_entries == sum(len(h) for _v, _t, h in before.values())


def test_keep_history_limits_older_versions(tmp_path: Path) -> None:
    populate(tmp_path)
    before = snapshot(tmp_path)
    report = compact_namespace(tmp_path / "index", tmp_path / "data", NAME, keep_history=1)
    after = snapshot(tmp_path)
    assert {k: (v, t, h[:2]) for k, (v, t, h) in before.items()} == after
    assert report.versions == sum(min(2, len(h)) for _v, _t, h in before.values())
    report = compact_namespace(tmp_path / "index", tmp_path / "data", NAME, keep_history=0)
    assert {k: v for k, (v, _t, _h) in snapshot(tmp_path).items()} == \
        {k: v for k, (v, _t, _h) in before.items()}
    assert report.reclaimed_bytes > 0


def test_sequential_namespaces_are_refused(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 mode=Mode.SEQ))
    engine.namespace("default").set(b"", b"x")
    engine.close()
    try:
        compact_namespace(tmp_path / "index", tmp_path / "data", "default")
    except ZdbError as exc:
        assert "sequential" in str(exc)
    else:
        raise AssertionError("sequential compaction must be refused")


def test_a_crash_at_any_step_leaves_all_data(tmp_path: Path) -> None:
    master = tmp_path / "master"
    populate(master)
    before = snapshot(master)
    # count the steps of a full run first
    probe = tmp_path / "probe"
    shutil.copytree(master, probe)
    out = subprocess.run([sys.executable, "-m", "tests.zdb.engine.compact_runner", str(probe), "0"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode().splitlines()
    steps = len(out) - 1
    assert steps >= 5 and out[-1].startswith("done")
    for crash_at in range(1, steps + 1):
        work = tmp_path / f"crash{crash_at}"
        shutil.copytree(master, work)
        proc = subprocess.run([sys.executable, "-m", "tests.zdb.engine.compact_runner", str(work),
                               str(crash_at)], cwd=REPO, capture_output=True)
        assert proc.returncode == 9, proc.stderr.decode()
        assert snapshot(work) == before, f"crash after step {crash_at}"
        assert not (work / "index" / NAME / "compact").exists()
        assert not (work / "data" / NAME / "retired").exists()
        shutil.rmtree(work)


def test_compacting_reference_files_keeps_what_expected_json_says(tmp_path: Path,
                                                                  shared_dir: Path) -> None:
    import base64
    import json

    src = shared_dir / "fixtures/zdb-reference-2.0.7"
    shutil.copytree(src / "data", tmp_path / "data")
    shutil.copytree(src / "index", tmp_path / "index")
    for p in tmp_path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    spec = json.loads((src / "expected.json").read_text())["namespaces"]["default"]
    report = compact_namespace(tmp_path / "index", tmp_path / "data", "default",
                               datasize=1024 * 1024)
    assert report.reclaimed_bytes > 0
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 datasize=1024 * 1024))
    ns = engine.namespace("default")
    b64 = base64.b64decode
    assert ns.dbsize() == len(spec["live"])
    for k, v in spec["live"].items():
        assert ns.get(b64(k)) == b64(v)
        assert ns.keytime(b64(k)) == spec["keytime"][k]
    for k, versions in spec["history"].items():
        assert history(ns, b64(k)) == [b64(x) for x in versions]
    engine.close()
