"""Time from deploying a network over three grid hosts (one behind NAT) to all three nodes
reporting it `ok`, over several networks one after the other. Needs root.

    python -m bench.network_deploy_bench [--networks 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port
from zerostack.bot import ThreeBot
from zerostack.bot.networks import create
from zerostack.grid import LocalGrid


def run(networks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="netbench-") as tmp:
        grid = LocalGrid(Path(tmp) / "grid", ledger_port=free_port(), netns=True,
                         status_port=free_port())
        try:
            client = grid.start_ledger()
            grid.start_node(client, "node1")
            grid.start_node(client, "node2", hidden=True)
            grid.start_node(client, "node3", site=1)
            ids = [n.node_id for n in grid.nodes]
            took = []
            with ThreeBot(grid.url, grid.identity("alice")) as bot:
                for i in range(networks):
                    start = time.perf_counter()
                    record = create(bot, Path(tmp) / "home", f"net{i}", ids,
                                    f"10.{100 + i}.0.0/16")
                    cids = [int(n["contract"]) for n in record["nodes"].values()]
                    for cid in cids:
                        c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                                     and bool(c.get("report")), 120)
                        if c["state"] != "deployed":
                            raise RuntimeError(f"contract {cid}: {c.get('report')}")
                    took.append(time.perf_counter() - start)
                    for cid in cids:
                        bot.cancel(cid)
                    for cid in cids:
                        bot.wait(cid, lambda c: c["state"] == "deleted", 120)
        finally:
            grid.stop()
    took.sort()
    return {"networks": networks, "nodes": 3,
            "p50_s": round(statistics.median(took), 3),
            "p90_s": round(took[min(len(took) - 1, int(len(took) * 0.9))], 3),
            "max_s": round(took[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--networks", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("network_deploy_bench needs root (grid hosts are network namespaces)")
    out = run(args.networks)
    print(json.dumps(out) if args.json else "\n".join(f"{k:8} {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
