"""Compaction in a child process that dies (os._exit, like kill -9) at its Nth step."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from zerostack.zdb.engine.compact import compact_namespace


def main() -> None:
    root, crash_at = Path(sys.argv[1]), int(sys.argv[2])
    seen = 0

    def step(name: str) -> None:
        nonlocal seen
        seen += 1
        print(name, flush=True)
        if seen == crash_at:
            os._exit(9)

    report = compact_namespace(root / "index", root / "data", "store", datasize=4096, step=step)
    print("done", report.reclaimed_bytes, flush=True)


if __name__ == "__main__":
    main()
