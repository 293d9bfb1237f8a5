"""Zero-DB write throughput and p99 latency with no replication, async replication and
--min-replicas majority (3 nodes, same run), and failover time (PROMOTE by vote) over
repeated cuts; writes its section of docs/benchmarks.md.

usage: .venv/bin/python -m bench.zdb_failover_bench [--requests N] [--rounds N] [--cuts N]
       [--before SRC] [--no-docs]
       .venv/bin/python -m bench.zdb_failover_bench --etcd [--cuts N] [--no-docs]
Throughput: `redis-benchmark -c 50 -n N -d 64 -r 100000 -t set -P 16 --csv` against the
primary, the three settings alternating per round (fresh servers on 127.0.0.1 each time).
`--before SRC` adds async and majority rounds of another source tree (SRC/src on the
servers' PYTHONPATH, e.g. an export of an older commit with its built extensions), run in
the same rounds, to compare a change before and after under the same load. `--cuts 0`
skips the failover part.
Failover: a 3-node set with --min-replicas majority; the primary is stopped (SIGSTOP: it
hangs, connections stay open), PROMOTE is sent to a replica at once, and the time runs
from the stop to the first SET the new primary accepts. The old primary is then resumed,
turns into a replica of the new term, and the next cut stops the new primary.

With --etcd: automatic failover on an etcd lease (--failover-etcd, one etcd-server on
127.0.0.1): the same cuts (SIGSTOP of the primary), but nobody calls PROMOTE; the time runs
from the stop to the first SET a replica accepts once it took the lease. Written to its
own part of the section.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import free_port, wait_port, write_block
from bench.zdb_replication_bench import stop
from zerostack.zdb.replication.handshake import call

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Zero-DB failover: majority writes and promotion time"
START, END = "<!-- zdb-failover:start -->", "<!-- zdb-failover:end -->"
ETCD_START, ETCD_END = "<!-- zdb-failover-etcd:start -->", "<!-- zdb-failover-etcd:end -->"
TTL, MARGIN = 2, 0.5
MACHINE = "2-core Debian 12 VM, Python 3.11"
ZEROSTACK = [str(Path(sys.executable).parent / "zerostack")]
PASSWORD = "bench"
THROUGHPUT_TARGET = 0.5   # majority / async
FAILOVER_TARGET = 5.0     # seconds, p99


class Node:
    def __init__(self, root: Path, port: int, args: list[str], src: Path | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log = open(root / "zdb.log", "ab")  # noqa: SIM115 - lives with the process
        env = dict(os.environ)
        if src is not None:  # run that tree's zerostack instead of this one
            env["PYTHONPATH"] = str(src / "src")
        self.proc = subprocess.Popen(
            [*ZEROSTACK, "zdb", "--listen", "127.0.0.1", "--port", str(port), "--data",
             str(root / "data"), "--index", str(root / "index"), *args],
            stdout=self.log, stderr=self.log, env=env)
        wait_port(port, self.proc)

    def client(self) -> redis.Redis:
        r = redis.Redis(port=self.port, socket_timeout=10)
        r.response_callbacks.clear()
        return r

    def info(self) -> dict[str, str]:
        text = self.client().execute_command("INFO").decode()
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def cluster(work: Path, count: int, extra: list[str], src: Path | None = None) -> list[Node]:
    ports = [free_port() for _ in range(count)]
    nodes = []
    for i, port in enumerate(ports):
        args = ["--replication-password", PASSWORD, "--advertise", f"127.0.0.1:{port}", *extra]
        if count > 1:
            args += ["--peers", ",".join(f"127.0.0.1:{p}" for p in ports if p != port)]
        if i:
            args += ["--replica-of", f"127.0.0.1:{ports[0]}"]
        nodes.append(Node(work / f"n{i}", port, args, src))
    deadline = time.monotonic() + 30
    while count > 1 and nodes[0].info().get("connected_replicas") != str(count - 1):
        if time.monotonic() > deadline:
            raise RuntimeError("replicas did not attach")
        time.sleep(0.05)
    return nodes


def load(port: int, requests: int) -> tuple[float, float]:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests),
                          "-d", "64", "-r", "100000", "-t", "set", "-P", "16", "--csv"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "SET":
            return float(cells[1]), float(cells[6])
    raise RuntimeError(f"no SET figure in redis-benchmark output:\n{out}")


def throughput(work: Path, requests: int, rounds: int, before: Path | None = None
               ) -> dict[str, list[tuple[float, float]]]:
    majority = ["--min-replicas", "majority"]
    settings: dict[str, tuple[int, list[str], Path | None]] = {
        "none": (1, [], None), "async": (3, [], None), "majority": (3, majority, None)}
    if before is not None:
        settings["async-before"] = (3, [], before)
        settings["majority-before"] = (3, majority, before)
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}
    for r in range(rounds):
        for name, (count, extra, src) in settings.items():
            nodes = cluster(work / f"t{r}-{name}", count, extra, src)
            try:
                out[name].append(load(nodes[0].port, requests))
            finally:
                for n in nodes:
                    stop(n.proc)
            print(f"round {r + 1} {name}: {out[name][-1][0]:,.0f} SET/s, "
                  f"p99 {out[name][-1][1]:.2f} ms", flush=True)
    return out


def failover(work: Path, cuts: int) -> list[float]:
    nodes = cluster(work / "failover", 3, ["--min-replicas", "majority",
                                            "--min-replicas-timeout", "2"])
    times: list[float] = []
    try:
        primary = nodes[0]
        for i in range(cuts):
            primary.client().execute_command("SET", f"before{i}", "x")
            others = [n for n in nodes if n is not primary]
            os.kill(primary.proc.pid, signal.SIGSTOP)
            cut = time.monotonic()
            winner = None
            while winner is None:
                for node in others:
                    said = call("127.0.0.1", node.port, PASSWORD, (b"PROMOTE",))[0]
                    if said == b"OK":
                        winner = node
                        break
            c = winner.client()
            while True:
                try:
                    if c.execute_command("SET", f"after{i}", "y") == f"after{i}".encode():
                        break
                except redis.ResponseError:
                    time.sleep(0.01)
            times.append(time.monotonic() - cut)
            rejoin(primary, winner)
            print(f"cut {i + 1}: first write on the new primary after {times[-1]:.3f} s",
                  flush=True)
            primary = winner
    finally:
        for n in nodes:
            os.kill(n.proc.pid, signal.SIGCONT)
            stop(n.proc)
    return times


def rejoin(primary: Node, winner: Node) -> None:
    """Resume the stopped old primary and wait until it follows the new one."""
    os.kill(primary.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while not (primary.info().get("role") == "replica"
               and winner.info().get("connected_replicas") == "2"):
        if time.monotonic() > deadline:
            raise RuntimeError("the old primary did not rejoin")
        time.sleep(0.05)


def failover_etcd(work: Path, cuts: int) -> list[float]:
    """--failover-etcd: SIGSTOP the primary, time until a replica took the lease and
    accepts a write; resume the old primary (it turns into a replica) and cut again."""
    from bench.zdb_partition import etcd_command, etcd_ready

    client_port, peer_port = free_port(), free_port()
    (work / "etcd").mkdir(parents=True, mode=0o700)
    with open(work / "etcd.log", "ab") as out:
        etcd = subprocess.Popen(etcd_command(work / "etcd", "127.0.0.1", client_port, peer_port),
                                stdout=out, stderr=out)
    url = f"http://127.0.0.1:{client_port}"
    nodes: list[Node] = []
    times: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while not etcd_ready(url):
            if time.monotonic() > deadline:
                raise RuntimeError("etcd did not start")
            time.sleep(0.1)
        nodes = cluster(work / "failover-etcd", 3, [
            "--min-replicas", "majority", "--min-replicas-timeout", "2", "--failover-etcd",
            url, "--failover-ttl", str(TTL), "--failover-margin", str(MARGIN)])
        primary = nodes[0]
        while primary.info().get("etcd_holding") != "yes":
            time.sleep(0.05)
        for i in range(cuts):
            primary.client().execute_command("SET", f"before{i}", "x")
            others = [n for n in nodes if n is not primary]
            os.kill(primary.proc.pid, signal.SIGSTOP)
            cut = time.monotonic()
            winner = None
            while winner is None:
                if time.monotonic() - cut > 60:
                    raise RuntimeError("no replica took over")
                for node in others:
                    try:
                        if node.client().execute_command("SET", f"after{i}", f"y{node.port}") \
                                == f"after{i}".encode():
                            winner = node
                            break
                    except redis.ResponseError:
                        continue
                time.sleep(0.005)
            times.append(time.monotonic() - cut)
            rejoin(primary, winner)
            print(f"cut {i + 1}: first write on the new primary after {times[-1]:.3f} s",
                  flush=True)
            primary = winner
    finally:
        for n in nodes:
            os.kill(n.proc.pid, signal.SIGCONT)
            stop(n.proc)
        etcd.kill()
        etcd.wait()
    return times


def etcd_main(cuts: int, docs: bool) -> None:
    load_avg = os.getloadavg()
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="zdb-failover-etcd-") as tmp:
        times = failover_etcd(Path(tmp) / "etcd", cuts)
        # the reference, same run: the same cuts with PROMOTE sent at once (no detection)
        manual = failover(Path(tmp) / "manual", cuts)
    p50, p99 = pct(times, 50), pct(times, 99)
    m50, m99 = pct(manual, 50), pct(manual, 99)
    text = f"""### Automatic failover on etcd

