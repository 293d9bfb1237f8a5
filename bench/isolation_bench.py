"""Container isolation benchmark: warm container start and approval -> running, before and
after the user namespace and the size-limited writable layer, in one run.

    .venv/bin/python -m bench.isolation_bench [--base REV] [--rounds 2] [--starts 20] [--contracts 10] [--json]

"Before" is the source tree at `--base` (default: where this branch left main), exported
with `git archive` into a temporary directory; "after" is this tree. Each round runs
`bench.flist_bench --containers-only` once per side, alternating which goes first, with
PYTHONPATH pointing at that side's sources (the node agents it spawns inherit it). Figures
pool every start and every contract of all rounds per side. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.common import percentile

REPO = Path(__file__).resolve().parent.parent


def export_sources(rev: str, into: Path) -> Path:
    """The `src/` tree of `rev`, unpacked under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def run_side(src: Path, starts: int, contracts: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, "-m", "bench.flist_bench", "--containers-only",
                           "--starts", str(starts), "--contracts", str(contracts), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"flist_bench on {src} failed:\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = orjson.loads(proc.stdout)
    return data


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"n": len(values), "p50_s": statistics.median(values),
            "p90_s": percentile(values, 90), "max_s": values[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="", help="revision of the 'before' sources "
                    "(default: git merge-base HEAD main)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--contracts", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (runc, mounts)")
    base = args.base or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"],
                                       check=True, capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="zs-isolation-bench-"))
    try:
        sides = {"before": export_sources(base, tmp), "after": REPO / "src"}
        starts: dict[str, list[float]] = {"before": [], "after": []}
        approvals: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                data = run_side(sides[side], args.starts, args.contracts)
                starts[side] += data["start"]["times_s"]
                approvals[side] += data["contract"]["latencies_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {"base": base[:12]}
    for side in ("before", "after"):
        result[side] = {"start": summary(starts[side]), "approval": summary(approvals[side])}
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    print(f"before = {result['base']}, after = this tree; {args.rounds} rounds, sides alternating")
    for what, label in (("start", "container start, warm cache"),
                        ("approval", "approval -> report ok, warm cache")):
        for side in ("before", "after"):
            s = result[side][what]
            print(f"{label:36} {side:6}: p50 {s['p50_s'] * 1000:4.0f} ms, "
                  f"p90 {s['p90_s'] * 1000:4.0f} ms, max {s['max_s'] * 1000:4.0f} ms (n={s['n']})")


if __name__ == "__main__":
    main()
