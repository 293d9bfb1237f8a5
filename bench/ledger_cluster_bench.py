"""Ledger cluster benchmark: accepted tx/s of 3 etcd-backed replicas against the embedded
SQLite ledger in the same run, and the time from submission to finality.

    .venv/bin/python -m bench.ledger_cluster_bench [--txs 6000] [--single 300] [--json]

Both ledgers run as real `zerostack ledger serve` processes on loopback with fresh files;
the cluster is 3 etcd members and 3 replicas (`zerostack.ledger.cluster.start_cluster`).
Every transaction is signed before the clock starts. Batch phase: `name.register`
transactions from 60 twins, posted as `POST /txs` batches of 250 over 6 concurrent
connections (each twin's nonces on one connection; the cluster's connections spread
over its 3 replicas). Single phase: `POST /tx` from 12 concurrent clients; a cluster
replica answers once the block is final on it (signed by all 3 validators), so the
answer time is the submission-to-finality time (answers marked `final: false` are
counted apart).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import free_port, start, stop, zerostack_cli
from zerostack.crypto import Identity
from zerostack.ledger.cluster import start_cluster
from zerostack.ledger.tx import sign_tx

TWINS = 60
BATCH = 250
CONNECTIONS = 6
SINGLE_CLIENTS = 12


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def register(urls: list[str], idents: list[Identity]) -> list[int]:
    with httpx.Client(base_url=urls[0], timeout=120) as http:
        body = [sign_tx(i, "twin.register", i.public_hex, 0, {}) for i in idents]
        results = http.post("/txs", content=orjson.dumps(body)).json()["results"]
    return [int(r["receipt"]["twin"]) for r in results]


def batch_phase(urls: list[str], idents: list[Identity], twins: list[int], total: int,
                tag: str) -> dict[str, Any]:
    per = total // len(idents)
    # connection c carries the twins c, c + CONNECTIONS, …: a twin's nonces stay in order
    plans: list[list[bytes]] = []
    for c in range(CONNECTIONS):
        mine = [(i, t) for k, (i, t) in enumerate(zip(idents, twins, strict=True))
                if k % CONNECTIONS == c]
        txs = [sign_tx(i, "name.register", t, n + 1, {"name": f"{tag}{t}-{n}"})
               for n in range(per) for i, t in mine]
        plans.append([orjson.dumps(txs[k:k + BATCH]) for k in range(0, len(txs), BATCH)])
    accepted = [0] * CONNECTIONS
    latencies: list[float] = []
    not_final = [0]
    lock = threading.Lock()

    def run(c: int) -> None:
        with httpx.Client(base_url=urls[c % len(urls)], timeout=300) as http:
            for body in plans[c]:
                t0 = time.perf_counter()
                results = http.post("/txs", content=body).json()["results"]
                dt = time.perf_counter() - t0
                ok = [r for r in results if "error" not in r]
                with lock:
                    accepted[c] += len(ok)
                    latencies.append(dt)
                    not_final[0] += sum(1 for r in ok if r.get("final") is False)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(CONNECTIONS)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    return {"accepted": sum(accepted), "seconds": elapsed, "rate": sum(accepted) / elapsed,
            "batch_p50": pct(latencies, 0.5), "batch_p99": pct(latencies, 0.99),
            "not_final": not_final[0]}


def single_phase(urls: list[str], idents: list[Identity], twins: list[int], count: int,
                 first_nonce: int) -> dict[str, Any]:
    per_client = max(1, count // SINGLE_CLIENTS)
    latencies: list[float] = []
    not_final = [0]
    lock = threading.Lock()

    def run(c: int) -> None:
        ident, twin = idents[c], twins[c]
        bodies = [orjson.dumps(sign_tx(ident, "name.register", twin, first_nonce + n,
                                       {"name": f"s{twin}-{n}"})) for n in range(per_client)]
        with httpx.Client(base_url=urls[c % len(urls)], timeout=60) as http:
            for body in bodies:
                t0 = time.perf_counter()
                r = http.post("/tx", content=body)
                dt = time.perf_counter() - t0
                data = r.json()
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        not_final[0] += data.get("final") is False

    threads = [threading.Thread(target=run, args=(c,)) for c in range(SINGLE_CLIENTS)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    return {"count": len(latencies), "rate": len(latencies) / elapsed,
            "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99),
            "not_final": not_final[0]}


def bench(urls: list[str], total: int, single: int, tag: str) -> dict[str, Any]:
    idents = [Identity.generate() for _ in range(TWINS)]
    twins = register(urls, idents)
    time.sleep(0.5)
    out = {"batch": batch_phase(urls, idents, twins, total, tag)}
    out["single"] = single_phase(urls, idents, twins, single, total // TWINS + 1)
    return out


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--txs", type=int, default=6000)
    ap.add_argument("--single", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", help="keep the ledgers' files and logs here (default: a temp dir)")
    args = ap.parse_args()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "load_start": load()}
    with tempfile.TemporaryDirectory(prefix="zs-cluster-bench-") as scratch:
        tmp = args.dir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        port = free_port()
        embedded = start([*zerostack_cli(), "ledger", "serve", "--db", f"{tmp}/solo.db",
                          "--listen", f"127.0.0.1:{port}"], port, Path(tmp) / "solo.log")
        try:
            report["embedded"] = bench([f"http://127.0.0.1:{port}"], args.txs, args.single,
                                       "e")
        finally:
            stop(embedded)
        cluster = start_cluster(Path(tmp) / "cluster", replicas=3, etcd_members=3,
                                name="bench")
        try:
            report["cluster"] = bench(cluster.urls, args.txs, args.single, "c")
            stats = []
            for u in cluster.urls:
                stats.append(httpx.get(u + "/cluster").json())
            report["replicas"] = [{k: s[k] for k in ("proposed", "lost", "followed",
                                                      "refused_on_rebase", "final")}
                                  for s in stats]
        finally:
            cluster.stop()
    report["load_end"] = load()
    report["ratio"] = report["cluster"]["batch"]["rate"] / report["embedded"]["batch"]["rate"]
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    e, c = report["embedded"], report["cluster"]
    print(f"{report['date']}  load {report['load_start']:.2f} -> {report['load_end']:.2f}")
    print(f"batch tx/s: embedded {e['batch']['rate']:.0f}, cluster {c['batch']['rate']:.0f}"
          f"  ratio {report['ratio']:.2f} (target >= 0.30)")
    print(f"batch answer p50/p99 s: embedded {e['batch']['batch_p50']:.2f}/"
          f"{e['batch']['batch_p99']:.2f}, cluster {c['batch']['batch_p50']:.2f}/"
          f"{c['batch']['batch_p99']:.2f} (not final: {c['batch']['not_final']})")
    print(f"single submission to finality ms: embedded p50 {e['single']['p50_ms']:.0f} p99 "
          f"{e['single']['p99_ms']:.0f}; cluster p50 {c['single']['p50_ms']:.0f} p99 "
          f"{c['single']['p99_ms']:.0f} (target p99 <= 2000; not final: "
          f"{c['single']['not_final']})")
    print(f"replicas: {report['replicas']}")


if __name__ == "__main__":
    main()