Command: `.venv/bin/python -m bench.zdb_failover_bench --etcd --cuts {cuts}`. 3 nodes
with `--min-replicas majority --failover-etcd URL --failover-ttl {TTL} --failover-margin
{MARGIN}` on 127.0.0.1, one etcd-server {_etcd_version()} member on 127.0.0.1. Each cut
stops the primary (SIGSTOP: it answers nobody, its lease is no longer renewed); nobody
calls `PROMOTE`; the time runs from the stop to the first SET a replica accepts (polled
every 5 ms). The old primary then resumes, finds its lease gone, is fenced and turns
into a replica of the new term; the next cut stops the new primary.

Machine: {MACHINE} (CPython {platform.python_version()}), shared with other work (load
average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} when the run started). Date: {date}

| figure | value | target | |
| --- | ---: | ---: | --- |
| failover (etcd lease, TTL {TTL} s), p50 / p99 over {len(times)} cuts | {p50:.3f} / {p99:.3f} s | p99 {FAILOVER_TARGET:.0f} s | {"meets" if p99 <= FAILOVER_TARGET else "misses"} |
| fastest / slowest cut | {min(times):.3f} / {max(times):.3f} s | | |
| reference: `PROMOTE` sent at the stop, p50 / p99 | {m50:.3f} / {m99:.3f} s | | |
| etcd lease / reference, p50 | {p50 / m50:.1f}x | | |
| p50 over the TTL | {p50 / TTL:.2f}x | | |

