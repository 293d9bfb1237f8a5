"""Log shipping foundation: replaying a primary's data entries (DATA RAW) in order yields
byte-identical files, and a running engine can compact a namespace in place."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerostack.zdb.engine import Engine, EngineConfig, Namespace, ZdbError

DATA_HEADER = 28


def config(root: Path) -> EngineConfig:
    return EngineConfig(data_dir=root / "data", index_dir=root / "index", datasize=2048)


def ship(primary: Namespace, replica: Namespace, pos: tuple[int, int]) -> tuple[int, int]:
    """Copy every entry after `pos` from primary to replica; returns the new position."""
    fid, off = pos
    while True:
        try:
            key, _prev, _crc, flags, ts, payload = primary.data_raw(fid, off)
        except ZdbError as exc:
            assert str(exc) == "EOF"
            if fid >= primary.position()[0]:
                return fid, off
            fid, off = fid + 1, DATA_HEADER
            while replica.position()[0] < fid:
                replica.jump()
            continue
        replica.replay_raw(key, flags, ts, payload)
        off += 18 + len(key) + len(payload)


def files(root: Path, name: str) -> dict[str, bytes]:
    return {f"{kind}/{p.name}": p.read_bytes()
            for kind in ("index", "data") for p in sorted((root / kind / name).glob("[id]*"))}


ops = st.lists(st.tuples(st.sampled_from(["set", "del", "jump", "ship"]), st.integers(0, 15),
                         st.binary(max_size=200)), max_size=80)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans())
def test_replayed_entries_give_identical_files(tmp_path_factory: pytest.TempPathFactory,
                                               script: list[tuple[str, int, bytes]],
                                               sequential: bool) -> None:
    root = tmp_path_factory.mktemp("replay")
    primary_engine = Engine(config(root / "primary"))
    replica_engine = Engine(config(root / "replica"))
    p = primary_engine.create_namespace("ns")
    r = replica_engine.create_namespace("ns")
    if sequential:
        p.set_property("mode", "seq")
        r.set_property("mode", "seq")
    keys: list[bytes] = []
    pos = (0, DATA_HEADER)
    for i, (op, n, value) in enumerate(script):
        if op == "set":
            if sequential and (n % 2 or not keys):
                keys.append(p.set(b"", value, 1000 + i) or b"")
            else:
                key = keys[n % len(keys)] if sequential else b"key-%d" % n
                if not sequential or p.exists(key):
                    p.set(key, value, 1000 + i)
        elif op == "del":
            key = keys[n % len(keys)] if sequential and keys else b"key-%d" % n
            if p.exists(key):
                p.delete(key, 1000 + i)
        elif op == "jump":
            p.jump()
        else:
            pos = ship(p, r, pos)
    ship(p, r, pos)
    primary_engine.close()
    replica_engine.close()
    assert files(root / "replica", "ns") == files(root / "primary", "ns")


def test_online_compaction_keeps_serving(tmp_path: Path) -> None:
    engine = Engine(config(tmp_path))
    ns = engine.create_namespace("store")
    rnd = random.Random(9)
    live: dict[bytes, bytes] = {}
    for _ in range(400):
        key = b"k%d" % rnd.randrange(50)
        if rnd.random() < 0.25 and key in live:
            ns.delete(key)
            del live[key]
        else:
            live[key] = rnd.randbytes(rnd.randint(1, 80))
            ns.set(key, live[key])
    report = engine.compact_namespace("store", keep_history=0)
    assert report.reclaimed_bytes > 0 and report.keys == len(live)
    assert engine.namespace("store") is ns
    assert {k: ns.get(k) for k in live} == live
    ns.set(b"after", b"compaction")
    engine.close()
    engine = Engine(config(tmp_path))
    ns = engine.namespace("store")
    assert {k: ns.get(k) for k in live} == live
    assert ns.get(b"after") == b"compaction"
    engine.close()
