"""Zero-DB server vs redis-server under redis-benchmark, in the same run; writes docs/benchmarks.md.

usage: .venv/bin/python -m bench.zdb_bench [--requests N] [--rounds N] [--no-docs]
                                           [--only appends] [--table-only {1,16}]...
Both servers run on 127.0.0.1 with a fresh data directory; ours keeps its default
durability (every write handed to the OS before the reply, no fsync), redis-server runs
with persistence off (`--save "" --appendonly no`). Besides the 64-byte table: the same
load on a server whose data spans many files (`--datasize 1M`), SET/GET of 4 KiB and 1 MiB
values, and sequential 1 MiB appends against `dd` writing the same blocks to the same disk.
Every figure is the median of the rounds, the servers' order alternating between rounds
(the machine is shared: a best round says more about the load than about the server).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import free_port, start, stop, zerostack_cli

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Zero-DB server"
START, END = "<!-- zdb-server:start -->", "<!-- zdb-server:end -->"
APPEND_START, APPEND_END = "<!-- zdb-appends:start -->", "<!-- zdb-appends:end -->"
TARGETS = {(1, "SET"): 0.8, (1, "GET"): 0.8, (16, "SET"): 0.25, (16, "GET"): 0.9}
MACHINE = "2-core Debian 12 VM, Python 3.11"
MANY_FILES_DATASIZE = "1M"
MANY_FILES_TARGET = 0.9   # GET ratio to redis with many files / the same with one file
KIB4, MIB = 4096, 1024 * 1024
LARGE_TARGETS = {KIB4: 0.8}
# value size -> (requests per run, keys the GET runs read, clients)
LARGE_LOAD = {KIB4: (100_000, 10_000, 50), MIB: (1_000, 50, 10)}
APPEND_TARGET = 0.5       # 1 MiB appends / dd's rate, same block size and sync policy
APPENDS = {"os": 1_000, "sync": 200}  # 1 MiB appends per run, per sync policy
NOISE = 2.0  # an appends row whose rounds differ more than this factor gives no verdict
POLICY_NAMES = {"os": "default (to the OS, no fsync) / dd", "sync": "--sync / dd oflag=dsync"}


@dataclass
class Result:
    pipeline: int
    test: str
    zdb: float
    redis: float
    zdb_cpu: float    # server CPU time (user + system) per request over SET and GET, µs,
    redis_cpu: float  # lowest of the rounds
    pure: float       # the same sources without the native build (setup.py)
    many: float       # ours with --datasize 1M: the data spans many files
    many_cpu: float   # its CPU time per request (the 1 file server's is zdb_cpu)

    @property
    def ratio(self) -> float:
        return self.zdb / self.redis if self.redis else 0.0

    @property
    def many_ratio(self) -> float:
        return self.many / self.redis if self.redis else 0.0

    @property
    def target(self) -> float:
        return TARGETS[self.pipeline, self.test]


@dataclass
class Large:
    """SET or GET of large values, ours and redis-server's median round."""

    size: int
    pipeline: int
    test: str
    zdb: float
    redis: float

    @property
    def ratio(self) -> float:
        return self.zdb / self.redis if self.redis else 0.0


@dataclass
class Append:
    """Sequential 1 MiB appends of one client against dd writing the same blocks."""

    policy: str        # "os" (handed to the OS, no fsync) or "sync" (durable before the reply)
    zdb: float         # bytes per second
    dd: float
    zdb_cpu: float     # CPU seconds per GiB written: the server's, and dd's own
    dd_cpu: float
    client_cpu: float  # the sending client's (this process), per GiB
    zdb_runs: list[float]  # every round's rate, bytes per second
    dd_runs: list[float]

    @property
    def ratio(self) -> float:
        return self.zdb / self.dd if self.dd else 0.0

    @property
    def noisy(self) -> bool:
        """dd's rounds (or ours) differ more than twofold: the load of the machine, not
        the writers, set the ratio."""
        return any(max(runs) > NOISE * min(runs) for runs in (self.zdb_runs, self.dd_runs)
                   if runs and min(runs) > 0)

    @property
    def verdict(self) -> str:
        return "unclear: noisy rounds" if self.noisy else verdict(self.ratio, APPEND_TARGET)