Each cut: {", ".join(f"{t:.2f}" for t in times)} s. The reference is the same cuts in the same
run with an operator's `PROMOTE` (by vote) sent the moment the primary stops: it is the
promotion alone, so the difference is the time to notice that the primary is gone.

Where the time goes: the lease runs out up to {TTL} s after the last keepalive etcd
received (keepalives every {TTL / 5:.1f} s, so {TTL - TTL / 5:.1f} to {TTL} s after the stop),
etcd notices an expired lease within 0.5 s, the replicas' watch sees the key go at once,
they wait 0.25 s for each other's candidacy, and the best one takes the key and wins the
vote (milliseconds: the stopped node's vote is not waited for once the other replica
agreed).
"""
    print(text)
    if docs:  # after the majority-writes block when it is there
        write_block(DOC, ETCD_START, ETCD_END, text, SECTION, after=END)


def _etcd_version() -> str:
    try:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except OSError:
        return "?"
    return out.split()[2] if len(out.split()) > 2 else "?"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def write_doc(text: str) -> None:
    write_block(DOC, START, END, text, SECTION)


def ratios(rates: dict[str, list[tuple[float, float]]], a: str, b: str) -> list[float]:
    """a/b per round (the settings of one round ran back to back, under similar load)."""
    return [x[0] / y[0] for x, y in zip(rates[a], rates[b], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cuts", type=int, default=20)
    parser.add_argument("--before", type=Path, default=None,
                        help="another source tree to compare with (its src/ is used)")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--etcd", action="store_true",
                        help="measure automatic failover on an etcd lease only")
    args = parser.parse_args()
    if args.etcd:
        etcd_main(args.cuts, not args.no_docs)
        return
    load_start = os.getloadavg()
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="zdb-failover-bench-") as tmp:
        rates = throughput(Path(tmp), args.requests, args.rounds, args.before)
        times = failover(Path(tmp), args.cuts) if args.cuts > 0 else []
    load_end = os.getloadavg()
    best = {k: max(v, key=lambda x: x[0]) for k, v in rates.items()}
    med99 = {k: statistics.median(p for _r, p in v) for k, v in rates.items()}
    per_round = ratios(rates, "majority", "async")
    ratio = statistics.median(per_round)
    command = (f"`.venv/bin/python -m bench.zdb_failover_bench --requests {args.requests} "
               f"--rounds {args.rounds} --cuts {args.cuts}"
               + (" --before SRC" if args.before else "") + "`")
    rows = [
        f"| SET/s, no replication | {best['none'][0]:,.0f} (p99 {med99['none']:.2f} ms) | | |",
        f"| SET/s, 2 async replicas | {best['async'][0]:,.0f} (p99 {med99['async']:.2f} ms) | | |",
        f"| SET/s, 2 replicas, `--min-replicas majority` | {best['majority'][0]:,.0f} "
        f"(p99 {med99['majority']:.2f} ms) | | |",
        f"| majority / async throughput, median of the rounds' ratios | {ratio:.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)}) | {THROUGHPUT_TARGET:.2f}x | "
        f"{'meets' if ratio >= THROUGHPUT_TARGET else 'misses'} |",
        f"| majority / async throughput, best rounds | "
        f"{best['majority'][0] / best['async'][0]:.2f}x | | |",
        f"| async / none throughput, median of the rounds' ratios | "
        f"{statistics.median(ratios(rates, 'async', 'none')):.2f}x | | |",
    ]
    if args.before is not None:
        before = ratios(rates, "majority-before", "async-before")
        rows += [
            f"| before: SET/s, 2 async replicas | {best['async-before'][0]:,.0f} "
            f"(p99 {med99['async-before']:.2f} ms) | | |",
            f"| before: SET/s, `--min-replicas majority` | {best['majority-before'][0]:,.0f} "
            f"(p99 {med99['majority-before']:.2f} ms) | | |",
            f"| before: majority / async, median of the rounds' ratios | "
            f"{statistics.median(before):.2f}x (rounds: "
            f"{', '.join(f'{r:.2f}' for r in before)}) | | |",
            f"| majority after / majority before, median of the rounds' ratios | "
            f"{statistics.median(ratios(rates, 'majority', 'majority-before')):.2f}x | | |",
        ]
    if times:
        p50, p99 = pct(times, 50), pct(times, 99)
        rows.append(f"| failover (PROMOTE by vote), p50 / p99 over {len(times)} cuts | "
                    f"{p50:.3f} / {p99:.3f} s | p99 {FAILOVER_TARGET:.0f} s | "
                    f"{'meets' if p99 <= FAILOVER_TARGET else 'misses'} |")
    per = " / ".join(rates)
    listing = ", ".join(" / ".join(f"{rates[k][i][0]:,.0f}" for k in rates)
                        for i in range(args.rounds))
    failover_text = ("" if not times else """
