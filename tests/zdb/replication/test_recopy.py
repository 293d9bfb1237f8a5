"""A replica copies a namespace its primary rewrote (compaction) next to its old files and
swaps the copy in only once complete; until then it serves the old files, confirms nothing
of that namespace, and counts in votes as holding none of it."""

from __future__ import annotations

import shutil
from pathlib import Path

from zerostack.zdb.engine import Engine, EngineConfig
from zerostack.zdb.engine.raw import START, read_entries
from zerostack.zdb.replication.replica import Replica
from zerostack.zdb.replication.role import ReplicationRole


def engine(root: Path) -> Engine:
    return Engine(EngineConfig(data_dir=root / "data", index_dir=root / "index",
                               datasize=16 * 1024))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "replication-term"}


def frames_of(source: Engine, name: str) -> list[list[bytes]]:
    """DATA and JUMP frames shipping namespace `name` of `source` from its start."""
    ns = source.namespace(name)
    out: list[list[bytes]] = []
    pos = START
    while pos < ns.position():
        chunk = read_entries(ns, pos, 2000)
        if not chunk:
            pos = (pos[0] + 1, START[1])
            out.append([b"JUMP", name.encode(), b"%d" % pos[0]])
            continue
        out.append([b"DATA", name.encode(), b"%d" % pos[0], b"%d" % pos[1], chunk])
        pos = (pos[0], pos[1] + len(chunk))
    return out


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


def test_a_replica_still_copying_counts_as_holding_none_of_that_namespace(
        tmp_path: Path) -> None:
    local = engine(tmp_path / "r")
    logs = local.create_namespace("logs")
    for i in range(50):
        logs.set(b"k%d" % i, b"v" * 100)
    local.flush_all()
    role = ReplicationRole(local, replica_of=("127.0.0.1", 1), name="r:1")
    replica = role.replica
    assert replica is not None
    ahead = logs.position()
    behind = {"logs": START, "default": local.namespace("default").position()}
    # Holding the old files, complete: a candidate holding less of them is refused.
    assert role.positions()["logs"] == ahead
    granted, why = role.vote(1, "candidate-a", 0, behind)
    assert not granted and "holds less of namespace logs" in why
    # Rewritten by the primary and still being copied: it holds nothing of the new log,
    # so a candidate that finished its copy (any position in it) wins its vote.
    replica._apply([b"RESET", b"logs", b"0", b"%d" % (ahead[1] // 2)], set())
    assert "logs" in replica.copies
    assert role.positions()["logs"] == START
    granted, why = role.vote(2, "candidate-b", 0, {"logs": (0, 200), **{
        k: v for k, v in behind.items() if k != "logs"}})
    assert granted, why
    replica.drop_copies()
    assert not replica.copies and role.positions()["logs"] == ahead
    assert not (tmp_path / "r" / "data" / "logs" / "compact").exists()
    local.close()