def benchmark_command(port: int, pipeline: int, requests: int) -> list[str]:
    return ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests), "-d", "64",
            "-r", "100000", "-t", "set,get", "-P", str(pipeline), "--csv"]


def redis_benchmark(port: int, *args: str) -> dict[str, float]:
    """{test: requests per second} of one redis-benchmark run (--csv)."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), *args, "--csv"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    return {row[0]: float(row[1]) for row in csv.reader(io.StringIO(out))
            if row and row[0] in ("SET", "GET")}


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


def start_zdb(work: Path, name: str, *extra: str) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    proc = start([*zerostack_cli(), "zdb", "--listen", "127.0.0.1", "--port", str(port),
                  "--data", str(work / f"{name}-data"), "--index", str(work / f"{name}-index"),
                  *extra], port, work / f"{name}.log")
    return port, proc


def start_redis(work: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    proc = start(["redis-server", "--save", "", "--appendonly", "no", "--port", str(port),
                  "--bind", "127.0.0.1", "--dir", str(work)], port, work / f"redis-{port}.log")
    return port, proc


def measure(requests: int, work: Path, rounds: int,
            pipelines: tuple[int, ...] = (1, 16)) -> list[Result]:
    zport, rport, pport = free_port(), free_port(), free_port()
    zdb = start([*zerostack_cli(), "zdb", "--listen", "127.0.0.1", "--port", str(zport),
                 "--data", str(work / "data"), "--index", str(work / "index")],
                zport, work / "zdb.log")
    mport, many = start_zdb(work, "many", "--datasize", MANY_FILES_DATASIZE)
    pure = start(["env", f"PYTHONPATH={pure_copy(work)}", sys.executable, "-m",
                  "zerostack.cli.main", "zdb", "--listen", "127.0.0.1", "--port", str(pport),
                  "--data", str(work / "pure-data"), "--index", str(work / "pure-index")],
                 pport, work / "pure.log")
    redis = start(["redis-server", "--save", "", "--appendonly", "no", "--port", str(rport),
                   "--bind", "127.0.0.1", "--dir", str(work)], rport, work / "redis.log")
    servers = ((rport, redis.pid), (zport, zdb.pid), (mport, many.pid), (pport, pure.pid))
    results: list[Result] = []
    try:
        for pipeline in pipelines:
            # Alternate the servers' order between rounds so all see the same machine load
            # as far as possible, and keep each one's median: the machine is shared.
            runs: dict[tuple[int, str], list[float]] = {}
            cpu: dict[int, list[float]] = {port: [] for port, _ in servers}
            for i in range(rounds):
                for port, pid in (servers if i % 2 == 0 else servers[::-1]):
                    ops, used = run_benchmark(port, pid, pipeline, requests)
                    cpu[port].append(used)
                    for test, value in ops.items():
                        runs.setdefault((port, test), []).append(value)
            med = {key: statistics.median(values) for key, values in runs.items()}
            for test in ("SET", "GET"):
                result = Result(pipeline, test, med[zport, test], med[rport, test],
                                statistics.median(cpu[zport]), statistics.median(cpu[rport]),
                                med[pport, test], med[mport, test],
                                statistics.median(cpu[mport]))
                results.append(result)
                print(f"-P {pipeline:<2} {test}: zdb {result.zdb:>10,.0f} ops/s   "
                      f"redis {result.redis:>10,.0f} ops/s   "
                      f"pure-Python zdb {result.pure:>10,.0f} ops/s   "
                      f"--datasize {MANY_FILES_DATASIZE} {result.many:>10,.0f} ops/s", flush=True)
            print(f"-P {pipeline:<2} server CPU per request: zdb "
                  f"{statistics.median(cpu[zport]):.2f} µs, redis "
                  f"{statistics.median(cpu[rport]):.2f} µs, pure-Python zdb "
                  f"{statistics.median(cpu[pport]):.2f} µs, --datasize "
                  f"{MANY_FILES_DATASIZE} {statistics.median(cpu[mport]):.2f} µs", flush=True)
        files = len(list((work / "many-data" / "default").glob("d*")))
        print(f"--datasize {MANY_FILES_DATASIZE}: the data spans {files} files", flush=True)
    finally:
        for proc in (zdb, many, pure, redis):
            stop(proc)
    return results


def measure_large(work: Path, rounds: int) -> list[Large]:
    """SET and GET of 4 KiB and 1 MiB values against redis-server, -P 1 and -P 16.

    SET runs use keys from a range far larger than the run (nearly every SET stores a new
    key: redis-benchmark sends the same value each time, and ours answers an unchanged
    value without writing it). GET runs read keys stored beforehand, unmeasured.
    """
    zport, zdb = start_zdb(work, "large")
    rport, redis = start_redis(work)
    out: list[Large] = []
    try:
        for size in (KIB4, MIB):
            requests, keys, clients = LARGE_LOAD[size]
            common = ["-c", str(clients), "-d", str(size)]
            for port in (rport, zport):
                redis_benchmark(port, *common, "-n", str(5 * keys), "-r", str(keys),
                                "-t", "set", "-P", "16")
            for pipeline in (1, 16):
                runs: dict[tuple[int, str], list[float]] = {}
                for i in range(rounds):
                    for port in ((rport, zport) if i % 2 == 0 else (zport, rport)):
                        for test, keyspace in (("set", 10**9), ("get", keys)):
                            ops = redis_benchmark(port, *common, "-n", str(requests), "-r",
                                                  str(keyspace), "-t", test, "-P", str(pipeline))
                            for name, value in ops.items():
                                runs.setdefault((port, name), []).append(value)
                med = {key: statistics.median(values) for key, values in runs.items()}
                for test in ("SET", "GET"):
                    item = Large(size, pipeline, test, med[zport, test], med[rport, test])
                    out.append(item)
                    print(f"{size_name(size)} -P {pipeline:<2} {test}: zdb {item.zdb:>9,.0f} "
                          f"ops/s   redis {item.redis:>9,.0f} ops/s   {item.ratio:.2f}x",
                          flush=True)
    finally:
        for proc in (zdb, redis):
            stop(proc)
    return out


def dd_command(path: Path, blocks: int, sync: bool) -> list[str]:
    """dd writing `blocks` 1 MiB blocks to a new file at `path`: the same write size as a
    1 MiB SET (one write of the entry per value), no fsync unless `sync`, then one per
    block (`oflag=dsync`), as `--sync` makes each write durable before its reply."""
    args = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={blocks}"]
    if sync:
        args.append("oflag=dsync")
    return args


def dd_rate(path: Path, blocks: int, sync: bool) -> tuple[float, float]:
    """(bytes per second, CPU seconds used) of dd_command()."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    err = subprocess.run(dd_command(path, blocks, sync), capture_output=True, text=True,
                         timeout=900, check=True).stderr
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    path.unlink()
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", err)
    if match is None:
        raise RuntimeError(f"unexpected dd output: {err!r}")
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return int(match.group(1)) / float(match.group(2)), used


