"""Zero-DB engine restart benchmark: load time and resident memory per key, vs redis-server.

Writes N keys (16-byte keys, 64-byte values) with the engine, then opens the files in a
fresh process and measures the load time and RSS growth. In the same run, redis-server
(`--save "" --appendonly no`) gets the same keys through a pipelined client; we measure its
RSS growth, then its restart time from an RDB of those keys, and print the ratios.

    .venv/bin/python -m bench.zdb_load [--keys 1000000] [--runs 3] [--compact]

--compact then overwrites every key once and times an offline compaction that keeps only
the live values (there is no redis-server equivalent to compare with).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port

KEY = b"%016d"
VALUE_SIZE = 64
TARGET_LOAD_S = 3.0
TARGET_BYTES_PER_KEY = 200


def rss_of(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and its anonymous/file parts in bytes, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            out[name] = int(rest.split()[0]) * 1024
    return out


def value_for(i: int) -> bytes:
    return (b"%064d" % (i * 7919))[-VALUE_SIZE:]


def write_engine(root: Path, n: int) -> float:
    from zerostack.zdb.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index"))
    ns = engine.namespace("default")
    start = time.perf_counter()
    for i in range(n):
        ns.set(KEY % i, value_for(i))
        if i & 1023 == 1023:
            engine.flush_all()
    engine.flush_all()
    engine.close()
    return time.perf_counter() - start


def measure_load(root: Path) -> dict[str, Any]:
    """Runs in a fresh interpreter: open the engine and report time and memory."""
    from zerostack.zdb.engine import Engine, EngineConfig

    before = rss_of()
    cpu0, t0 = time.process_time(), time.perf_counter()
    engine = Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = rss_of()
    ns = engine.namespace("default")
    keys = ns.dbsize()
    assert ns.get(KEY % (keys - 1)) == value_for(keys - 1)
    return {"keys": keys, "wall_s": wall, "cpu_s": cpu,
            "rss_growth": after["VmRSS"] - before["VmRSS"],
            "anon_growth": after["RssAnon"] - before["RssAnon"]}


def bench_compaction(root: Path, n: int) -> dict[str, float]:
    from zerostack.zdb.engine import Engine, EngineConfig
    from zerostack.zdb.engine.compact import compact_namespace

    engine = Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index"))
    ns = engine.create_namespace("compact")
    for rnd in range(2):  # every key written twice: half of the files is garbage
        for i in range(n):
            ns.set(KEY % i, value_for(i + rnd))
            if i & 1023 == 1023:
                engine.flush_all()
    engine.close()
    cpu0 = time.process_time()
    report = compact_namespace(root / "index", root / "data", "compact", keep_history=0)
    return {"seconds": report.seconds, "cpu": time.process_time() - cpu0,
            "before": report.bytes_before, "after": report.bytes_after}


def engine_load(root: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.zdb_load", "--measure", str(root)],
                         check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return dict(json.loads(out.stdout))


def start_redis(workdir: Path, port: int, dbfile: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir),
                             "--dbfilename", dbfile, "--logfile", str(workdir / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logged_load_time(workdir: Path) -> float | None:
    """The load time redis-server reports itself ("DB loaded from disk: 0.123 seconds")."""
    found = re.findall(r"DB loaded from disk: ([0-9.]+) seconds",
                       (workdir / "redis.log").read_text(errors="replace"))
    return float(found[-1]) if found else None


def wait_pong(port: int, timeout: float = 120.0) -> float:
    """Seconds until redis answers PING with PONG (it answers -LOADING while loading)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                while time.perf_counter() - start < timeout:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return time.perf_counter() - start
                    time.sleep(0.005)
        except OSError:
            time.sleep(0.005)
    raise TimeoutError(f"redis-server on {port} did not answer")


