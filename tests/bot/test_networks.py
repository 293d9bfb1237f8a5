"""`network add` on the user's side: a bad range, a range overlapping another of the
user's networks or a node the ledger does not know is refused before any contract is
created (checked with a bot that records what it would create)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import pytest

from zerostack.bot import BotError, ThreeBot, networks
from zerostack.bot.networks import create
from zerostack.bot.spec import build_deployment
from zerostack.crypto import Identity
from zerostack.workloads import Deployment

OWNER = Identity.generate()


class Ledger:
    def __init__(self, nodes: dict[int, str]) -> None:
        self.nodes = nodes

    def node(self, nid: int) -> dict[str, Any] | None:
        return {"id": nid, "endpoint": self.nodes[nid]} if nid in self.nodes else None


class RecordingBot:
    """What `create` uses of a ThreeBot: the ledger's nodes, `build` as the real one
    does it, and `deploy`, which only records."""

    def __init__(self, nodes: dict[int, str]) -> None:
        self.ledger = Ledger(nodes)
        self.deployed: list[tuple[int, Deployment]] = []

    def build(self, data: dict[str, Any], stakeholders: list[str], weight: int | None,
              version: int = 1) -> Deployment:
        return build_deployment(data, 1, stakeholders, weight, version,
                                key_of=lambda twin: OWNER.public_hex)

    def deploy(self, deployment: Deployment, node: int) -> int:
        self.deployed.append((node, deployment))
        return 100 + len(self.deployed)


NODES = {1: "198.18.0.10", 2: "", 3: "198.18.1.12"}


def add(home: Path, name: str, ids: list[int], ip_range: str,
        port: int | None = None) -> tuple[RecordingBot, Any]:
    bot = RecordingBot(NODES)
    return bot, create(cast(ThreeBot, bot), home, name, ids, ip_range, port)


def test_a_network_gets_one_contract_per_node_and_a_record(tmp_path: Path) -> None:
    bot, record = add(tmp_path, "net", [1, 2, 3], "10.20.0.0/16")
    assert [n for n, _ in bot.deployed] == [1, 2, 3]
    assert {k: v["subnet"] for k, v in record["nodes"].items()} == {
        "1": "10.20.1.0/24", "2": "10.20.2.0/24", "3": "10.20.3.0/24"}
    saved = json.loads((tmp_path / "networks" / "net.json").read_text())
    assert saved["range"] == "10.20.0.0/16" and "private" not in json.dumps(saved)


@pytest.mark.parametrize(("ip_range", "ids", "needle"), [
    ("nope", [1, 3], "is not an IPv4 network"),
    ("10.20.0.1/16", [1, 3], "is not an IPv4 network"),
    ("8.8.0.0/16", [1, 3], "must be private"),
    ("100.127.0.0/16", [1, 3], "must be private"),
    ("10.20.0.0/25", [1, 3], "smaller than a /24"),
    ("10.20.0.0/24", [1, 3], "no room"),
    ("10.20.0.0/16", [1, 3, 9], "node 9 is not on the ledger"),
    ("10.20.0.0/16", [2], "at least one node with a public endpoint"),
    ("10.21.0.0/16", [1, 1], "give each node once"),
])
def test_bad_input_creates_nothing(tmp_path: Path, ip_range: str, ids: list[int],
                                   needle: str) -> None:
    bot = RecordingBot(NODES)
    with pytest.raises(BotError, match=re.escape(needle)):
        create(cast(ThreeBot, bot), tmp_path, "net", ids, ip_range)
    assert bot.deployed == []
    assert not (tmp_path / "networks" / "net.json").exists()


@pytest.mark.parametrize("ip_range", ["10.20.0.0/16", "10.0.0.0/8", "10.20.7.0/24"])
def test_a_range_overlapping_another_network_is_refused(tmp_path: Path, ip_range: str) -> None:
    add(tmp_path, "first", [1, 3], "10.20.0.0/16")
    bot = RecordingBot(NODES)
    with pytest.raises(BotError, match=re.escape("overlaps 10.20.0.0/16 of your network 'first'")):
        create(cast(ThreeBot, bot), tmp_path, "second", [1, 3], ip_range)
    assert bot.deployed == []
    assert not (tmp_path / "networks" / "second.json").exists()
    # a distinct range is fine
    bot, _ = add(tmp_path, "second", [1, 3], "10.21.0.0/16")
    assert len(bot.deployed) == 2


def test_each_network_gets_a_port_none_of_the_users_others_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networks, "PORTS", range(20000, 20002))
    ports = {add(tmp_path, name, [1, 3], f"10.{20 + i}.0.0/16")[1]["port"]
             for i, name in enumerate(("a", "b"))}
    assert ports == {20000, 20001}
    for deployment in (d for _, d in add(tmp_path, "c", [1, 3], "10.30.0.0/16", 7)[0].deployed):
        assert deployment.workloads[0].wireguard_listen_port == 7  # type: ignore[union-attr]
    bot = RecordingBot(NODES)
    with pytest.raises(BotError, match="give --port"):
        create(cast(ThreeBot, bot), tmp_path, "d", [1, 3], "10.40.0.0/16")
    assert bot.deployed == []