def append_rate(port: int, blocks: int, size: int = MIB, depth: int = 16) -> float:
    """Bytes per second one client stores by SETting `blocks` new keys of `size` bytes,
    `depth` requests in flight. The requests are sent straight from one buffer
    (redis-benchmark itself tops out at a few hundred MiB/s with values this large)."""
    value = b"v" * size
    window = threading.Semaphore(depth)
    failed: list[BaseException] = []

    def send(sock: socket.socket) -> None:
        try:
            for i in range(blocks):
                key = b"append:%010d" % i
                window.acquire()
                sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, size))
                sock.sendall(value)
                sock.sendall(b"\r\n")
        except BaseException as exc:  # reported by the reading side
            failed.append(exc)

    with socket.create_connection(("127.0.0.1", port)) as sock:
        began = time.perf_counter()
        writer = threading.Thread(target=send, args=(sock,), daemon=True)
        writer.start()
        replies = 0
        pending = b""
        while replies < blocks:
            chunk = sock.recv(65536)
            if not chunk or failed:
                raise RuntimeError(f"append run failed after {replies} replies: {failed}")
            pending += chunk
            # each reply is the key as a bulk string: "$15\r\nappend:NNNNNNNNNN\r\n"
            done = pending.count(b"\r\n") // 2
            if pending.startswith(b"-") or b"\r\n-" in pending:
                raise RuntimeError(f"the server refused an append: {pending[:200]!r}")
            cut = 0
            for _ in range(done):
                cut = pending.index(b"\r\n", pending.index(b"\r\n", cut) + 2) + 2
            pending = pending[cut:]
            replies += done
            for _ in range(done):
                window.release()
        elapsed = time.perf_counter() - began
        writer.join()
    return blocks * size / elapsed


