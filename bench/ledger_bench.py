"""Ledger benchmark: accepted tx/s through the HTTP API vs raw PyNaCl verifications/s,
node-query latency with 10,000 nodes, and start-up time on a big ledger.

    .venv/bin/python -m bench.ledger_bench [--txs 20000] [--nodes 10000] [--json]
        [--before-src DIR] [--rounds 2] [--startup 50000]

Runs a real `zerostack ledger serve` on loopback with a fresh SQLite file. Every
transaction is signed before the clock starts, so the figures are the server's. With
`--before-src` (the `src` dir of another zerostack version, e.g. an extracted older
commit) the submission runs and the start-up are measured on both, alternating, in the
same run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import nacl.signing
import orjson

from bench.common import free_port, ledger_server, start, stop, zerostack_cli
from zerostack.crypto import Identity
from zerostack.ledger.tx import sign_tx

GiB = 1 << 30
COUNTRIES = [a + b for a in "ABCDE" for b in "ABCDEFGHIJ"]  # 50 two-letter codes


def raw_verify_rate(n: int = 5000) -> float:
    """PyNaCl ed25519 verifications per second, one thread, distinct keys and messages."""
    keys = [nacl.signing.SigningKey.generate() for _ in range(64)]
    items = []
    for i in range(n):
        k = keys[i % len(keys)]
        msg = os.urandom(32)
        items.append((k.verify_key, msg, k.sign(msg).signature))
    start = time.perf_counter()
    for vk, msg, sig in items:
        vk.verify(msg, sig)
    return n / (time.perf_counter() - start)


def post_batches(url: str, bodies: list[bytes]) -> int:
    """POST pre-encoded batches one after the other; returns the accepted count."""
    accepted = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        for body in bodies:
            r = http.post("/txs", content=body, headers={"content-type": "application/json"})
            r.raise_for_status()
            results = r.json()["results"]
            bad = [x for x in results if "error" in x]
            if bad:
                raise RuntimeError(f"{len(bad)} transactions refused, first: {bad[0]}")
            accepted += len(results)
    return accepted


def register_twins(url: str, idents: list[Identity]) -> list[int]:
    txs = [sign_tx(i, "twin.register", i.public_hex, 0, {}) for i in idents]
    ids: list[int] = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for k in range(0, len(txs), 1000):
            r = http.post("/txs", content=orjson.dumps(txs[k:k + 1000]),
                          headers={"content-type": "application/json"})
            ids.extend(int(x["receipt"]["twin"]) for x in r.json()["results"])
    return ids


def batch_throughput(url: str, total: int, workers: int = 4, batch: int = 1000) -> float:
    """Accepted tx/s with batch submission from `workers` concurrent connections."""
    senders = 64 * workers
    idents = [Identity.generate() for _ in range(senders)]
    twins = register_twins(url, idents)
    per_sender = total // senders
    # worker w owns senders w, w+workers, ...; its batches keep each sender's nonces in order
    plans: list[list[bytes]] = []
    for w in range(workers):
        mine = list(range(w, senders, workers))
        txs = [sign_tx(idents[s], "name.register", twins[s], 1 + n, {"name": f"b{s}-{n}"})
               for n in range(per_sender) for s in mine]
        plans.append([orjson.dumps(txs[k:k + batch]) for k in range(0, len(txs), batch)])
    counts = [0] * workers

    def run(w: int) -> None:
        counts[w] = post_batches(url, plans[w])

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: httpx's own per-request
    cost would otherwise dominate a single-transaction benchmark on two cores."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s"
            % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def single_throughput(url: str, total: int, concurrency: int = 32) -> tuple[float, float, float]:
    """Accepted tx/s with one transaction per request from `concurrency` connections,
    and the p50/p99 latency (ms) of one request."""
    idents = [Identity.generate() for _ in range(concurrency)]
    twins = register_twins(url, idents)
    per = total // concurrency
    bodies = [[orjson.dumps(sign_tx(idents[c], "name.register", twins[c], 1 + n,
                                    {"name": f"s{c}-{n}"})) for n in range(per)]
              for c in range(concurrency)]
    latencies: list[float] = []

    async def client(mine: list[bytes]) -> None:
        http = RawHttp(url)
        try:
            for body in mine:
                t0 = time.perf_counter()
                status, answer = await http.post("/tx", body)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(answer.decode())
        finally:
            await http.close()

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(b) for b in bodies))
        return per * concurrency / (time.perf_counter() - start)

    rate = asyncio.run(main())
    q = statistics.quantiles(latencies, n=100)
    return rate, q[49] * 1000, q[98] * 1000


def register_nodes(url: str, count: int) -> None:
    """`count` nodes spread over 50 countries, with varied memory and some usage."""
    rng = random.Random(7)
    idents = [Identity.generate() for _ in range(count + 1)]
    twins = register_twins(url, idents)
    farmer, farmer_twin = idents[0], twins[0]
    post_batches(url, [orjson.dumps([sign_tx(farmer, "farm.create", farmer_twin, 1,
                                             {"name": "bench"})])])
    txs = []
    for ident, twin in zip(idents[1:], twins[1:], strict=True):
        txs.append(sign_tx(ident, "node.register", twin, 1, {
            "farm": 1,
            "capacity": {"cru": rng.choice([4, 8, 16, 32]), "mru": rng.randint(1, 64) * GiB,
                         "sru": 512 * GiB, "hru": 4096 * GiB},
            "location": {"country": rng.choice(COUNTRIES), "city": "x"},
        }))
    beats = [sign_tx(ident, "node.heartbeat", twin, 2,
                     {"used": {"mru": rng.randint(0, 8) * GiB}})
             for ident, twin in zip(idents[1:], twins[1:], strict=True)]
    post_batches(url, [orjson.dumps(txs[k:k + 1000]) for k in range(0, len(txs), 1000)])
    post_batches(url, [orjson.dumps(beats[k:k + 1000]) for k in range(0, len(beats), 1000)])


def query_latency(url: str, queries: int = 1000) -> tuple[float, float, float]:
    """p50/p99 (ms) of GET /nodes?country=X&free_mru=N (all matches), and mean matches.
    The stdlib http.client keeps the client's own cost per request small."""
    rng = random.Random(11)
    times: list[float] = []
    matches: list[int] = []
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for _ in range(queries):
            query = urlencode({"country": rng.choice(COUNTRIES),
                               "free_mru": rng.randint(1, 48) * GiB, "limit": 10000})
            t0 = time.perf_counter()
            conn.request("GET", "/nodes?" + query)
            response = conn.getresponse()
            body = response.read()
            times.append(time.perf_counter() - t0)
            if response.status != 200:
                raise RuntimeError(body.decode())
            matches.append(len(orjson.loads(body)))
    finally:
        conn.close()
    q = statistics.quantiles(times, n=100)
    return q[49] * 1000, q[98] * 1000, statistics.mean(matches)


