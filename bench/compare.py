"""Run one benchmark on this tree and on an earlier commit, alternating, in one run, and
print the figures side by side with their ratio (this tree / the earlier one).

    .venv/bin/python -m bench.compare REF NAME [--rounds 2] [-- ARGS...]

REF is any git revision; NAME a module of `bench/` that takes `--json` and prints one JSON
object. The earlier commit is checked out into a temporary git worktree and run with its
own sources and its own copy of the benchmark, on this venv. Compiled Zero-DB modules are
shared when their source is the same in both trees, so both sides run the same native
code where nothing changed. Each figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent


def checkout(ref: str) -> Path:
    """A worktree of `ref` in a temporary folder, with this tree's native modules copied in
    where the Python source is unchanged."""
    where = Path(tempfile.mkdtemp(prefix="zs-compare-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref],
                   check=True, capture_output=True)
    for native in (REPO / "src").rglob("*"):
        if not any(native.name.endswith(s) for s in EXTENSION_SUFFIXES):
            continue
        rel = native.relative_to(REPO)
        source = REPO / rel.parent / (native.name.split(".", 1)[0] + ".py")
        theirs = where / source.relative_to(REPO)
        if theirs.exists() and filecmp.cmp(source, theirs, shallow=False):
            shutil.copy2(native, where / rel)
    return where


def remove(tree: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                   check=False, capture_output=True)
    shutil.rmtree(tree.parent, ignore_errors=True)


def run_in(tree: Path, name: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}"}
    out = subprocess.run([sys.executable, "-m", f"bench.{name}", "--json", *args], cwd=tree,
                         env=env, capture_output=True, check=True)
    result = orjson.loads(out.stdout)
    assert isinstance(result, dict), result
    return result


def median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return statistics.median(numbers) if len(numbers) == len(values) else values[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref")
    ap.add_argument("name")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    opts = ap.parse_args(argv[:cut])
    args = argv[cut + 1:]
    old_tree = checkout(opts.ref)
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    try:
        for _ in range(opts.rounds):
            runs["old"].append(run_in(old_tree, opts.name, args))
            runs["new"].append(run_in(REPO, opts.name, args))
    finally:
        remove(old_tree)
    keys = [k for k in runs["new"][0] if k in runs["old"][0]]
    table = {}
    for k in keys:
        old, new = median([r[k] for r in runs["old"]]), median([r[k] for r in runs["new"]])
        ratio = (round(new / old, 2) if isinstance(old, int | float) and old
                 and isinstance(new, int | float) and not isinstance(new, bool) else None)
        table[k] = {"old": old, "new": new, "ratio": ratio}
    if opts.json:
        print(orjson.dumps({"ref": opts.ref, "rounds": opts.rounds, "figures": table},
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{'figure':34} {'at ' + opts.ref[:10]:>14} {'this tree':>14} {'ratio':>7}")
    for k, row in table.items():
        print(f"{k:34} {row['old']!s:>14} {row['new']!s:>14} {row['ratio']!s:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
