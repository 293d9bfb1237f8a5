"""Engine side of log shipping: shipping raw entries in chunks gives identical files, and
cutting a namespace back to a position gives the files it had when its log ended there."""

from __future__ import annotations

import shutil
from pathlib import Path

from zerostack.zdb.engine import Engine, EngineConfig
from zerostack.zdb.engine.raw import (
    START,
    Position,
    apply_entries,
    entry_head,
    last_entries,
    read_entries,
    truncate_to,
)


def config(root: Path) -> EngineConfig:
    return EngineConfig(data_dir=root / "data", index_dir=root / "index", datasize=4096)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def ship(src: Engine, dst: Engine, name: str, pos: Position, limit: int) -> Position:
    p, r = src.namespace(name), dst.namespace(name)
    while pos < p.position():
        chunk = read_entries(p, pos, limit)
        if not chunk:
            pos = (pos[0] + 1, START[1])
            continue
        pos = apply_entries(r, pos, chunk)
    while r.position()[0] < p.position()[0]:
        r.jump()
    return pos


def write_some(ns_engine: Engine, name: str, start: int, count: int) -> None:
    ns = ns_engine.namespace(name)
    for i in range(start, start + count):
        ns.set(b"key-%d" % (i % 37), b"value-%d" % i * (i % 7 + 1), 1000 + i)
        if i % 11 == 0 and ns.exists(b"key-%d" % (i % 5)):
            ns.delete(b"key-%d" % (i % 5), 1000 + i)
        if i % 97 == 0:
            ns.jump()


def test_chunked_shipping_gives_identical_files(tmp_path: Path) -> None:
    primary, replica = Engine(config(tmp_path / "p")), Engine(config(tmp_path / "r"))
    try:
        primary.create_namespace("ns")
        replica.create_namespace("ns")
        pos = START
        for round_ in range(4):
            write_some(primary, "ns", round_ * 150, 150)
            pos = ship(primary, replica, "ns", pos, limit=300 + round_ * 1000)
        primary.flush_all()
        replica.flush_all()
        assert tree(tmp_path / "p") == tree(tmp_path / "r")
        head = last_entries(primary.namespace("ns"), 3)
        assert len(head) == 3 and head[0][2] == primary.namespace("ns").position()
        (fid, off), raw, _end = head[0]
        assert entry_head(primary.namespace("ns"), fid, off) == raw
        assert entry_head(primary.namespace("ns"), fid + 5, off) is None
    finally:
        primary.close()
        replica.close()


def test_truncate_to_gives_the_files_of_that_moment(tmp_path: Path) -> None:
    engine = Engine(config(tmp_path / "a"))
    try:
        engine.create_namespace("ns")
        engine.namespace("ns").set_property("maxsize", "1000000")
        write_some(engine, "ns", 0, 250)
        cut = engine.namespace("ns").position()
        engine.close()
        shutil.copytree(tmp_path / "a", tmp_path / "snapshot")
        engine = Engine(config(tmp_path / "a"))
        write_some(engine, "ns", 250, 200)  # overwrites flag older entries in place
        dropped = truncate_to(engine, "ns", cut)
        assert dropped > 0
        assert engine.namespace("ns").position() == cut
        assert engine.namespace("ns").maxsize == 1000000
        engine.close()
        assert tree(tmp_path / "a") == tree(tmp_path / "snapshot")
        engine = Engine(config(tmp_path / "a"))  # and it opens cleanly
    finally:
        engine.close()