def measure_append(work: Path, rounds: int) -> list[Append]:
    """One client appending 1 MiB values (new keys, 16 in flight) against dd's rate for
    the same 1 MiB blocks in the same directory, under each sync policy, dd and ours
    taking turns to go first. Each run starts from an empty directory after os.sync(), so
    neither pays for the other's dirty pages."""
    out: list[Append] = []
    for policy, blocks in APPENDS.items():
        extra = ("--sync",) if policy == "sync" else ()
        rates: dict[str, list[float]] = {"zdb": [], "dd": []}
        cpus: dict[str, list[float]] = {"zdb": [], "dd": [], "client": []}
        gib = blocks / 1024
        for i in range(rounds):
            for side in (("dd", "zdb") if i % 2 == 0 else ("zdb", "dd")):
                os.sync()
                if side == "dd":
                    rate, used = dd_rate(work / "dd.out", blocks, policy == "sync")
                else:
                    port, zdb = start_zdb(work, "append", *extra)
                    try:
                        before = cpu_seconds(zdb.pid)
                        mine = time.process_time()
                        rate = append_rate(port, blocks)
                        cpus["client"].append((time.process_time() - mine) / gib)
                        used = cpu_seconds(zdb.pid) - before
                    finally:
                        stop(zdb)
                        shutil.rmtree(work / "append-data", ignore_errors=True)
                        shutil.rmtree(work / "append-index", ignore_errors=True)
                rates[side].append(rate)
                cpus[side].append(used / gib)
        item = Append(policy, statistics.median(rates["zdb"]), statistics.median(rates["dd"]),
                      statistics.median(cpus["zdb"]), statistics.median(cpus["dd"]),
                      statistics.median(cpus["client"]), rates["zdb"], rates["dd"])
        out.append(item)
        print(f"1 MiB appends ({policy}): zdb {item.zdb / MIB:,.0f} MiB/s   "
              f"dd {item.dd / MIB:,.0f} MiB/s   {item.ratio:.2f}x   CPU s/GiB zdb "
              f"{item.zdb_cpu:.2f} dd {item.dd_cpu:.2f} client {item.client_cpu:.2f}   (zdb runs "
              f"{[round(r / MIB) for r in rates['zdb']]}, dd runs "
              f"{[round(r / MIB) for r in rates['dd']]} MiB/s)", flush=True)
    return out


def size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // 1024} KiB"


def verdict(value: float, target: float) -> str:
    return "meets" if value >= target else "misses"


