"""Host id ranges: one per group, never shared, released with the group's last member, and
taken back from a runtime that vanished without releasing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zerostack.node.runtime.idmap import FIRST, RANGE, IdRegistry


def member(owner: Path, container: str, group: str) -> None:
    (owner / container).mkdir(parents=True)
    (owner / container / "idmap.json").write_text(json.dumps({"group": group}))


def test_ranges_are_distinct_per_group_and_released_with_the_last_member(tmp_path: Path) -> None:
    reg = IdRegistry(tmp_path / "registry")
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    member(node_a, "web", "deployment-1")
    member(node_a, "db", "deployment-1")
    member(node_b, "web", "deployment-2")
    one = reg.claim("deployment-1", node_a)
    assert one == FIRST * RANGE and reg.claim("deployment-1", node_a) == one  # shared
    two = reg.claim("deployment-2", node_b)
    assert two == one + RANGE
    # The same group name under another runtime is another tenant: another range.
    member(node_b, "x", "deployment-1")
    assert reg.claim("deployment-1", node_b) == two + RANGE

    shutil.rmtree(node_a / "web")
    reg.release("deployment-1", node_a)  # "db" still uses it
    assert reg.claim("deployment-2", node_b) == two
    member(node_a, "new", "deployment-3")
    assert reg.claim("deployment-3", node_a) == two + 2 * RANGE
    shutil.rmtree(node_a / "db")
    reg.release("deployment-1", node_a)
    member(node_a, "later", "deployment-4")
    assert reg.claim("deployment-4", node_a) == one  # free again


def test_a_claim_without_members_is_taken_back(tmp_path: Path) -> None:
    reg = IdRegistry(tmp_path / "registry")
    member(tmp_path / "gone", "c", "g1")
    first = reg.claim("g1", tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")  # a runtime that crashed before releasing
    member(tmp_path / "live", "c", "g2")
    assert reg.claim("g2", tmp_path / "live") == first
