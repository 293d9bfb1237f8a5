"""Template benchmark: expanding and placing the `webapp` example on a ledger of 200
registered nodes (no agents: placement only reads the ledger), p50 over repeated runs.

    .venv/bin/python -m bench.template_bench [--nodes 200] [--runs 30] [--grid-runs 5]
        [--webapp-runs 5] [--json]

Runs a real `zerostack ledger serve` on loopback with a priced development grid, 20
farms with their own prices and `--nodes` nodes over 10 countries (one in ten with a
public IP, for the gateways). Measured, in the same run:

- draft: what `zerostack deploy webapp --dry-run` does after loading the template:
  parameters, sandboxed expansion, the node query, prices per farm, placement, networks,
  gateway proxies and one signed-requirement deployment per node (target p50 <= 0.5 s);
- core: expansion and placement alone on the same node list, in memory (the reference);
- approval to ok: on a local grid of three node agents (loopback, real Zero-DBs), the
  `archive` template with a required `legal` stakeholder: from legal's solution approval
  (the last one) until every part is `deployed`, p50 over `--grid-runs` solutions
  (each namespace with its replica on another node);
- webapp approval to ok (root): `zerostack up --nodes 1 --gateways 2` (each node on a
  host of its own, two gateway nodes), `webapp` with a required `legal` stakeholder:
  from legal's approval until every part is `deployed` and every workload `ok`
  (container, namespace, user network, the name on both gateways), p50 over
  `--webapp-runs` solutions (target p50 <= 5 s).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import orjson

from bench.common import free_port, percentile, start, stop, zerostack_cli
from bench.ledger_bench import post_batches, register_twins
from zerostack.bot import ThreeBot
from zerostack.bot import solutions as sol
from zerostack.contracts import NodeOffer, expand, load_text, place
from zerostack.crypto import Identity, load_identity
from zerostack.ledger.pricing import DEV_POLICY, Prices
from zerostack.ledger.tx import sign_tx

GiB = 1 << 30
COUNTRIES = ["BE", "CH", "NL", "DE", "FR", "AT", "IT", "ES", "FI", "EG"]
FARMS = 20
WEBAPP = Path(__file__).resolve().parents[1] / "examples" / "templates" / "webapp.yaml"
ARCHIVE = WEBAPP.with_name("archive.yaml")


def setup(url: str, nodes: int) -> None:
    """A priced grid: 20 farms with their own prices, `nodes` nodes spread over them."""
    rng = random.Random(15)
    farmers = [Identity.generate() for _ in range(FARMS)]
    twins = register_twins(url, farmers)
    post_batches(url, [orjson.dumps([sign_tx(f, "farm.create", t, 1, {"name": f"farm{i}"})
                                     for i, (f, t) in enumerate(zip(farmers, twins,
                                                                    strict=True))])])
    idents = [Identity.generate() for _ in range(nodes)]
    node_twins = register_twins(url, idents)
    txs = []
    for i, (ident, twin) in enumerate(zip(idents, node_twins, strict=True)):
        payload = {
            "farm": 1 + i % FARMS,
            "capacity": {"cru": rng.choice([4, 8, 16]), "mru": rng.randint(4, 64) * GiB,
                         "sru": 512 * GiB, "hru": 4096 * GiB},
            "location": {"country": COUNTRIES[i % len(COUNTRIES)], "city": "x"},
            "endpoint": f"198.18.{i // 250}.{i % 250 + 1}:7000",
        }
        if i % 10 == 0:
            payload["public_ips"] = [f"198.19.{i // 250}.{i % 250 + 1}"]
        txs.append(sign_tx(ident, "node.register", twin, 1, payload))
    post_batches(url, [orjson.dumps(txs[k:k + 1000]) for k in range(0, len(txs), 1000)])
    # the nodes with a public IP are made gateways by their farmers (webapp's name needs two)
    with ThreeBot(url, Identity.generate()) as bot:
        nodes_by_endpoint = {str(v["endpoint"]): int(v["id"])
                             for v in bot.ledger.nodes(limit=5000)}
    nonces = dict.fromkeys(range(FARMS), 1)
    gw = []
    for i in range(0, nodes, 10):
        f = i % FARMS
        nonces[f] += 1
        address = f"198.18.{i // 250}.{i % 250 + 1}"
        gw.append(sign_tx(farmers[f], "node.gateway", twins[f], nonces[f], {
            "node": nodes_by_endpoint[f"{address}:7000"], "domain": f"gw{i}.bench.test",
            "ipv4": f"{address}/16"}))
    post_batches(url, [orjson.dumps(gw)])


def run(nodes: int, runs: int) -> dict[str, float]:
    template = load_text(WEBAPP.read_text())
    params = {"name": "shop", "image": "hub/0123"}
    tmp = Path(tempfile.mkdtemp(prefix="zs-bench-template-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([*zerostack_cli(), "ledger", "serve", "--db", str(tmp / "ledger.db"),
                  "--listen", f"127.0.0.1:{port}", "--dev-faucet"], port)
    try:
        setup(url, nodes)
        user = Identity.generate()
        with ThreeBot(url, user) as bot:
            bot.twin_id()
            assert len(bot.ledger.nodes(limit=5000)) == nodes
            draft_times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                d = sol.draft(bot, template, params)
                draft_times.append(time.perf_counter() - t0)
            assert len(d.deployments) >= 2 and len(d.names) == 1
            offers = [NodeOffer.of(v) for v in bot.ledger.nodes(limit=5000)]
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    prices = {o.id: Prices.of(DEV_POLICY["prices"]) for o in offers}
    core_times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        place(expand(template, params), offers, prices)
        core_times.append(time.perf_counter() - t0)
    return {"nodes": nodes, "runs": runs,
            "draft_p50_s": percentile(draft_times, 50),
            "draft_p90_s": percentile(draft_times, 90),
            "core_p50_s": percentile(core_times, 50),
            "draft_over_core": percentile(draft_times, 50) / percentile(core_times, 50),
            "load_end": os.getloadavg()[0]}


LEGAL = """
stakeholders:
  - role: legal
    required: true
