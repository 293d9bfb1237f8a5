"""Explorer benchmark: time to first render of the grid page with 10,000 registered nodes,
and the bytes the page downloads for it, measured in Debian's headless Chromium.

    .venv/bin/python -m bench.explorer_bench [--nodes 10000] [--runs 5] [--json]

Runs a real `zerostack ledger serve` on loopback with a fresh file, registers the nodes
(50 countries, each with a heartbeat), then loads `/explorer#/grid` with the browser
cache disabled `--runs` times. "First render" is the page's own performance mark
`grid-rendered`, set once the nodes table is in the DOM, counted from navigation start;
the bytes are the transfer sizes (headers and compressed bodies) of the document and every
resource fetched by then. Reference, same run and same browser: fetching the full node
list the plain API serves (`GET /nodes?limit=10000`), what a page without the explorer's
summary endpoint would download before drawing anything. Then, the time the chain page
takes to load and re-check its latest 20 blocks (hashes and every ed25519 signature).
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import statistics
import time
from typing import Any
from urllib.parse import urlparse

import orjson
from tests.ledger.explorer_support import chromium

from bench.common import ledger_server
from bench.ledger_bench import register_nodes

FIRST_RENDER_TARGET_S = 1.5
BYTES_TARGET = 1 << 20

_MEASURE = """() => {
  const mark = performance.getEntriesByName('grid-rendered')[0];
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource')
    .filter(r => r.responseEnd <= mark.startTime + 1);
  const bytes = nav.transferSize + res.reduce((n, r) => n + r.transferSize, 0);
  return {render_ms: mark.startTime, bytes, requests: res.length + 1,
          sizes: Object.fromEntries(res.map(r => [new URL(r.name).pathname, r.transferSize])),
          rows: document.querySelectorAll('#nodes tbody tr').length};
}"""

_REFERENCE = """async () => {
  const t0 = performance.now();
  const res = await fetch('/nodes?limit=10000', {cache: 'no-store'});
  const nodes = await res.json();
  const ms = performance.now() - t0;
  await new Promise(r => setTimeout(r, 50));
  const entry = performance.getEntriesByType('resource').filter(
    e => e.name.endsWith('/nodes?limit=10000')).pop();
  return {ms, bytes: entry ? entry.transferSize : 0, nodes: nodes.length};
}"""


def summary_latency(url: str, n: int = 50) -> tuple[float, float]:
    """p50/max (ms) of GET /explorer/api/grid (the summary over every node plus one page)."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/explorer/api/grid?limit=50")
        answer = conn.getresponse()
        answer.read()
        times.append((time.perf_counter() - t0) * 1000)
        assert answer.status == 200
    conn.close()
    return statistics.median(times), max(times)


def measure(url: str, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    with chromium() as browser:
        page = browser.new_page()
        session = browser.new_cdp_session(page)
        session.send("Network.enable")
        session.send("Network.setCacheDisabled", {"cacheDisabled": True})
        page.goto(f"{url}/explorer#/grid")  # warm the server, not the browser
        page.wait_for_selector("#nodes tbody tr", timeout=60_000)
        for _ in range(runs):
            page.goto("about:blank")
            page.goto(f"{url}/explorer#/grid")
            page.wait_for_selector("#nodes tbody tr", timeout=60_000)
            out["runs"].append(page.evaluate(_MEASURE))
        out["reference"] = [page.evaluate(_REFERENCE) for _ in range(3)]
        # the chain page: the latest 20 blocks (1,000 transactions each here) re-checked
        page.goto("about:blank")
        t0 = time.perf_counter()
        page.goto(f"{url}/explorer#/chain")
        page.wait_for_selector("#chain-summary.ok, #chain-summary.bad", timeout=600_000)
        out["chain_s"] = time.perf_counter() - t0
        out["chain_summary"] = page.text_content("#chain-summary")
        out["chain_txs"] = page.evaluate(
            "Array.from(document.querySelectorAll('#blocks summary'))"
            ".reduce((n, s) => n + parseInt(s.textContent), 0)")
        page.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": f"{platform.node()} {os.cpu_count()} cores",
                               "load_before": os.getloadavg()}
    with ledger_server() as url:
        t0 = time.perf_counter()
        register_nodes(url, args.nodes)
        results["setup_s"] = time.perf_counter() - t0
        results["summary_ms_p50"], results["summary_ms_max"] = summary_latency(url)
        results.update(measure(url, args.runs))
    results["load_after"] = os.getloadavg()
    renders = [r["render_ms"] for r in results["runs"]]
    sizes = [r["bytes"] for r in results["runs"]]
    ref_ms = statistics.median(r["ms"] for r in results["reference"])
    ref_bytes = statistics.median(r["bytes"] for r in results["reference"])
    results["render_ms_median"] = statistics.median(renders)
    results["render_ms_max"] = max(renders)
    results["bytes_median"] = statistics.median(sizes)
    results["reference_ms"] = ref_ms
    results["reference_bytes"] = ref_bytes
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        return
    rows = results["runs"][0]["rows"]
    print(f"{args.nodes} nodes registered in {results['setup_s']:.1f} s; "
          f"load {results['load_before'][0]:.2f} -> {results['load_after'][0]:.2f}")
    print(f"grid page, first render (cold cache): median {results['render_ms_median']:.0f} ms, "
          f"max {results['render_ms_max']:.0f} ms over {args.runs} runs "
          f"(target <= {FIRST_RENDER_TARGET_S * 1000:.0f} ms); {rows} rows drawn")
    print(f"bytes transferred by then: {results['bytes_median'] / 1024:.1f} KiB in "
          f"{results['runs'][0]['requests']} requests (target <= {BYTES_TARGET // 1024} KiB)")
    print(f"reference, GET /nodes?limit={args.nodes} in the same browser: "
          f"{ref_ms:.0f} ms, {ref_bytes / 1024:.1f} KiB "
          f"(explorer/reference: time {results['render_ms_median'] / ref_ms:.2f}, "
          f"bytes {results['bytes_median'] / ref_bytes:.3f})")
    print(f"chain page: {results['chain_txs']} transactions in 20 blocks checked in "
          f"{results['chain_s']:.1f} s: {results['chain_summary']}")
    print(f"/explorer/api/grid on the server: p50 {results['summary_ms_p50']:.1f} ms, "
          f"max {results['summary_ms_max']:.1f} ms")


if __name__ == "__main__":
    main()
