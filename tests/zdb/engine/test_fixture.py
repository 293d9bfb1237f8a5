"""The engine reads a data set written by the reference 0-db 2.0.7 exactly as it holds."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from zerostack.zdb.engine import Engine, EngineConfig, Mode, Namespace, ZdbError

FIXTURE = "fixtures/zdb-reference-2.0.7"


def b64(text: str) -> bytes:
    return base64.b64decode(text)


@pytest.fixture
def reference(shared_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    src = shared_dir / FIXTURE
    dst = tmp_path / "zdb"
    shutil.copytree(src / "data", dst / "data")
    shutil.copytree(src / "index", dst / "index")
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst, json.loads((src / "expected.json").read_text())


def open_engine(root: Path) -> Engine:
    return Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index",
                               datasize=1024 * 1024))


def history_of(ns: Namespace, key: bytes) -> list[bytes]:
    seen = []
    found = ns.history(key)
    while found is not None:
        older, _ts, value = found
        seen.append(value)
        found = ns.history(key, older) if older is not None else None
    return seen


def test_reference_files_serve_what_expected_json_says(reference: tuple[Path, dict[str, Any]]) -> None:
    root, spec = reference
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    engine = open_engine(root)
    try:
        assert set(engine.namespaces) == set(spec["namespaces"])
        for name, want in spec["namespaces"].items():
            ns = engine.namespace(name)
            assert ns.mode is (Mode.SEQ if want["mode"] == "seq" else Mode.USER)
            assert ns.password == want["password"]
            assert ns.public is want["public"]
            assert ns.worm is want.get("worm", False)
            assert ns.maxsize == want.get("maxsize", 0)
            assert ns.dbsize() == len(want["live"])
            for k, v in want["live"].items():
                assert ns.get(b64(k)) == b64(v), (name, k)
                assert ns.check(b64(k)) is True
                assert ns.length(b64(k)) == len(b64(v))
            for k in want.get("deleted", []):
                assert not ns.exists(b64(k))
                assert ns.get(b64(k)) is None
            for k, t in want.get("keytime", {}).items():
                assert ns.keytime(b64(k)) == t
            for k, versions in want.get("history", {}).items():
                assert history_of(ns, b64(k)) == [b64(x) for x in versions], (name, k)
            scanned = []
            cursor = None
            while True:
                try:
                    cursor, items = ns.scan(cursor, count=7)
                except ZdbError:
                    break
                scanned += [k for k, _l, _t in items]
            assert sorted(scanned) == sorted(b64(k) for k in want["live"])
    finally:
        engine.close()
    # opening a clean data set changes nothing on disk
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_reference_files_accept_new_writes(reference: tuple[Path, dict[str, Any]]) -> None:
    root, spec = reference
    engine = open_engine(root)
    ns = engine.namespace("default")
    k = b64(next(iter(spec["namespaces"]["default"]["history"])))
    old = history_of(ns, k)
    ns.set(k, b"fresh value")
    log = engine.namespace("log")
    newkey = log.set(b"", b"appended")
    engine.flush_all()
    engine.close()
    engine = open_engine(root)
    try:
        assert history_of(engine.namespace("default"), k) == [b"fresh value", *old]
        assert engine.namespace("log").get(newkey) == b"appended"
        # 40 slots, one deleted copy from the reference's update: the next key is 41
        assert newkey == (41).to_bytes(8, "little")
    finally:
        engine.close()
