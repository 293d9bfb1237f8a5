"""A template deployed as a solution on dry nodes and a real ledger: placement over
three nodes, one approval per stakeholder over all parts, nothing runs before the last
one, status, retry of a part elsewhere, cancel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup
from tests.node.harness import Grid
from zerostack.bot import ThreeBot
from zerostack.bot import solutions as sol
from zerostack.bot.spec import BotError
from zerostack.contracts import load_text

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "templates"

STAKEHOLDERS = """
stakeholders:
  - role: legal
    required: true
  - role: budget
    required: true
"""


def test_solution_is_approved_once_per_stakeholder_and_runs_everywhere(
        procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    nodes = [grid.ready_node(f"n{i}", "--dry")[3] for i in range(4)]
    expert, _ = grid.user()
    user, _ = grid.user()
    legal, legal_twin = grid.user()
    budget, budget_twin = grid.user()
    text = (EXAMPLES / "archive.yaml").read_text() + STAKEHOLDERS
    with grid.bot(expert) as bot:
        thash = sol.publish(bot, load_text(text))
        with pytest.raises(BotError, match="already published"):
            sol.publish(bot, load_text(text))
    with grid.bot(user) as bot:
        template, got = sol.load_template(bot, "archive")
        assert got == thash
        with pytest.raises(BotError, match="must approve"):
            sol.draft(bot, template, {"size": "3M"}, {"legal": legal_twin})
        with pytest.raises(BotError, match="no 3 nodes in CH"):
            sol.draft(bot, template, {"size": "3M", "country": "CH"},
                      {"legal": legal_twin, "budget": budget_twin})
        assert grid.client.contracts(owner=bot.twin_id()) == []  # nothing was created
        d = sol.draft(bot, template, {"size": "3M", "shards": "3", "replicas": "false"},
                      {"legal": legal_twin, "budget": budget_twin}, thash)
        assert len(d.deployments) == 3 and set(d.deployments) <= set(nodes)
        sid = sol.create(bot, d)
        st = sol.status(bot, sid)
        assert st["waiting_for"] == sorted([legal_twin, budget_twin])
    with ThreeBot(grid.url, legal) as lb:
        r = sol.review(lb, sid)
        assert len(r.parts) == 3
        sol.approve(lb, sid)
    time.sleep(2.5)  # the nodes resync every second: a partial approval runs nothing
    cids = [p["contract"] for p in st["parts"]]
    assert {grid.client.contract(c)["state"] for c in cids} == {"created"}
    with ThreeBot(grid.url, budget) as bb:
        sol.approve(bb, sid)
    for cid in cids:
        assert grid.wait_contract(cid, {"deployed", "error"})["state"] == "deployed"
    with grid.bot(user) as bot:
        moved = cids[0]
        new = sol.retry(bot, sid, moved)
        part = grid.client.solution(new)["parts"][0]
        assert part["node"] not in {p["node"] for p in st["parts"]}
        for ident in (legal, budget):
            with ThreeBot(grid.url, ident) as sb:
                sol.approve(sb, new)
        assert grid.wait_contract(part["contract"], {"deployed"})["state"] == "deployed"
        assert grid.wait_contract(moved, {"deleted"})["state"] == "deleted"
        assert sorted(sol.cancel(bot, sid)) == sorted(cids[1:])
        sol.cancel(bot, new)
    for cid in [*cids, part["contract"]]:
        assert grid.wait_contract(cid, {"deleted"})["state"] == "deleted"


JOB = """
name: big-job
version: "1"
parts:
  - name: job
    workloads:
      - type: container
        name: job
        flist: hub/0123
        memory: 900M
        disk: 64M
"""


def test_a_refused_part_is_reported_with_the_nodes_reason_and_moved(
        procs: ProcessGroup, tmp_path: Path) -> None:
    """The ledger sees 1 GiB on the first node; the node itself keeps 256 MiB back and
    refuses a 900 MiB container. The user sees why and moves that part elsewhere."""
    grid = Grid(procs, tmp_path)
    small = grid.ready_node("small", "--dry", "--memory", "1G")[3]
    big = grid.ready_node("big", "--dry", "--memory", "4G")[3]
    user, _ = grid.user()
    with grid.bot(user) as bot:
        sid = sol.create(bot, sol.draft(bot, load_text(JOB), {}))
        (part,) = sol.status(bot, sid)["parts"]
        assert part["node"] == small
        grid.wait_contract(part["contract"], {"error"})
        (part,) = sol.status(bot, sid)["parts"]
        assert part["state"] == "error" and "over capacity" in part["error"], part
        new = sol.retry(bot, sid, part["contract"])
        (moved,) = sol.status(bot, new)["parts"]
        assert moved["node"] == big
        assert grid.wait_contract(moved["contract"], {"deployed"})["state"] == "deployed"
        assert grid.wait_contract(part["contract"], {"deleted"})["state"] == "deleted"


def test_the_budget_stakeholder_signs_only_within_its_monthly_cap(
        procs: ProcessGroup, tmp_path: Path) -> None:
    from zerostack.ledger import LedgerError

    grid = Grid(procs, tmp_path, "--dev-faucet")
    for i in range(3):
        grid.ready_node(f"n{i}", "--dry")
    expert, _ = grid.user()
    user, _ = grid.user()
    legal, legal_twin = grid.user()
    budget, budget_twin = grid.user()
    grid.client.faucet(user, 10**12)
    text = (EXAMPLES / "archive.yaml").read_text() + STAKEHOLDERS
    with grid.bot(expert) as bot:
        thash = sol.publish(bot, load_text(text))
    with grid.bot(user) as bot:
        template, _ = sol.load_template(bot, "archive")
        d = sol.draft(bot, template, {"size": "3M", "replicas": "false"},
                      {"legal": legal_twin, "budget": budget_twin}, thash)
        sid = sol.create(bot, d)
    with ThreeBot(grid.url, budget) as bb:
        r = sol.review(bb, sid)
        assert r.per_month > 0
        with pytest.raises(BotError, match="over your --max-cost"):
            sol.approve(bb, sid, max_cost=r.per_month - 1)
        # the ledger holds the cap itself: an approval naming a lower one is refused
        with pytest.raises(LedgerError, match="per month, over the"):
            bb.ledger.approve_solution(budget, sid, r.parts, max_cost=r.per_month - 1)
        assert grid.client.solution(sid)["approvals"].keys() == {str(r.owner)}
        sol.approve(bb, sid, max_cost=r.per_month)
    with ThreeBot(grid.url, legal) as lb:
        sol.approve(lb, sid)
    found = grid.client.solution(sid)
    assert found["max_cost"] == {str(budget_twin): r.per_month}
    assert {grid.client.contract(p["contract"])["state"] for p in found["parts"]} <= {
        "approved", "deployed"}
