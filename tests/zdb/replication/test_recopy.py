"""A replica copies a namespace its primary rewrote (compaction) next to its old files and
swaps the copy in only once complete; until then it serves the old files, confirms nothing
of that namespace, and counts in votes with its old files (of the previous generation)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.zdb.replication.helpers import engine, frames_of, tree
from zerostack.zdb.replication.replica import Replica
from zerostack.zdb.replication.role import ReplicationRole


def test_rewritten_namespace_is_swapped_in_only_when_complete(tmp_path: Path) -> None:
    primary = engine(tmp_path / "p")
    logs = primary.create_namespace("logs")
    for round_ in range(3):
        for i in range(60):
            logs.set(b"k%d" % i, b"r%d-" % round_ + b"x" * 300)
    primary.close()
    shutil.copytree(tmp_path / "p", tmp_path / "r")  # the replica held everything
    primary = engine(tmp_path / "p")
    primary.compact_namespace("logs", 0)
    end = primary.namespace("logs").position()
    shipped = frames_of(primary, "logs")
    assert len(shipped) > 3 and any(f[0] == b"JUMP" for f in shipped)

    local = engine(tmp_path / "r")
    replica = Replica(local, "127.0.0.1", 1, None, "r")
    old_end = local.namespace("logs").position()
    changed: set[str] = set()
    replica._apply([b"RESET", b"logs", b"%d" % end[0], b"%d" % end[1]], changed)
    assert "logs" in replica.copies
    for frame in shipped[:-1]:
        replica._apply(frame, changed)
        # Not complete yet: the old files stay, whole, and are what the replica serves.
        assert "logs" in replica.copies
        assert local.namespace("logs").position() == old_end
        assert local.namespace("logs").get(b"k5") == b"r2-" + b"x" * 300
    replica._apply(shipped[-1], changed)
    assert not replica.copies
    local.flush_all()
    assert local.namespace("logs").position() == end
    assert local.namespace("logs").get(b"k5") == b"r2-" + b"x" * 300
    primary.close()
    local.close()
    assert tree(tmp_path / "r") == tree(tmp_path / "p")


def test_a_replica_still_copying_counts_with_its_old_files_in_votes(tmp_path: Path) -> None:
    local = engine(tmp_path / "r")
    logs = local.create_namespace("logs")
    for i in range(50):
        logs.set(b"k%d" % i, b"v" * 100)
    local.flush_all()
    role = ReplicationRole(local, replica_of=("127.0.0.1", 1), name="r:1")
    replica = role.replica
    assert replica is not None
    ahead = logs.position()
    default = role.positions()["default"]
    # Holding the old files (generation 0), complete: a candidate holding less of them is
    # refused.
    assert role.positions()["logs"] == (0, ahead)
    granted, why = role.vote(1, "candidate-a", 0, {"logs": (0, (0, 200)), "default": default})
    assert not granted and "holds less of namespace logs" in why
    # Rewritten by the primary (generation 1) and still being copied: the old files are
    # still this node's log and what it confirmed. A candidate holding less of them loses;
    # one that finished the copy (any position past the rewrite's end) wins.
    rewritten_end = (0, ahead[1] // 2)
    replica._apply([b"RESET", b"logs", b"0", b"%d" % rewritten_end[1], b"1"], set())
    assert "logs" in replica.copies
    assert role.positions()["logs"] == (0, ahead)
    granted, why = role.vote(2, "candidate-b", 0, {"logs": (0, (0, 200)), "default": default})
    assert not granted and "holds less of namespace logs" in why
    granted, why = role.vote(3, "candidate-c", 0, {"logs": (1, rewritten_end),
                                                   "default": default})
    assert granted, why
    replica.drop_copies()
    assert not replica.copies and role.positions()["logs"] == (0, ahead)
    assert not (tmp_path / "r" / "data" / "logs" / "compact").exists()
    local.close()
