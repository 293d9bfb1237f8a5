"""Zero-GW: requests/s and p50/p99 latency of small HTTP responses through a gateway's
Caddy (plain HTTP and TLS) against the same backend straight, in one run, as ratios; the
same TLS name again while the gateway's TLS front (HAProxy) runs for a passthrough name,
and that passthrough name against its TLS backend straight; then the failover
interruption of a URL served by two gateways on two sites over N cuts of a whole gateway
host. Needs root, caddy, haproxy, wrk and dnsmasq.

    python -m bench.gateway_bench [--duration 5] [--connections 16] [--rounds 3] [--cuts 10]
                                  [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.gateway.failover import TwoGateways, interruption

from zerostack.gateway import Caddy, Route, Upstream
from zerostack.gateway.front import Front, serve
from zerostack.grid import LocalGrid, inside

HOST = "bench.gw1.grid.test"
PASSTHROUGH = "pt.gw1.grid.test"
STRAIGHT = "pt-straight.gw1.grid.test"  # the same TLS backend, its name on the backend
BACKEND_PORT = 8080
BACKEND_TLS_PORT = 8443
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` and their children's threads so far (processes
    gone are counted as 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def gateway_pids(caddy: Caddy, front: Front) -> list[int]:
    """Caddy's process, and the front's master and workers if it runs."""
    pids = [p.pid for p in (caddy._proc, front._proc) if p is not None and p.poll() is None]
    if front._proc is not None and front._proc.poll() is None:
        master = front._proc.pid
        try:
            pids += [int(c) for c in Path(f"/proc/{master}/task/{master}/children")
                     .read_text().split()]
        except OSError:
            pass
    return pids


def wrk(ns: str, url: str, duration: int, connections: int,
        watch: list[int] | None = None) -> dict[str, float]:
    """One wrk run; with `watch`, also the CPU those processes spent per request (us)."""
    before = cpu_seconds(watch) if watch else 0.0
    out = subprocess.run(["ip", "netns", "exec", ns, "wrk", "-t1", f"-c{connections}",
                          f"-d{duration}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    result = {"rps": rps, "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]),
              "non_2xx": float(errors.group(1)) if errors else 0.0}
    if watch and done is not None and int(done.group(1)):
        result["cpu_us_per_req"] = (cpu_seconds(watch) - before) / int(done.group(1)) * 1e6
    return result


def throughput(root: Path, duration: int, connections: int, repeat: int = 3
               ) -> dict[str, Any]:
    """`repeat` rounds of each run kind, without the TLS front then with it; each round
    measures its own reference (the backend straight) next to the gateway's runs."""
    grid = LocalGrid(root / "grid", netns=True, ledger_port=0)
    grid.root.mkdir(parents=True)
    grid._make_wan()
    gw = grid._add_host("gw", 0, False)
    backend = grid._add_host("backend", 0, False)
    client = grid._add_host("client", 0, False)
    hosts_dir = Path("/etc/netns") / client.namespace
    backend_cfg = root / "backend.json"
    hello = [{"handle": [{"handler": "static_response", "body": "hello\n"}]}]
    # the backend: plain HTTP, and TLS with its own certificates (its own internal CA)
    backend_cfg.write_text(json.dumps({
        "admin": {"disabled": True},
        "storage": {"module": "file_system", "root": str(root / "backend-caddy")},
        "apps": {
            "http": {"servers": {
                "b": {"listen": [f":{BACKEND_PORT}"], "routes": hello},
                "t": {"listen": [f":{BACKEND_TLS_PORT}"], "tls_connection_policies": [{}],
                      "automatic_https": {"disable_redirects": True},
                      "routes": [{"match": [{"host": [PASSTHROUGH, STRAIGHT]}],
                                  "handle": hello[0]["handle"]}]}}},
            "pki": {"certificate_authorities": {"local": {"install_trust": False}}},
            "tls": {"automation": {"policies": [{"issuers": [{"module": "internal"}]}]}}}}))
    proc = subprocess.Popen(["ip", "netns", "exec", backend.namespace, "caddy", "run",
                             "--config", str(backend_cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    caddy = Caddy(root / "gateway")
    front = Front(root / "gateway" / "front")
    try:
        # the client resolves the gateway's name from its own hosts file (ip netns exec
        # mounts /etc/netns/NS/hosts over /etc/hosts), as wrk sends SNI from the URL
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{gw.address} {HOST}\n"
                                         f"{gw.address} {PASSTHROUGH}\n"
                                         f"{backend.address} {STRAIGHT}\n")
        route = Route("bench", HOST, (Upstream("http", backend.address, BACKEND_PORT),),
                      https_redirect=False)
        with inside(gw.namespace):
            caddy.load([route])
        _answers(client.namespace, f"https://{HOST}/")
        direct_url = f"http://{backend.address}:{BACKEND_PORT}/"
        first = {"direct": direct_url, "gateway_plain": f"http://{HOST}/",
                 "gateway_tls": f"https://{HOST}/"}
        rounds: list[dict[str, dict[str, float]]] = [
            {name: wrk(client.namespace, url, duration, connections,
                       gateway_pids(caddy, front) if name != "direct" else None)
             for name, url in first.items()} for _ in range(repeat)]
        # a passthrough name on the gateway: the TLS front takes :443, Caddy moves behind
        passthrough = Route("pt", PASSTHROUGH,
                            (Upstream("https", backend.address, BACKEND_TLS_PORT),),
                            passthrough=True)
        with inside(gw.namespace):
            serve(caddy, front, [route, passthrough])
        second = {"direct": direct_url, "gateway_tls_front": f"https://{HOST}/",
                  "straight_tls": f"https://{STRAIGHT}:{BACKEND_TLS_PORT}/",
                  "passthrough": f"https://{PASSTHROUGH}/"}
        for url in second.values():
            _answers(client.namespace, url)
        rounds += [{name: wrk(client.namespace, url, duration, connections,
                              gateway_pids(caddy, front) if name in ("gateway_tls_front",
                                                                      "passthrough") else None)
                    for name, url in second.items()} for _ in range(repeat)]
    finally:
        front.stop()
        caddy.stop()
        proc.terminate()
        proc.wait()
        (hosts_dir / "hosts").unlink(missing_ok=True)
        if hosts_dir.exists():
            hosts_dir.rmdir()
        grid.stop()
    return summary(rounds)


REFERENCES = {"gateway_plain": "direct", "gateway_tls": "direct",
              "gateway_tls_front": "direct", "passthrough": "straight_tls"}


def summary(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per run kind: the medians over the rounds of req/s, p50, p99, and of the ratio to
    its reference measured in the same round (a noisy machine moves both together)."""
    out: dict[str, dict[str, Any]] = {}
    kinds = [k for r in rounds for k in r]
    for kind in dict.fromkeys(kinds):
        mine = [r for r in rounds if kind in r]
        row: dict[str, Any] = {
            key: round(statistics.median(r[kind][key] for r in mine), 3)
            for key in ("rps", "p50_ms", "p99_ms", "non_2xx")}
        row["rounds"] = len(mine)
        cpu = [r[kind]["cpu_us_per_req"] for r in mine if "cpu_us_per_req" in r[kind]]
        if cpu:  # the gateway's own cost: steadier than req/s on a busy machine
            row["gateway_cpu_us_per_req"] = round(statistics.median(cpu), 1)
        ref = REFERENCES.get(kind)
        if ref is not None:
            ratios = [r[kind]["rps"] / r[ref]["rps"] for r in mine]
            row["rps_ratio"] = round(statistics.median(ratios), 3)
            row["rps_ratios"] = [round(x, 3) for x in ratios]
            row["p50_ratio"] = round(statistics.median(
                r[kind]["p50_ms"] / r[ref]["p50_ms"] for r in mine), 2)
            row["reference"] = ref
        out[kind] = row
    return out


def _answers(ns: str, url: str) -> None:
    """Wait until `url` answers over TLS from `ns` (certificates are issued once a route
    is loaded)."""
    deadline = time.monotonic() + 30
    while True:
        probe = subprocess.run(["ip", "netns", "exec", ns, "wrk", "-t1", "-c1", "-d1s", url],
                               capture_output=True, text=True)
        if "Requests/sec" in probe.stdout and "Socket errors" not in probe.stdout:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no TLS answer from {url}: {probe.stdout}")
        time.sleep(0.5)


def failover(root: Path, cuts: int) -> dict[str, Any]:
    two = TwoGateways(root / "failover")
    gaps: list[float] = []
    longest = 0.0
    try:
        two.start()
        for n in range(cuts):
            i = n % 2
            loop = two.loop()
            loop.start()
            try:
                time.sleep(1.5)
                cut = time.monotonic()
                two.cut(i)
                time.sleep(6)
            finally:
                loop.stop()
            gaps.append(interruption(loop.samples, cut))
            longest = max(longest, max(s.end - s.start for s in loop.samples))
            print(f"cut {n + 1}: gateway {i + 1}, interruption {gaps[-1]:.2f} s",
                  file=sys.stderr)
            two.restore(i)
            two.wait_both()
    finally:
        two.stop()
    ordered = sorted(gaps)
    return {"cuts": len(gaps), "interruption_s": [round(g, 2) for g in gaps],
            "p50_s": round(statistics.median(ordered), 2),
            "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "max_request_s": round(longest, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every throughput run (medians are reported)")
    ap.add_argument("--cuts", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("gateway_bench: needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="zs-gw-bench-") as tmp:
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpu",
            "load_before": os.getloadavg()[0],
            "throughput": throughput(Path(tmp), args.duration, args.connections,
                                     args.rounds),
        }
        if args.cuts:
            result["failover"] = failover(Path(tmp), args.cuts)
        result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['date']}  {result['machine']}  load {result['load_before']:.2f} before, "
          f"{result['load_after']:.2f} after")
    for name, r in result["throughput"].items():
        ratio = (f"  x{r['rps_ratio']:.2f} of {r['reference']} "
                 f"(rounds: {', '.join(f'{x:.2f}' for x in r['rps_ratios'])})"
                 if "rps_ratio" in r else "")
        cpu = (f"  gateway CPU {r['gateway_cpu_us_per_req']:.0f} us/req"
               if "gateway_cpu_us_per_req" in r else "")
        print(f"{name:17} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms{cpu}{ratio}")
    if "failover" in result:
        f = result["failover"]
        print(f"failover over {f['cuts']} cuts: p50 {f['p50_s']} s, p99 {f['p99_s']} s, "
              f"longest request {f['max_request_s']} s; each: {f['interruption_s']}")


if __name__ == "__main__":
    main()