"""


def approval_to_ok(runs: int) -> list[float]:
    """Seconds from the last approval to every part deployed, per solution."""
    from zerostack.grid import LocalGrid

    tmp = Path(tempfile.mkdtemp(prefix="zs-bench-grid-"))
    grid = LocalGrid(tmp / "grid", ledger_port=free_port(), zdb_base_port=free_port())
    times = []
    try:
        client = grid.start_ledger()
        for i in range(3):
            grid.zdb_base_port = free_port() - i  # each node's port is base + index
            grid.start_node(client, f"node{i + 1}")
        template = load_text(ARCHIVE.read_text() + LEGAL)
        with ThreeBot(grid.url, grid.identity("alice")) as alice, \
                ThreeBot(grid.url, grid.identity("legal")) as legal:
            legal_twin = legal.twin_id()
            for _ in range(runs):
                d = sol.draft(alice, template, {"size": "30M"}, {"legal": legal_twin})
                sid = sol.create(alice, d)
                t0 = time.perf_counter()
                sol.approve(legal, sid)
                while True:
                    st = sol.status(alice, sid)
                    if all(p["state"] == "deployed" for p in st["parts"]):
                        break
                    if any(p["state"] == "error" for p in st["parts"]):
                        raise SystemExit(f"a part failed: {st}")
                    time.sleep(0.05)
                times.append(time.perf_counter() - t0)
                sol.cancel(alice, sid)
                for p in st["parts"]:
                    client.wait_contract(int(p["contract"]), {"deleted"}, timeout=60)
    finally:
        grid.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def webapp_approval_to_ok(runs: int) -> list[float]:
    """Seconds from the last approval to every part `deployed` with every workload `ok`,
    per `webapp` solution, on `zerostack up --nodes 1 --gateways 2` (hosts, as root)."""
    tmp = Path(tempfile.mkdtemp(prefix="zs-bench-webapp-"))
    folder = tmp / "grid"
    cli = zerostack_cli()
    times = []
    try:
        out = subprocess.run([*cli, "up", "--dir", str(folder), "--nodes", "1", "--gateways",
                              "2", "--netns", "--ledger-port", str(free_port()),
                              "--zdb-port", str(free_port()), "--hub-port", str(free_port()),
                              "--json"], capture_output=True, text=True, timeout=600)
        if out.returncode:
            raise SystemExit(f"zerostack up failed: {out.stderr.strip()[-2000:]}")
        rec = orjson.loads(out.stdout)
        home, url = Path(rec["home"]), rec["url"]
        template = load_text(WEBAPP.read_text() + LEGAL)
        with ThreeBot(url, load_identity(home / "identities" / "alice.key")) as alice, \
                ThreeBot(url, load_identity(home / "identities" / "legal.key")) as legal:
            legal_twin = legal.twin_id()
            for i in range(runs):
                d = sol.draft(alice, template, {"name": f"bench{i}", "image": rec["image"]},
                              {"legal": legal_twin})
                sid = sol.create(alice, d)
                t0 = time.perf_counter()
                sol.approve(legal, sid)
                while True:
                    st = sol.status(alice, sid)
                    if all(p["state"] == "deployed" and all(
                            w["state"] == "ok" for w in p["workloads"]) for p in st["parts"]):
                        break
                    if any(p["state"] == "error" for p in st["parts"]):
                        raise SystemExit(f"a part failed: {st}")
                    if time.perf_counter() - t0 > 120:
                        raise SystemExit(f"not deployed after 120 s: {st}")
                    time.sleep(0.05)
                times.append(time.perf_counter() - t0)
                sol.cancel(alice, sid)
                deadline = time.monotonic() + 120
                while any(alice.contract(int(p["contract"]))["state"] != "deleted"
                          for p in st["parts"]):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"solution {sid} was not removed in 120 s")
                    time.sleep(0.2)
    finally:
        if folder.exists():
            subprocess.run([*cli, "down", "--dir", str(folder)], capture_output=True,
                           timeout=600)
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--grid-runs", type=int, default=5)
    ap.add_argument("--webapp-runs", type=int, default=5,
                    help="webapp solutions on a grid of hosts with two gateways (root); 0: "
                         "skip")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    result: dict[str, float] = {"load_start": load, **run(args.nodes, args.runs)}
    if args.grid_runs:
        grid_times = approval_to_ok(args.grid_runs)
        result["approval_to_ok_p50_s"] = percentile(grid_times, 50)
        result["approval_to_ok_max_s"] = max(grid_times)
        result["load_end"] = os.getloadavg()[0]
    if args.webapp_runs:
        if os.geteuid() != 0:
            raise SystemExit("--webapp-runs needs root (a grid of hosts); pass 0 to skip")
        web_times = webapp_approval_to_ok(args.webapp_runs)
        result["webapp_approval_to_ok_p50_s"] = percentile(web_times, 50)
        result["webapp_approval_to_ok_max_s"] = max(web_times)
        result["load_end"] = os.getloadavg()[0]
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"webapp on {args.nodes} nodes: draft p50 {result['draft_p50_s'] * 1000:.1f} ms "
          f"(p90 {result['draft_p90_s'] * 1000:.1f} ms, target <= 500 ms); expand + place "
          f"alone p50 {result['core_p50_s'] * 1000:.2f} ms; load {load:.2f} -> "
          f"{result['load_end']:.2f}")
    if args.grid_runs:
        print(f"archive on 3 nodes, last approval to every part deployed: p50 "
              f"{result['approval_to_ok_p50_s']:.2f} s")
    if args.webapp_runs:
        print(f"webapp on a host and 2 gateways, last approval to every part ok: p50 "
              f"{result['webapp_approval_to_ok_p50_s']:.2f} s (max "
              f"{result['webapp_approval_to_ok_max_s']:.2f} s, target <= 5 s)")


if __name__ == "__main__":
    main()
