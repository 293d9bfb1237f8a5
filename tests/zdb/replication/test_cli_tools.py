"""`zerostack zdb compact` and `zerostack zdb check [--repair]` on the files of a stopped
server, run through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from zerostack.cli.zdb import app
from zerostack.zdb.engine import Engine, EngineConfig
from zerostack.zdb.engine.raw import DENT, DHEAD
from zerostack.zdb.replication.terms import Terms


def make_files(root: Path) -> tuple[Path, Path]:
    data, index = root / "data", root / "index"
    engine = Engine(EngineConfig(data_dir=data, index_dir=index, datasize=64 * 1024))
    try:
        ns = engine.create_namespace("logs")
        for round_ in range(4):
            for i in range(300):
                ns.set(b"key%d" % i, b"round%d-" % round_ + b"x" * 200)
        for i in range(0, 300, 3):
            ns.delete(b"key%d" % i)
        engine.namespace("default").set(b"hello", b"world")
    finally:
        engine.close()
    return data, index


def test_compact_reports_reclaimed_space_and_keeps_data(tmp_path: Path) -> None:
    data, index = make_files(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["compact", "--data", str(data), "--index", str(index),
                              "--namespace", "logs", "--keep-history", "0", "--datasize", "64K",
                              "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)["namespaces"][0]
    assert report["namespace"] == "logs" and report["keys"] == 200
    assert report["reclaimed_bytes"] > report["bytes_after"]
    out = runner.invoke(app, ["compact", "--data", str(data), "--index", str(index)])
    assert out.exit_code == 0, out.output
    assert "reclaimed" in out.stdout
    engine = Engine(EngineConfig(data_dir=data, index_dir=index, datasize=64 * 1024))
    try:
        ns = engine.namespace("logs")
        assert ns.get(b"key1") == b"round3-" + b"x" * 200
        assert ns.get(b"key3") is None
        assert engine.namespace("default").get(b"hello") == b"world"
    finally:
        engine.close()


def test_check_finds_a_torn_tail_and_repair_cuts_it(tmp_path: Path) -> None:
    data, index = make_files(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["check", "--data", str(data), "--index", str(index)])
    assert out.exit_code == 0, out.output
    assert "consistent" in out.stdout
    last = max((data / "logs").iterdir(), key=lambda p: int(p.name[1:]))
    with open(last, "ab") as f:
        f.write(b"\x05\x40\x00\x00\x00torn")  # half an entry: a crash mid-write
    out = runner.invoke(app, ["check", "--data", str(data), "--index", str(index)])
    assert out.exit_code != 0
    assert "logs/" in out.stdout and "--repair" in " ".join(out.output.split())
    out = runner.invoke(app, ["check", "--data", str(data), "--index", str(index), "--repair",
                              "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["ok"] and report["findings"] and all(f["repaired"] for f in report["findings"])
    out = runner.invoke(app, ["check", "--data", str(data), "--index", str(index)])
    assert out.exit_code == 0 and "consistent" in out.stdout


def test_check_says_what_it_found_and_that_it_changed_nothing(tmp_path: Path) -> None:
    data, index = make_files(tmp_path)
    path = data / "logs" / "d0"
    raw = bytearray(path.read_bytes())
    second = DHEAD + DENT + raw[DHEAD] + int.from_bytes(raw[DHEAD + 1:DHEAD + 5], "little")
    raw[second + 5:second + 9] = (12345).to_bytes(4, "little")  # its previous-entry link
    path.write_bytes(bytes(raw))
    before = path.read_bytes()
    runner = CliRunner()
    out = runner.invoke(app, ["check", "--data", str(data), "--index", str(index)])
    said = " ".join(out.stdout.split())
    assert out.exit_code == 0, out.output
    assert "previous-entry link is 12345" in said and "[harmless]" in said
    assert "1 finding(s): 0 repaired, 1 harmless (left as they are), 0 not repaired" in said
    assert "no file was changed" in said and "every problem was repaired" not in said
    assert path.read_bytes() == before
    out = runner.invoke(app, ["check", "--data", str(data), "--index", str(index), "--json"])
    report = json.loads(out.stdout)
    assert report["repaired"] == 0 and report["harmless"] == 1


def test_compact_starts_a_new_generation_on_a_node_of_a_replica_set(tmp_path: Path) -> None:
    """Offline as online: the rewritten namespace's log is counted as a new generation in
    votes, with the position where the rewritten files end (see test_generations.py)."""
    data, index = make_files(tmp_path)
    Terms(index).become_primary(3, {})  # the files of a node of a replica set
    out = CliRunner().invoke(app, ["compact", "--data", str(data), "--index", str(index),
                                   "--namespace", "logs", "--datasize", "64K"])
    assert out.exit_code == 0, out.output
    engine = Engine(EngineConfig(data_dir=data, index_dir=index, datasize=64 * 1024))
    try:
        end = engine.namespace("logs").position()
    finally:
        engine.close()
    assert Terms(index).generation("logs") == (1, end)
    assert Terms(index).generation("default") == (0, (0, DHEAD))
