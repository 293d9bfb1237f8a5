"""A node agent given three URLs of a ledger cluster keeps provisioning when the replica
it talks to is killed: it fails over, resumes its event feed from its cursor, and checks
that every head it acts on is final."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessGroup, free_port, require_tool, zerostack_cmd
from zerostack.bot import ThreeBot
from zerostack.crypto import Identity
from zerostack.ledger import LedgerClient
from zerostack.ledger.cluster import LedgerCluster, start_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LedgerCluster]:
    require_tool("etcd")
    # 4 validators: blocks stay final (3 of 4 sign) with one replica down
    c = start_cluster(tmp_path / "cluster", replicas=4, etcd_members=3,
                      name=f"n{random.randrange(1 << 30)}")
    try:
        yield c
    finally:
        c.stop()


def wait_contract(client: LedgerClient, cid: int, timeout: float = 40.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    c: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        c = client.contract(cid)
        if c is not None and c["state"] in ("deployed", "error") and c.get("report"):
            return c
        time.sleep(0.1)
    raise TimeoutError(f"contract {cid}: {c}")


def test_node_agent_with_three_urls_keeps_provisioning_when_a_replica_dies(
        cluster: LedgerCluster, procs: ProcessGroup, tmp_path: Path) -> None:
    urls = cluster.urls[:3]  # the node knows three of the four replicas
    every = ",".join(cluster.urls)
    client = LedgerClient(every)
    farmer = Identity.generate()
    client.register_twin(farmer)
    farm = client.create_farm(farmer, f"farm{free_port()}")
    data = tmp_path / "node"
    log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 - closed by the OS
    agent = procs.start([*zerostack_cmd(), "node", "run", "--ledger", ",".join(urls),
                         "--farm", str(farm), "--data", str(data),
                         "--zdb-port", str(free_port()), "--resync", "1", "--heartbeat", "2",
                         "--dry"], stdout=log, stderr=log)

    def node_log() -> str:
        return (tmp_path / "node.log").read_text()[-3000:]

    deadline = time.monotonic() + 40
    node = 0
    while not node:
        assert agent.poll() is None and time.monotonic() < deadline, node_log()
        key = data / "identity.key"
        if key.exists():
            twin = client.twin_by_key(json.loads(key.read_text())["public"])
            if twin is not None:
                found = client.nodes(twin=twin["id"])
                node = int(found[0]["id"]) if found else 0
        time.sleep(0.1)
    user = Identity.generate()
    client.register_twin(user)

    def deploy(name: str) -> int:
        with ThreeBot(every, user) as bot:
            dep = bot.build({"workloads": [{"type": "zdb", "name": name, "size": "1M"}]}, [],
                            None)
            return int(bot.deploy(dep, node))

    first = deploy("db1")
    assert wait_contract(client, first)["state"] == "deployed", node_log()
    # the replica the agent uses first dies; the agent moves to the next URL
    cluster.kill(cluster.replicas[0].proc)
    second = deploy("db2")
    c = wait_contract(client, second)
    assert c["state"] == "deployed", node_log()
    assert agent.poll() is None
    # it pinned the cluster's validator set and a final head
    pin = json.loads((data / "ledger-head.json").read_text())
    assert sorted(pin["validators"]) == sorted(cluster.validators)
    assert "ledger_refused" not in node_log()
    client.close()