Failover: 3 nodes with `--min-replicas majority` on 127.0.0.1; the primary is stopped
(SIGSTOP), `PROMOTE` (by vote, no FORCE) is sent to a replica at once; time from the stop
to the first SET the new primary accepts; the old primary then resumes, turns into a
replica, and the next cut stops the new one.
""")
    before_text = ("" if args.before is None else """
`before` rows: the same rounds run the servers of another source tree (`--before SRC`,
with its own native build; the text after this block says which), alternating with the
current one, so both see the same load.
""")
    text = f"""Command: {command} ({args.rounds} rounds of `redis-benchmark -c 50 -n
{args.requests} -d 64 -r 100000 -t set -P 16` against a fresh primary: alone, with two
async replicas, with two replicas and `--min-replicas majority`, one after the other in
each round; ratios are taken within a round, the reported ratio is their median; SET/s
is the best round, p99 the median of the rounds' p99).
{before_text}{failover_text}
Machine: {MACHINE} (CPython {platform.python_version()}), shared with other work (load
average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} when the run started,
{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} when it ended); all nodes and
redis-benchmark share the 2 cores. Date: {date}

| figure | value | target | |
| --- | ---: | ---: | --- |
{chr(10).join(rows)}

Per round (SET/s {per}): {listing}.
"""
    print(text)
    if not args.no_docs:
        write_doc(text)


if __name__ == "__main__":
    main()
