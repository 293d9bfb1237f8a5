"""Namespace settings and refusals carry the reference 0-db's error texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from zerostack.zdb.engine import Engine, EngineConfig, Mode, ZdbError
from zerostack.zdb.engine.format import NamespaceDescriptor


def refused(text: str) -> pytest.RaisesContext[ZdbError]:
    return pytest.raises(ZdbError, match=f"^{text.replace('(', '[(]').replace(')', '[)]')}$")


def test_namespace_names_and_lifecycle(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index"))
    for bad in (".", "..", "a/b"):
        with refused("This name is not allowed"):
            engine.create_namespace(bad)
    with refused("Namespace too long"):
        engine.create_namespace("x" * 129)
    with refused("This namespace is not available"):
        engine.create_namespace("default")
    engine.create_namespace("x" * 128)
    with refused("Cannot remove default namespace"):
        engine.delete_namespace("default")
    with refused("This namespace doesn't exists"):
        engine.delete_namespace("nope")
    with refused("Namespace not found"):
        engine.namespace("nope")
    engine.delete_namespace("x" * 128)
    assert not (tmp_path / "index" / ("x" * 128)).exists()
    engine.close()


def test_settings_persist_and_refuse(tmp_path: Path) -> None:
    cfg = EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index")
    engine = Engine(cfg)
    ns = engine.create_namespace("ns")
    with refused("Cannot update default namespace"):
        engine.namespace("default").set_property("public", "0")
    with refused("Invalid property"):
        ns.set_property("color", "blue")
    with refused("Invalid value"):
        ns.set_property("password", "p" * 64)
    ns.set_property("password", "s3cret")
    ns.set_property("public", "0")
    ns.set_property("maxsize", "100")
    ns.set(b"a", b"x" * 60)
    with refused("No space left on this namespace"):
        ns.set(b"b", b"x" * 41)
    ns.set(b"a", b"y" * 100)  # replacing a value may use the space it frees
    ns.set_property("maxsize", "1000")
    ns.set_property("lock", "1")
    with refused("Namespace is temporarily locked (read-only)"):
        ns.set(b"c", b"1")
    assert ns.get(b"a") == b"y" * 100
    ns.set_property("lock", "0")
    ns.set_property("freeze", "1")
    with refused("Namespace is temporarily frozen (read-write disabled)"):
        ns.get(b"a")
    ns.set_property("freeze", "0")
    ns.set_property("worm", "1")
    with refused("Namespace is protected by worm mode"):
        ns.set(b"a", b"z")
    with refused("Cannot delete a key when namespace is in worm mode"):
        ns.delete(b"a")
    ns.set(b"new", b"insert is fine")
    with refused("Cannot change mode of used namespace"):
        ns.set_property("mode", "seq")
    fresh = engine.create_namespace("fresh")
    with refused("Invalid property value (expected: user, seq)"):
        fresh.set_property("mode", "other")
    fresh.set_property("mode", "seq")
    assert fresh.mode is Mode.SEQ
    with refused("Invalid key, only update authorized"):
        fresh.set(b"\x05" + bytes(7), b"v")
    info = ns.info()
    assert (info["password"], info["public"], info["worm"], info["data_limits_bytes"]) == \
        ("yes", "no", "yes", 1000)
    engine.close()
    desc = NamespaceDescriptor.decode((tmp_path / "index/ns/zdb-namespace").read_bytes())
    assert desc == NamespaceDescriptor("ns", "s3cret", 1000, False, True)
    engine = Engine(cfg)
    assert engine.namespace("fresh").mode is Mode.SEQ
    assert engine.namespace("ns").password == "s3cret"
    engine.close()
    with refused(".*created in seq mode but the server runs in user mode.*"):
        Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                            mode=Mode.USER))


def test_single_mode_server_refuses_mode_changes(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 mode=Mode.SEQ))
    ns = engine.create_namespace("ns")
    assert ns.mode is Mode.SEQ
    with refused("This server instance is configured to use a single runtime mode"):
        ns.set_property("mode", "user")
    engine.close()


def test_key_limits(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index"))
    ns = engine.namespace("default")
    with refused("Key too large"):
        ns.set(b"k" * 256, b"v")
    with refused("Invalid argument, key needed"):
        ns.set(b"", b"v")
    with refused("Key not found"):
        ns.delete(b"missing")
    assert ns.set(b"k" * 255, b"") == b"k" * 255
    assert ns.get(b"k" * 255) == b""
    engine.close()
