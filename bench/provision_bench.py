"""Node provisioning benchmark: latency from the approval that completes a contract's quorum
to the node's signed `ok` report for a Zero-DB namespace, over N contracts on one node.

    .venv/bin/python -m bench.provision_bench [--contracts 50] [--json]

Starts a real `zerostack ledger serve` and a real `zerostack node run` (with its own
Zero-DB) on loopback. Each contract needs the owner and a stakeholder; the owner approves
on creation, then the clock runs from just before the stakeholder's approval is submitted
until the ledger's event feed shows the node's report. Contracts go one at a time.

References measured in the same run: the round trip of one bare ledger transaction
(submit -> committed), and creating the same namespace directly with redis-py (the
commands the zdb provisioner sends), so the figures show what the node itself adds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.common import (
    approve_until_ok,
    free_port,
    percentile,
    spawn,
    stop,
    wait_node,
    wait_port,
    zerostack_cli,
)
from zerostack.bot import ThreeBot
from zerostack.crypto import Identity
from zerostack.grid import remove_tree
from zerostack.ledger import LedgerClient


def run(contracts: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="zs-provision-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        lport, zport = free_port(), free_port()
        url = f"http://127.0.0.1:{lport}"
        procs.append(spawn([*zerostack_cli(), "ledger", "serve", "--db", str(tmp / "l.db"),
                            "--listen", f"127.0.0.1:{lport}"], tmp / "ledger.log"))
        wait_port(lport, procs[-1])
        client = LedgerClient(url)
        farmer, owner, holder = Identity.generate(), Identity.generate(), Identity.generate()
        client.register_twin(farmer)
        farm = client.create_farm(farmer, "bench")
        client.register_twin(owner)
        holder_twin = client.register_twin(holder)
        procs.append(spawn(
            [*zerostack_cli(), "node", "run", "--ledger", url, "--farm", str(farm),
             "--data", str(tmp / "node"), "--zdb-port", str(zport), "--resync", "30"],
            tmp / "node.log"))
        node = wait_node(client, farm, timeout=30)
        try:
            wait_port(zport, procs[-1])
        except (TimeoutError, RuntimeError):
            raise RuntimeError("node Zero-DB did not start:\n"
                               + (tmp / "node.log").read_text()[-2000:]) from None
        bot = ThreeBot(url, owner)
        holder_bot = ThreeBot(url, holder)

        # reference 1: one bare transaction's round trip (a heartbeat-like no-op: a name)
        tx_times = []
        for i in range(contracts):
            t0 = time.perf_counter()
            client.register_name(owner, f"bench{i}")
            tx_times.append(time.perf_counter() - t0)

        latencies = []
        for i in range(contracts):
            dep = bot.build(
                {"workloads": [{"type": "zdb", "name": "db", "size": "16M",
                                "password": f"pw{i}"}]},
                [f"{holder_twin}:1:required"], None)
            cid = bot.deploy(dep, node)
            latencies.append(approve_until_ok(client, holder_bot, cid, dep.hash(), timeout=10))

        # reference 2: the same namespace operations straight to the node's Zero-DB
        admin = (tmp / "node" / "zdb-admin.secret").read_text().strip()
        r = redis.Redis(port=zport, password=admin)
        direct = []
        for i in range(contracts):
            t0 = time.perf_counter()
            ns = f"direct{i}"
            if ns not in {n.decode() for n in r.execute_command("NSLIST")}:
                r.execute_command("NSNEW", ns)
            r.execute_command("NSINFO", ns)
            for prop, val in (("maxsize", str(16 << 20)), ("password", "pw"), ("public", "0")):
                r.execute_command("NSSET", ns, prop, val)
            direct.append(time.perf_counter() - t0)
        r.close()
        bot.close()
        holder_bot.close()
        client.close()
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        return {
            "contracts": contracts,
            "approval_to_ok_p50_s": round(p50, 4),
            "approval_to_ok_p99_s": round(p99, 4),
            "approval_to_ok_mean_s": round(statistics.mean(latencies), 4),
            "approval_to_ok_max_s": round(max(latencies), 4),
            "ledger_tx_roundtrip_p50_s": round(percentile(tx_times, 50), 4),
            "direct_zdb_namespace_p50_s": round(percentile(direct, 50), 5),
            "ratio_p50_to_ledger_tx": round(p50 / percentile(tx_times, 50), 2),
            "ratio_p50_to_direct_zdb": round(p50 / percentile(direct, 50), 1),
            "target": "p50 <= 1 s, p99 <= 3 s",
            "met": p50 <= 1.0 and p99 <= 3.0,
        }
    finally:
        for p in procs:
            stop(p)
        remove_tree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.contracts)
    if args.json:
        print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
        return
    for k, v in res.items():
        print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