def redis_command(port: int, *args: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        return s.recv(1 << 16)


def fill_redis(port: int, n: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        batch = 10_000
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            s.sendall(b"".join(
                b"*3\r\n$3\r\nSET\r\n$16\r\n%s\r\n$%d\r\n%s\r\n" % (KEY % i, VALUE_SIZE, value_for(i))
                for i in range(start, stop)))
            want = 5 * (stop - start)  # "+OK\r\n" per command
            got = 0
            while got < want:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("redis-server closed the connection")
                got += len(chunk)


def bench_redis(workdir: Path, n: int, runs: int) -> dict[str, Any]:
    port = free_port()
    proc = start_redis(workdir, port, "dump.rdb")
    try:
        wait_pong(port)
        empty = rss_of(proc.pid)["VmRSS"]
        fill_redis(port, n)
        full = rss_of(proc.pid)["VmRSS"]
        redis_command(port, b"SAVE")
    finally:
        proc.terminate()
        proc.wait()
    loads: list[float] = []
    baseline: list[float] = []
    logged: list[float] = []
    for _ in range(runs):
        for dbfile, out in (("none.rdb", baseline), ("dump.rdb", loads)):
            port = free_port()
            proc = start_redis(workdir, port, dbfile)
            try:
                out.append(wait_pong(port))
                if dbfile == "dump.rdb":
                    loaded = rss_of(proc.pid)["VmRSS"]
                    reported = logged_load_time(workdir)
                    if reported is not None:
                        logged.append(reported)
            finally:
                proc.terminate()
                proc.wait()
    return {"load_s": statistics.median(loads) - statistics.median(baseline),
            "logged_s": min(logged) if logged else float("nan"),
            "bytes_per_key_filled": (full - empty) / n,
            "bytes_per_key_loaded": (loaded - empty) / n,
            "rdb_bytes": (workdir / "dump.rdb").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compact", action="store_true", help="also time a compaction")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure_load(args.measure)))
        return
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is missing: run scripts/install-system-deps")
    with tempfile.TemporaryDirectory(prefix="zdb-load-") as tmp:
        root = Path(tmp)
        print(f"writing {args.keys} keys (16-byte keys, {VALUE_SIZE}-byte values) ...",
              flush=True)
        write_s = write_engine(root / "zdb", args.keys)
        files = sum(p.stat().st_size for p in (root / "zdb").rglob("*") if p.is_file())
        loads = [engine_load(root / "zdb") for _ in range(args.runs)]
        ours = min(loads, key=lambda r: float(r["wall_s"]))
        ours_bpk = statistics.median(float(r["rss_growth"]) for r in loads) / args.keys
        anon_bpk = statistics.median(float(r["anon_growth"]) for r in loads) / args.keys
        (root / "redis").mkdir()
        print("filling redis-server with the same keys ...", flush=True)
        redis = bench_redis(root / "redis", args.keys, args.runs)
        compaction = bench_compaction(root / "zdb", args.keys) if args.compact else None
    print()
    print(f"engine write: {write_s:.2f} s ({args.keys / write_s:,.0f} sets/s, one flush per "
          f"1024 sets), files {files / 1e6:.1f} MB")
    print("| measure | zerostack engine | redis-server | ratio (ours / redis) | target |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| restart load, {args.keys:,} keys | {ours['wall_s']:.2f} s "
          f"(cpu {ours['cpu_s']:.2f} s) | {redis['load_s']:.2f} s to first PONG, "
          f"{redis['logged_s']:.2f} s by its log (RDB {redis['rdb_bytes'] / 1e6:.0f} MB) | "
          f"{ours['wall_s'] / redis['load_s']:.2f} (vs log: "
          f"{ours['wall_s'] / redis['logged_s']:.2f}) | "
          f"<= {TARGET_LOAD_S:.0f} s: {'met' if ours['wall_s'] <= TARGET_LOAD_S else 'MISSED'} |")
    print(f"| RSS growth per key | {ours_bpk:.0f} B (anon {anon_bpk:.0f} B) | "
          f"{redis['bytes_per_key_loaded']:.0f} B after RDB load, "
          f"{redis['bytes_per_key_filled']:.0f} B filled live | "
          f"{ours_bpk / redis['bytes_per_key_loaded']:.2f} | <= {TARGET_BYTES_PER_KEY} B: "
          f"{'met' if ours_bpk <= TARGET_BYTES_PER_KEY else 'MISSED'} |")
    print(f"runs: {[round(float(r['wall_s']), 2) for r in loads]} s")
    if compaction is not None:
        c = compaction
        print(f"compaction, {args.keys:,} keys written twice, keep live values only: "
              f"{c['seconds']:.2f} s (CPU {c['cpu']:.2f} s), {c['before'] / 1e6:.0f} MB -> "
              f"{c['after'] / 1e6:.0f} MB, {c['before'] / c['seconds'] / 1e6:.1f} MB/s read, "
              f"{(c['before'] - c['after']) / 1e6:.0f} MB reclaimed")


if __name__ == "__main__":
    main()