def table(results: list[Result]) -> str:
    lines = ["| pipeline | test | zerostack zdb ops/s | redis-server ops/s | ratio | target | "
             "| zdb CPU µs/req | redis CPU µs/req | pure-Python zdb ops/s | native / pure |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        verdict = "meets" if r.ratio >= r.target else "misses"
        lines.append(f"| -P {r.pipeline} | {r.test} | {r.zdb:,.0f} | {r.redis:,.0f} | "
                     f"{r.ratio:.2f}x | {r.target:.2f}x | {verdict} | {r.zdb_cpu:.2f} | "
                     f"{r.redis_cpu:.2f} | {r.pure:,.0f} | {r.zdb / r.pure:.2f}x |")
    return "\n".join(lines)


def many_table(results: list[Result]) -> str:
    lines = ["| pipeline | test | 1 file: ratio to redis | "
             f"--datasize {MANY_FILES_DATASIZE} ops/s | its ratio to redis | many / one file "
             "| target | | CPU µs/req, 1 file / many (SET and GET) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in results:
        rel = r.many_ratio / r.ratio if r.ratio else 0.0
        mark = verdict(rel, MANY_FILES_TARGET) if r.test == "GET" else ""
        target = f"{MANY_FILES_TARGET:.2f}x" if r.test == "GET" else ""
        lines.append(f"| -P {r.pipeline} | {r.test} | {r.ratio:.2f}x | {r.many:,.0f} | "
                     f"{r.many_ratio:.2f}x | {rel:.2f}x | {target} | {mark} | "
                     f"{r.zdb_cpu:.2f} / {r.many_cpu:.2f} |")
    return "\n".join(lines)


def large_table(items: list[Large]) -> str:
    lines = ["| value | pipeline | test | zerostack zdb ops/s | redis-server ops/s | "
             "zdb MiB/s | ratio | target | |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for i in items:
        target = LARGE_TARGETS.get(i.size)
        lines.append(f"| {size_name(i.size)} | -P {i.pipeline} | {i.test} | {i.zdb:,.0f} | "
                     f"{i.redis:,.0f} | {i.zdb * i.size / MIB:,.0f} | {i.ratio:.2f}x | "
                     + (f"{target:.2f}x | {verdict(i.ratio, target)} |" if target else "| |"))
    return "\n".join(lines)


def append_table(items: list[Append]) -> str:
    lines = ["| sync policy | zerostack zdb MiB/s | dd MiB/s | ratio | target | | "
             "CPU s/GiB: zdb server / dd | the client's |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for a in items:
        lines.append(f"| {POLICY_NAMES[a.policy]} | {a.zdb / MIB:,.0f} | {a.dd / MIB:,.0f} | "
                     f"{a.ratio:.2f}x | {APPEND_TARGET:.2f}x | {a.verdict} | "
                     f"{a.zdb_cpu:.2f} / {a.dd_cpu:.2f} | {a.client_cpu:.2f} |")
    return "\n".join(lines)


def append_section(appends: list[Append], rounds: int, date: str, load: str) -> str:
    """The appends part of the block, between its own markers: `--only appends` rewrites
    it alone."""
    return "\n".join([
        APPEND_START,
        "Sequential appends: one client (`bench/zdb_bench.py`'s own, 16 requests in flight,",
        "sent from one buffer: redis-benchmark itself tops out at a few hundred MiB/s with",
        "values this large) SETs new 1 MiB values into a fresh server, against",
        f"`{' '.join(dd_command(Path('FILE'), APPENDS['os'], False))}` writing a new file in",
        "the same directory: the same write size (the server hands each 1 MiB entry to the",
        "OS in one `pwritev`, header and value together) and the same sync policy (neither",
        "fsyncs; with `--sync` the server makes each write durable before its reply, and dd",
        f"runs `{' '.join(dd_command(Path('FILE'), APPENDS['sync'], True))}`, each block",
        f"durable before the next). {APPENDS['os']:,} blocks ({APPENDS['sync']} with",
        f"`--sync`); median of {rounds} rounds, dd and the server taking turns to go first,",
        "each run from an empty directory after `sync`. CPU: the server's (or dd's) user +",
        "system time per GiB written, and the sending client's (the benchmark process).",
        f"Command: `.venv/bin/python -m bench.zdb_bench --only appends --rounds {rounds}`",
        f"(or the full run). Machine: {MACHINE}, shared. Date: {date}; load average {load}.",
        "",
        append_table(appends),
        "",
        "Every round, MiB/s (the spread shows how much the load of the VM moved them): "
        + "; ".join(f"{POLICY_NAMES[a.policy].split(' / ')[0]}: zdb "
                    f"{', '.join(f'{r / MIB:,.0f}' for r in a.zdb_runs)}, dd "
                    f"{', '.join(f'{r / MIB:,.0f}' for r in a.dd_runs)}" for a in appends)
        + f". A row whose rounds differ more than {NOISE:g}-fold gives no verdict: the",
        "load of the VM, not the writers, set its ratio.",
        "",
        "Where the time of a 1 MiB append goes (perf, perf stat and strace of the native",
        "build, Mon Nov 30 2026, while other test runs loaded the VM):",
        "",
        "- The server reads the socket straight into a buffer of the value's declared size",
        "  (two reads per value: the value, then its CRLF with the next request's header,",
        "  a read of at most 4 KiB), checks the CRC-32C (hardware instruction) and hands",
        "  that same buffer to one `pwritev` with the entry header. The buffer is not",
        "  zeroed first (the socket fills it to its last byte before anything reads it),",
        "  and the data file's blocks are reserved ahead of the appends (`fallocate`,",
        "  keeping the file's size; as far ahead as the file is large, at most 64 MiB and",
        "  never past `--datasize`; given back when the file is closed), so ext4 no",
        "  longer reserves blocks inside every write: 1,000 1 MiB `pwrite`s to a new file",
        "  took 0.20 s of system time without, 0.14 s with (three runs each).",
        "- Its CPU is now mostly the two copies of every byte that receiving and writing",
        "  take (the copy out of the socket and the copy into the page cache, about 20%",
        "  each in perf), then 9% CRC; the page cache copy is dd's own work, the socket",
        "  copy and the TCP acknowledgements are what dd does not pay. Against the build",
        "  before these changes (commit 3da790e), this table's client and dd run by a",
        "  script alternating both builds and dd (five rounds, load 15, Mon Nov 30 21:42",
        "  UTC 2026): median 484 MiB/s",
        "  before, 634 MiB/s after, dd 1,504 MiB/s (0.32x before, 0.42x after); the",
        "  server's CPU per GiB 0.51-0.55 s before, 0.40-0.48 s after. That build's own",
        "  run of this table at load 2-3 (Mon Nov 30 20:12 UTC 2026) measured 1,725",
        "  against dd's 4,744 MiB/s, 0.36x, 0.48 s of server CPU per GiB.",
        "- Before (commit 1331944) each value went through three more copies in the",
        "  server's own code: uvloop's bytes object per read, the argument buffer, then",
        "  the request's bytes. With both builds alternating with dd in the same runs",
        "  (five runs, load 8-19) the server's CPU per GiB fell by 30-42% in each, from",
        "  0.91-1.72 s to 0.53-1.14 s; measured alone, 0.87-0.97 s before (load 1-2) and",
        "  0.50-0.62 s after (load 7-16).",
        "  Freed buffers of up to 16 MiB are kept for reuse (glibc `mallopt`): without",
        "  that, each 1 MiB buffer was mapped and unmapped again, about 1,000 page faults",
        "  per 1 MiB SET + GET.",
        "- One server thread does both copies one after the other, so it needs about",
        "  twice dd's CPU per byte (see the CPU column), and the client a core of its own",
        "  besides. On a quiet VM (load 1.2-1.5, Mon Nov 30 2026 22:35-22:39 UTC) the",
        "  server took 0.34-0.40 s of CPU per GiB and the ratio was 0.54x (3 rounds),",
        "  0.52x, 0.52x and 0.51x (7 rounds each, `--only appends`): at the target with",
        "  no margin. Inside the full benchmark, right after the large-value runs have",
        "  filled the page cache, the same rows gave 0.27x and 0.43x (0.48-0.49 s per",
        "  GiB; the cause was not found: each run starts after a `sync`). A",
        "  writer thread that wrote value N while the event loop received value N+1 was",
        "  built and measured (the same build with and without it, three runs each,",
        "  load 12-16): it doubled the server's CPU per GiB (0.88-1.09 s against",
        "  0.44-0.55 s) and lowered the rate (152-217 MiB/s against 345-613 MiB/s);",
        "  again at load 11 (Mon Nov 30 22:04 UTC 2026, four rounds, alternating with",
        "  the server as committed): 0.85-1.02 s against 0.45-0.46 s, 207-294 MiB/s",
        "  against 443-553 MiB/s.",
        "  Handing each value between two Python threads costs GIL hand-offs: about 11",
        "  futex calls and 6 context switches per append, against under one context",
        "  switch without the thread. On two cores shared with the client (and other",
        "  runs) that cost more than the overlap saved, so the server does not use one.",
        "- Under `--sync` the writes that arrived together share one fsync of data and index",
        "  before their replies (group commit), where `dd oflag=dsync` makes each 1 MiB",
        "  block durable on its own.",
        APPEND_END,
    ])


def write_docs(results: list[Result], large: list[Large], appends: list[Append],
               requests: int, date: str, load: str, rounds: int) -> None:
    command = " ".join(benchmark_command(0, 1, requests)).replace("-p 0 ", "-p PORT ").replace(
        "-P 1", "-P {1,16}")
    body = "\n".join([
        START,
        f"Command: `.venv/bin/python -m bench.zdb_bench` runs `{command}` against",
        "`zerostack zdb` (fresh data directory, default durability: writes reach the OS before",
        "the reply, no fsync), against `redis-server --save \"\" --appendonly no`, and against",
        "the same zerostack sources without the native build (pure-Python), in the same run,",
        "alternating their order from one round to the next; each figure is the median of",
        f"{rounds} rounds, and so is each CPU figure (the server process's user + system time",
        "over the SET and GET runs, per request, from /proc).",
        "",
        f"Machine: {MACHINE} ({platform.python_implementation()} "
        f"{platform.python_version()}), shared with other test runs (load average "
        f"{load}), so figures are noisy; compare the ratios.",
        f"Date: {date}",
        "",
        table(results),
        "",
        f"The same load, in the same run, on a server started with `--datasize "
        f"{MANY_FILES_DATASIZE}`, so its data spans many files (target: GET ratio to redis",
        f"at least {MANY_FILES_TARGET}x the single-file server's), with both servers' CPU time",
        "per request, which the load of the machine moves far less than their ops/s:",
        "",
        many_table(results),
        "",
        "Large values, against a fresh redis-server in the same run (median of "
        f"{rounds} rounds): `redis-benchmark -c C -n N -d SIZE -t set|get -P {{1,16}} -r R`",
        f"with C = {LARGE_LOAD[KIB4][2]}, N = {LARGE_LOAD[KIB4][0]:,} for 4 KiB and "
        f"C = {LARGE_LOAD[MIB][2]}, N = {LARGE_LOAD[MIB][0]:,} for 1 MiB. SET runs draw keys",
        "from 10^9 so nearly every SET stores a new key (redis-benchmark sends the same value",
        "each time, and an unchanged value is not written again); GET runs read",
        f"{LARGE_LOAD[KIB4][1]:,} (4 KiB) or {LARGE_LOAD[MIB][1]} (1 MiB) keys stored "
        "beforehand, unmeasured.",
        "",
        large_table(large),
        "",
        append_section(appends, rounds, date, load),
        "",
        "Where the time goes (perf on this VM, Mon Nov 30 2026):",
        "",
        "- `-P 16` GET: most of a GET's own time is waiting for memory, with 100,000",
        "  keys spread over more than the CPU caches hold. Through the key dictionary a GET",
        "  makes five scattered reads (the dictionary's index, entry and key object, the",
        "  index entry, the value); on this VM a random lookup in a 100,000-key Python dict",
        "  costs about 300 ns, against 60-90 ns in key order. GET asks a location cache",
        "  first (see [zdb.md](zdb.md#memory-for-reads)): one read of a 16-byte slot in huge",
        "  pages, then one of the data entry, where the key is checked next to the value.",
        "  SET writes its key's new place into that cache: before, it cleared the slot, and",
        "  in the `set,get` runs above over a third of the GETs were the first read of their",
        "  key since its SET, each through the dictionary. Where a GET's CPU goes now (perf",
        "  of the native build, `-t get -P 16` after a fill, Nov 30 2026 21:40 UTC, load",
        "  11-14): 36% kernel, nearly all of it writing the replies to the loopback socket",
        "  (TCP, netfilter; one write per connection and event-loop pass); 44% reading",
        "  values, of which 10% waits on the slot, 10-11% on the data entry, 9% goes",
        "  through the key dict (the GETs of keys never stored, e^-2 = 13.5% of them in",
        "  this load, and of keys whose slot another key holds) and 14% is interpreter work",
        "  (the slot's tuple, the slices, integers); 4% parsing; 3% building replies; the",
        "  rest the event loop and the socket reads. redis-server's profile under the same",
        "  load: 38% kernel (the same writes), 44% in its hash table and value objects",
        "  (memory misses). The cut of Nov 30 2026 21:00-22:00 UTC, in-process (parser and",
        "  engine of the native build, 200,000 SETs then 200,000 GETs of 100,000 keys in",
        "  runs of 16, CPU time, load 10-15): a GET after the SETs 1,375 -> 930 ns, a GET",
        "  with a warm cache 920 -> 850 ns, parsing a GET 110 -> 87 ns. What is left of the",
        "  gap to redis-server is the interpreter's work per GET (objects for the slot, the",
        "  slices and the request), about as much as redis-server spends in all of its user",
        "  code.",
        "- Many files: GET reads an older file's entries through maps made once per file",
        "  (index at load, data on first read), so its CPU time per request is that of the",
        "  single-file server (see the CPU column); the ops/s ratio moves with the load of",
        "  the machine between the two runs.",
        "- The 1 MiB rows of the large-value table are limited by redis-benchmark itself",
        "  (redis-server reaches only a few hundred MiB/s under it too); see the appends",
        "  above for the server's own rate with large values.",
        "- `-P 1`: each request costs a server one read and one write on a loopback TCP",
        "  socket, 5-6.5 µs of kernel time in redis-server and in ours alike (measured on",
        "  2026-11-25), and the redis-benchmark client about 10 µs, so on two cores the",
        "  client limits both servers. The request path (parser, connection, GET and SET,",
        "  engine) is compiled with mypyc from the same typed sources (see",
        "  [zdb.md](zdb.md#native-build)); the pure-Python columns are the same sources",
        "  without the native build, run alongside.",
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


def write_append_docs(appends: list[Append], rounds: int, date: str, load: str) -> None:
    """Rewrite only the appends part of docs/benchmarks.md's block (`--only appends`)."""
    text = DOC.read_text()
    if APPEND_START not in text or APPEND_END not in text:
        raise SystemExit(f"{DOC.relative_to(REPO)} has no appends part yet: run the full "
                         "benchmark once")
    body = append_section(appends, rounds, date, load)
    text = re.sub(re.escape(APPEND_START) + r".*?" + re.escape(APPEND_END), lambda _: body,
                  text, flags=re.DOTALL)
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000, help="redis-benchmark -n")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server, median kept")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--only", choices=["appends"],
                        help="run only these rows; only their part of docs/benchmarks.md "
                             "is rewritten")
    parser.add_argument("--table-only", type=int, choices=(1, 16), action="append",
                        metavar="PIPELINE", help="measure only the 64-byte table's rows of "
                        "this -P (1 or 16; repeatable), print them, leave the docs alone")
    args = parser.parse_args()
    if args.table_only:
        with tempfile.TemporaryDirectory(prefix="zdb-bench-") as tmp:
            rows = measure(args.requests, Path(tmp), args.rounds, tuple(args.table_only))
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"\n{table(rows)}\n\n{many_table(rows)}\n\nload average at the end: {load}")
        return
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    if args.only == "appends":
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"{date}, load {load}", flush=True)
        with tempfile.TemporaryDirectory(prefix="zdb-bench-") as tmp:
            appends = measure_append(Path(tmp), args.rounds)
        after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        load = f"{load} when the run started, {after} when it ended"
        print(f"\nload {load}\n")
        print(append_table(appends))
        if not args.no_docs:
            write_append_docs(appends, args.rounds, date, load)
            print(f"\nwrote the appends part of {DOC.relative_to(REPO)}")
        return
    for tool in ("redis-benchmark", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/install-system-deps")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="zdb-bench-") as tmp:
        results = measure(args.requests, Path(tmp), args.rounds)
        large = measure_large(Path(tmp), args.rounds)
        appends = measure_append(Path(tmp), args.rounds)
    after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    load = f"{load} when the run started, {after} when it ended"
    print()
    for text in (table(results), many_table(results), large_table(large),
                 append_table(appends)):
        print(text + "\n")
    if not args.no_docs:
        write_docs(results, large, appends, args.requests, date, load, args.rounds)
        print(f"\nwrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
