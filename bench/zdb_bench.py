"""Zero-DB server vs redis-server under redis-benchmark, in the same run; writes docs/benchmarks.md.

usage: .venv/bin/python -m bench.zdb_bench [--requests N] [--rounds N] [--no-docs]
Both servers run on 127.0.0.1 with a fresh data directory; ours keeps its default
durability (every write handed to the OS before the reply, no fsync), redis-server runs
with persistence off (`--save "" --appendonly no`).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import free_port, start, stop, zerostack_cli

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Zero-DB server"
START, END = "<!-- zdb-server:start -->", "<!-- zdb-server:end -->"
TARGETS = {1: 0.8, 16: 0.25}
MACHINE = "2-core Debian 12 VM, Python 3.11"


@dataclass
class Result:
    pipeline: int
    test: str
    zdb: float
    redis: float
    zdb_cpu: float    # server CPU time (user + system) per request over SET and GET, µs,
    redis_cpu: float  # lowest of the rounds
    pure: float       # the same sources without the native build (setup.py)

    @property
    def ratio(self) -> float:
        return self.zdb / self.redis if self.redis else 0.0

    @property
    def target(self) -> float:
        return TARGETS[self.pipeline]


def benchmark_command(port: int, pipeline: int, requests: int) -> list[str]:
    return ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests), "-d", "64",
            "-r", "100000", "-t", "set,get", "-P", str(pipeline), "--csv"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_benchmark(port: int, pid: int, pipeline: int,
                  requests: int) -> tuple[dict[str, float], float]:
    """({test: requests per second}, server CPU µs per request over the whole run) of one
    redis-benchmark run of SET then GET."""
    before = cpu_seconds(pid)
    out = subprocess.run(benchmark_command(port, pipeline, requests), capture_output=True,
                         text=True, timeout=900, check=True).stdout
    cpu = cpu_seconds(pid) - before
    rows = [row for row in csv.reader(io.StringIO(out)) if row and row[0] in ("SET", "GET")]
    return {row[0]: float(row[1]) for row in rows}, cpu / (len(rows) * requests) * 1e6


def pure_copy(work: Path) -> Path:
    """A copy of the sources without the native build: what runs where nothing was built."""
    src = work / "pure-src"
    shutil.copytree(REPO / "src" / "zerostack", src / "zerostack",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return src


def measure(requests: int, work: Path, rounds: int) -> list[Result]:
    zport, rport, pport = free_port(), free_port(), free_port()
    zdb = start([*zerostack_cli(), "zdb", "--listen", "127.0.0.1", "--port", str(zport),
                 "--data", str(work / "data"), "--index", str(work / "index")],
                zport, work / "zdb.log")
    pure = start(["env", f"PYTHONPATH={pure_copy(work)}", sys.executable, "-m",
                  "zerostack.cli.main", "zdb", "--listen", "127.0.0.1", "--port", str(pport),
                  "--data", str(work / "pure-data"), "--index", str(work / "pure-index")],
                 pport, work / "pure.log")
    redis = start(["redis-server", "--save", "", "--appendonly", "no", "--port", str(rport),
                   "--bind", "127.0.0.1", "--dir", str(work)], rport, work / "redis.log")
    servers = ((rport, redis.pid), (zport, zdb.pid), (pport, pure.pid))
    results: list[Result] = []
    try:
        for pipeline in (1, 16):
            # Alternate the servers so all see the same machine load as far as possible,
            # and keep each one's best round: the machine is shared and noisy.
            best: dict[tuple[int, str], float] = {}
            cpu: dict[int, list[float]] = {port: [] for port, _ in servers}
            for _ in range(rounds):
                for port, pid in servers:
                    ops, used = run_benchmark(port, pid, pipeline, requests)
                    cpu[port].append(used)
                    for test, value in ops.items():
                        best[port, test] = max(best.get((port, test), 0.0), value)
            for test in ("SET", "GET"):
                result = Result(pipeline, test, best[zport, test], best[rport, test],
                                min(cpu[zport]), min(cpu[rport]), best[pport, test])
                results.append(result)
                print(f"-P {pipeline:<2} {test}: zdb {result.zdb:>10,.0f} ops/s   "
                      f"redis {result.redis:>10,.0f} ops/s   "
                      f"pure-Python zdb {result.pure:>10,.0f} ops/s", flush=True)
            print(f"-P {pipeline:<2} server CPU per request: zdb {min(cpu[zport]):.1f} µs, "
                  f"redis {min(cpu[rport]):.1f} µs, pure-Python zdb {min(cpu[pport]):.1f} µs",
                  flush=True)
    finally:
        for proc in (zdb, pure, redis):
            stop(proc)
    return results


def table(results: list[Result]) -> str:
    lines = ["| pipeline | test | zerostack zdb ops/s | redis-server ops/s | ratio | target | "
             "| zdb CPU µs/req | redis CPU µs/req | pure-Python zdb ops/s | native / pure |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        verdict = "meets" if r.ratio >= r.target else "misses"
        lines.append(f"| -P {r.pipeline} | {r.test} | {r.zdb:,.0f} | {r.redis:,.0f} | "
                     f"{r.ratio:.2f}x | {r.target:.2f}x | {verdict} | {r.zdb_cpu:.1f} | "
                     f"{r.redis_cpu:.1f} | {r.pure:,.0f} | {r.zdb / r.pure:.2f}x |")
    return "\n".join(lines)


def write_docs(results: list[Result], requests: int, date: str, load: str,
               rounds: int) -> None:
    command = " ".join(benchmark_command(0, 1, requests)).replace("-p 0 ", "-p PORT ").replace(
        "-P 1", "-P {1,16}")
    body = "\n".join([
        START,
        f"Command: `.venv/bin/python -m bench.zdb_bench` runs `{command}` against",
        "`zerostack zdb` (fresh data directory, default durability: writes reach the OS before",
        "the reply, no fsync), against `redis-server --save \"\" --appendonly no`, and against",
        "the same zerostack sources without the native build (pure-Python), in the same run,",
        f"alternating the servers; each figure is the best of {rounds} rounds.",
        "",
        f"Machine: {MACHINE} ({platform.python_implementation()} "
        f"{platform.python_version()}), shared with other test runs (load average "
        f"{load}), so figures are noisy; compare the ratios.",
        f"Date: {date}",
        "",
        table(results),
        "",
        "How `-P 1` reaches its target (measured on this VM on 2026-11-25 with perf and",
        "/proc CPU counters): without pipelining, each request costs a server one read and",
        "one write on a loopback TCP socket, 5-6.5 µs of kernel time per request in",
        "redis-server and in ours alike. redis-server adds about 2.5 µs of user time; the",
        "redis-benchmark client needs about 10 µs per request, so on two cores the client is",
        "what limits redis-server (about 100k ops/s). With its request path interpreted, our",
        "server spent about 9 µs of user time per request (15-17 µs in all: 0.58-0.66x),",
        "half of its CPU in the interpreter. That path (parser, connection, GET and SET,",
        "engine) is now compiled with mypyc from the same typed sources (see",
        "[zdb.md](zdb.md#native-build)); it parses RESP in typed code and calls GET and SET",
        "directly. Its user time is 5-6 µs per request, and the interpreter's share of the",
        "server's CPU fell from 48% to about 25% (perf). Replies still leave once per",
        "event-loop pass, after the engine flush: writing each one as soon as it was ready",
        "woke the client once per reply, which cost 1.7x more CPU per GET in the pure-Python",
        "build and lowered the native build's ratios too. The CPU columns are each server's",
        "CPU time per request over",
        "the SET and GET runs (lowest round); the pure-Python columns are the same sources",
        "without the native build, run alongside.",
        "With `-P 16` the system calls are shared by 16 requests, replies of a batch go out",
        "in one write, and all connections served in one event-loop pass share one engine",
        "flush; there the engine's SET path (CRC, two packed entries, the key index) is the",
        "largest cost.",
        END,
    ])
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: body, text,
                      flags=re.DOTALL)
    elif SECTION in text:
        head, _, rest = text.partition(SECTION)
        text = head + SECTION + "\n\n" + body + "\n" + rest
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{body}\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000, help="redis-benchmark -n")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server, best kept")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    for tool in ("redis-benchmark", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/install-system-deps")
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="zdb-bench-") as tmp:
        results = measure(args.requests, Path(tmp), args.rounds)
    after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    load = f"{load} when the run started, {after} when it ended"
    print()
    print(table(results))
    if not args.no_docs:
        write_docs(results, args.requests, date, load, args.rounds)
        print(f"\nwrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
