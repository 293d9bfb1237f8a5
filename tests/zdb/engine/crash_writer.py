"""Writer process for the kill -9 tests: applies a seeded sequence of sets and deletes to
an engine and prints the number of operations acknowledged after each batch."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from zerostack.zdb.engine import Engine, EngineConfig, ZdbError

POOL = 150
DATASIZE = 8 * 1024


def operations(seed: int, n: int) -> list[tuple[str, bytes, bytes]]:
    rnd = random.Random(seed)
    ops = []
    for _ in range(n):
        key = b"key-%03d" % rnd.randrange(POOL)
        if rnd.random() < 0.2:
            ops.append(("del", key, b""))
        else:
            ops.append(("set", key, rnd.randbytes(rnd.randint(0, 300))))
    return ops


def batches(seed: int) -> random.Random:
    return random.Random(seed ^ 0x5EED)


def main() -> None:
    root, seed, sync = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "sync"
    engine = Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index",
                                 datasize=DATASIZE, sync=sync))
    ns = engine.namespace("default")
    ops = operations(seed, 100_000)
    sizes = batches(seed)
    done = 0
    print("ready", flush=True)
    while done < len(ops):
        size = 1 if sync else sizes.randint(1, 8)
        for kind, key, value in ops[done:done + size]:
            if kind == "set":
                ns.set(key, value)
            else:
                try:
                    ns.delete(key)
                except ZdbError:
                    pass
        engine.flush_all()
        done += size
        print(done, flush=True)


if __name__ == "__main__":
    main()
