"""A ledger rolled back to an older copy of its file (or forked from it) is refused by a
node that saw a later head: it provisions nothing and deletes nothing. Without the pin,
the node brought back a cancelled workload and removed one the old copy did not know."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.bot.test_cli import zs
from tests.conftest import ProcessGroup, wait_for_port, zerostack_cmd
from tests.node.harness import Grid
from tests.node.test_agent_e2e import namespaces
from zerostack.crypto import Identity

ZDB = [{"type": "zdb", "name": "db", "size": "1M", "password": "p"}]


def snapshot(db: Path, to: Path) -> None:
    """A consistent copy of a live ledger file (and its operator key beside it)."""
    to.parent.mkdir()
    src, dst = sqlite3.connect(db), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    shutil.copy(db.parent / "ledger.key", to.parent / "ledger.key")


def pinned_height(data: Path) -> int:
    try:
        return int(json.loads((data / "ledger-head.json").read_text())["height"])
    except FileNotFoundError:
        return 0


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_node_refuses_a_rolled_back_or_forked_ledger(procs: ProcessGroup,
                                                       tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    ledger_proc = procs.procs[0]
    owner, owner_twin = grid.user()
    proc, zport, data = grid.start_node("node")
    node = grid.node_id(data, proc)
    old, _ = grid.deploy(owner, owner_twin, ZDB, node)
    assert grid.wait_contract(old, {"deployed"})["state"] == "deployed"
    snapshot(tmp_path / "ledger.db", tmp_path / "old" / "ledger.db")

    # after the copy: `old` is cancelled (and removed), `new` deployed
    grid.client.cancel(owner, old)
    grid.wait_contract(old, {"deleted"})
    new, _ = grid.deploy(owner, owner_twin, ZDB, node)
    grid.wait_contract(new, {"deployed"})
    assert namespaces(zport, data) == {f"c{new}-db"}
    home = tmp_path / "home"
    zs(home, grid.url, "id", "new", "alice")
    zs(home, grid.url, "status", "-i", "alice")  # the user's CLI pins the head too
    head = int(grid.client.head()["height"])
    wait_for(lambda: pinned_height(data) >= head, 20, "the node never pinned the head")
    seen = pinned_height(data)

    # the same operator serves the old copy at the same address
    ledger_proc.terminate()
    ledger_proc.wait(15)
    port = int(grid.url.rsplit(":", 1)[1])
    log = open(tmp_path / "old-ledger.log", "wb")  # noqa: SIM115 - closed by the OS
    rolled = procs.start([*zerostack_cmd(), "ledger", "serve", "--db",
                          str(tmp_path / "old" / "ledger.db"), "--listen",
                          f"127.0.0.1:{port}"], stdout=log, stderr=log)
    wait_for_port(port, proc=rolled)
    assert int(grid.client.head()["height"]) < seen
    assert grid.client.contract(old)["state"] == "deployed"  # what the old copy says
    assert grid.client.contract(new) is None

    node_log = tmp_path / "node.log"
    wait_for(lambda: "the ledger rolled back" in node_log.read_text(), 20,
             "the node did not refuse the rollback")
    assert "event=ledger_refused" in node_log.read_text()
    time.sleep(4)  # several resync passes (1 s each)
    assert namespaces(zport, data) == {f"c{new}-db"}  # nothing back, nothing removed
    assert pinned_height(data) == seen

    # the CLI pinned an earlier head than the node; the old copy goes on making blocks, so
    # by now it may have passed that height with other blocks: a fork from the CLI's view
    cli = zs(home, grid.url, "status", "-i", "alice", ok=False)
    assert cli.returncode != 0 and ("rolled back" in cli.stderr or "forked" in cli.stderr), \
        cli.stderr

    # the old copy goes on past the height the node saw: now it is a fork
    filler = [Identity.generate() for _ in range(seen + 2 - int(grid.client.head()["height"]))]
    for ident in filler:
        grid.client.register_twin(ident)
    assert int(grid.client.head()["height"]) > seen
    wait_for(lambda: "the ledger forked" in node_log.read_text(), 20,
             "the node did not refuse the fork")
    time.sleep(3)
    assert namespaces(zport, data) == {f"c{new}-db"}
    cli = zs(home, grid.url, "status", "-i", "alice", ok=False)
    assert cli.returncode != 0 and "forked" in cli.stderr
    assert proc.poll() is None  # the node keeps waiting for a ledger it can trust


def test_a_node_refuses_a_ledger_of_another_operator(procs: ProcessGroup,
                                                     tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    proc, _, data = grid.start_node("node")
    grid.node_id(data, proc)
    wait_for(lambda: pinned_height(data) > 0, 20, "the node never pinned the head")
    # another ledger (another key) comes up at the same address
    ledger_proc = procs.procs[0]
    ledger_proc.terminate()
    ledger_proc.wait(15)
    port = int(grid.url.rsplit(":", 1)[1])
    other = tmp_path / "other"
    other.mkdir()
    log = open(tmp_path / "other-ledger.log", "wb")  # noqa: SIM115
    stranger = procs.start([*zerostack_cmd(), "ledger", "serve", "--db",
                            str(other / "ledger.db"), "--listen", f"127.0.0.1:{port}"],
                           stdout=log, stderr=log)
    wait_for_port(port, proc=stranger)
    for _ in range(pinned_height(data) + 1):
        grid.client.register_twin(Identity.generate())
    node_log = tmp_path / "node.log"
    wait_for(lambda: "not signed by the operator key" in node_log.read_text(), 30,
             "the node did not refuse the other operator's ledger")
    # restarted with another key given explicitly, the node refuses to start on its pin
    proc.terminate()
    proc.wait(15)
    bad = subprocess.run([*zerostack_cmd(), "node", "run", "--ledger", grid.url, "--farm", "1",
                          "--data", str(data), "--dry", "--ledger-key",
                          Identity.generate().public_hex],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "1000"})
    assert bad.returncode != 0 and "change of operator key is refused" in bad.stderr
