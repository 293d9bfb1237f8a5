"""Run every benchmark in turn (`make bench`); each updates its section of docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "zdb_bench",
    "zdb_load",
    "zdb_replication_bench",
    "ledger_bench",
    "provision_bench",
    "flist_bench",
    "explorer_bench",
]


def main() -> int:
    only = sys.argv[1:] or BENCHMARKS
    failed = []
    for name in only:
        print(f"== bench.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
