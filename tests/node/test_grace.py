"""A contract in `grace` (its owner cannot pay) keeps running on a real node: a node
removes workloads only on signed cancel votes it checked, never on the ledger's say-so.
Pausing workloads in grace comes with the node's billing support."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from tests.conftest import ProcessGroup
from tests.node.harness import Grid
from zerostack.ledger import LedgerRejected

POLICY = {"prices": {"cru": 3_600_000, "mru": 3_600_000, "sru": 3_600_000, "hru": 3_600_000},
          "max": {"cru": 10**9, "mru": 10**9, "sru": 10**9, "hru": 10**9},
          "period": 2, "grace": 4, "max_traffic": 1 << 30}


def test_a_contract_in_grace_and_past_it_keeps_running(procs: ProcessGroup,
                                                       tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    grid = Grid(procs, tmp_path, "--dev-faucet", "--policy", str(policy))
    _, zport, _, node = grid.ready_node()
    owner, twin = grid.user()
    grid.client.faucet(owner, 10**6)
    cid, _ = grid.deploy(owner, twin, [{"type": "zdb", "name": "db", "size": "4M",
                                        "password": "s3cret"}], node)
    c = grid.wait_contract(cid, {"deployed", "error"})
    assert c["state"] == "deployed", c
    ns_name = f"c{cid}-db"
    # the owner gives all its money away: the next boundary puts the contract in grace
    _, sink_twin = grid.user()
    while (left := grid.client.account(twin)["balance"]) > 0:
        try:
            grid.client.transfer(owner, sink_twin, left)
        except LedgerRejected:  # a boundary charged it meanwhile: try again
            continue

    def still_serves() -> bool:
        ns = redis.Redis(port=zport, single_connection_client=True)
        try:
            ns.execute_command("SELECT", ns_name, "s3cret")
            return True
        finally:
            ns.close()

    deadline = time.monotonic() + 20
    while grid.client.contract(cid)["state"] != "grace":
        assert time.monotonic() < deadline, grid.client.contract(cid)
        time.sleep(0.1)
    time.sleep(2.5)  # more than the agent's resync period: it has seen `grace`
    assert still_serves()
    # the grace period ends: the ledger cancels without any vote; the node keeps it
    deadline = time.monotonic() + 20
    while (c := grid.client.contract(cid))["state"] != "cancelled":
        assert time.monotonic() < deadline, c
        time.sleep(0.1)
    assert c["cancel_votes"] == {}
    time.sleep(2.5)
    assert still_serves()
    assert grid.client.contract(cid)["state"] == "cancelled"