def startup_times(total: int, src: Path | None) -> dict[str, float]:
    """Seconds from `ledger serve` to a listening socket on a ledger of `total`
    transactions (batches of 1,000, so about total/1,000 blocks): as written, and,
    when the file has a checkpoint table, with the checkpoint removed (every signature
    checked again)."""
    tmp = Path(tempfile.mkdtemp(prefix="zs-bench-startup-"))
    db = tmp / "ledger.db"

    def serve() -> tuple[str, Any, float]:
        port = free_port()
        t0 = time.perf_counter()
        proc = start([*zerostack_cli(), "ledger", "serve", "--db", str(db),
                      "--listen", f"127.0.0.1:{port}"], port, src=src)
        return f"http://127.0.0.1:{port}", proc, time.perf_counter() - t0

    out: dict[str, float] = {}
    try:
        url, proc, _ = serve()
        senders = 100
        idents = [Identity.generate() for _ in range(senders)]
        twins = register_twins(url, idents)
        txs = [sign_tx(idents[i % senders], "name.register", twins[i % senders],
                       1 + i // senders, {"name": f"n{i}"}) for i in range(total)]
        post_batches(url, [orjson.dumps(txs[k:k + 1000]) for k in range(0, total, 1000)])
        stop(proc)
        url, proc, out["startup_s"] = serve()
        stop(proc)
        with sqlite3.connect(db) as conn:
            has_checkpoint = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'checkpoint'").fetchone()[0]
            if has_checkpoint:
                conn.execute("DELETE FROM checkpoint")
        if has_checkpoint:
            url, proc, out["startup_full_check_s"] = serve()
            stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def submission(src: Path | None, txs: int, single: int) -> dict[str, float]:
    with ledger_server(src=src) as url:
        batch = batch_throughput(url, txs)
        rate, p50, p99 = single_throughput(url, single)
    return {"batch_tx_per_s": batch, "single_tx_per_s": rate, "single_latency_ms_p50": p50,
            "single_latency_ms_p99": p99}


def compare(args: argparse.Namespace) -> None:
    """The same submission runs (and start-up) on the old and the new sources, alternating."""
    before_src = Path(args.before_src).resolve()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        runs["before"].append(submission(before_src, args.txs, args.single))
        runs["after"].append(submission(None, args.txs, args.single))
    results: dict[str, Any] = {"rounds": runs}
    for key in ("batch_tx_per_s", "single_tx_per_s", "single_latency_ms_p50",
                "single_latency_ms_p99"):
        before = statistics.median(r[key] for r in runs["before"])
        after = statistics.median(r[key] for r in runs["after"])
        results[key] = {"before": before, "after": after, "ratio": after / before}
    if args.startup:
        results["startup_before"] = startup_times(args.startup, before_src)
        results["startup_after"] = startup_times(args.startup, None)
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        return
    for key in ("batch_tx_per_s", "single_tx_per_s", "single_latency_ms_p50",
                "single_latency_ms_p99"):
        r = results[key]
        print(f"{key:<24} before {r['before']:9.1f}  after {r['after']:9.1f}  "
              f"after/before {r['ratio']:.2f}")
    if args.startup:
        print(f"start-up, {args.startup} txs: before {results['startup_before']}, "
              f"after {results['startup_after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--txs", type=int, default=20000, help="transactions for batch runs")
    parser.add_argument("--single", type=int, default=4000, help="transactions for single runs")
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--before-src", help="compare with the zerostack sources in this dir")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each, with --before-src")
    parser.add_argument("--startup", type=int, default=0,
                        help="also time start-up on a ledger of this many transactions")
    args = parser.parse_args()
    if args.before_src:
        compare(args)
        return

    results: dict[str, Any] = {}
    results["raw_verify_per_s"] = raw_verify_rate()
    results.update(submission(None, args.txs, args.single))
    results["raw_verify_after_per_s"] = raw_verify_rate()
    with ledger_server() as url:
        t0 = time.perf_counter()
        register_nodes(url, args.nodes)
        results["node_setup_s"] = time.perf_counter() - t0
        p50, p99, mean = query_latency(url)
        results["query_ms_p50"] = p50
        results["query_ms_p99"] = p99
        results["query_mean_matches"] = mean
    if args.startup:
        results["startup"] = startup_times(args.startup, None)
    raw = (results["raw_verify_per_s"] + results["raw_verify_after_per_s"]) / 2
    results["batch_ratio"] = results["batch_tx_per_s"] / raw
    results["single_ratio"] = results["single_tx_per_s"] / raw
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"raw PyNaCl verify/s (before, after)  {results['raw_verify_per_s']:9.0f} "
          f"{results['raw_verify_after_per_s']:9.0f}")
    print(f"batch submission, accepted tx/s      {results['batch_tx_per_s']:9.0f}  "
          f"ratio {results['batch_ratio']:.2f} (target >= 0.30)")
    print(f"single submission (32 clients) tx/s  {results['single_tx_per_s']:9.0f}  "
          f"ratio {results['single_ratio']:.2f}; latency p50 "
          f"{results['single_latency_ms_p50']:.1f} ms p99 {results['single_latency_ms_p99']:.1f} ms")
    print(f"{args.nodes} nodes registered in {results['node_setup_s']:.1f} s; query "
          f"'country X, free mru >= N': p50 {results['query_ms_p50']:.2f} ms, "
          f"p99 {results['query_ms_p99']:.2f} ms (target <= 20), "
          f"{results['query_mean_matches']:.0f} matches on average")
    if args.startup:
        print(f"start-up on {args.startup} transactions: {results['startup']}")


if __name__ == "__main__":
    main()
