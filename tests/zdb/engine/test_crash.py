"""kill -9 a writer at random moments, many times: the files always open, every
acknowledged write is there (a prefix of the operations), nothing torn is served."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.zdb.engine.crash_writer import DATASIZE, POOL, operations
from tests.zdb.engine.layout import read_layout
from zerostack.zdb.engine import Engine, EngineConfig

ROUNDS = 12


def state(root: Path) -> dict[bytes, bytes]:
    engine = Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index",
                                 datasize=DATASIZE))
    try:
        ns = engine.namespace("default")
        out = {}
        for i in range(POOL):
            key = b"key-%03d" % i
            value = ns.get(key)
            if value is not None:
                assert ns.check(key) is True, key
                out[key] = value
        assert ns.dbsize() == len(out)
        return out
    finally:
        engine.close()


def run_and_kill(root: Path, seed: int, sync: bool, delay: float) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "tests.zdb.engine.crash_writer", str(root),
                             str(seed), "sync" if sync else "nosync"],
                            cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    lines = out.split(b"\n")[:-1]  # the last line may be cut short by the kill
    return int(lines[-1]) if lines else 0


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "buffered"])
def test_kill_9_keeps_every_acknowledged_write(tmp_path: Path, sync: bool) -> None:
    rnd = random.Random(42 + sync)
    model: dict[bytes, bytes] = {}
    for round_ in range(ROUNDS):
        seed = rnd.randrange(1 << 30)
        acked = run_and_kill(tmp_path, seed, sync, rnd.uniform(0.02, 0.3))
        found = state(tmp_path)
        # the state must be the model after `acked` ops, or a few more that were in flight
        candidate = dict(model)
        ops = operations(seed, acked + 9)
        matched = None
        for n, (kind, key, value) in enumerate(ops):
            if n >= acked and candidate == found:
                matched = n
                break
            if kind == "set":
                candidate[key] = value
            else:
                candidate.pop(key, None)
        assert matched is not None, f"round {round_}: state is not a prefix with >= {acked} ops"
        model = found
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", index_dir=tmp_path / "index",
                                 datasize=DATASIZE))
    ns = engine.namespace("default")
    ns.set(b"after", b"all rounds")
    engine.close()
    layout = read_layout(tmp_path / "index/default", tmp_path / "data/default")
    assert {k: v for k, (v, _t) in layout.live.items()} == {**model, b"after": b"all rounds"}
    assert (tmp_path / "data/default/d1").exists(), "rounds should rotate files"
