"""What the ledger acknowledged is on disk: every commit is synced (power loss), and a
server killed with SIGKILL right after its answers comes back with all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import orjson

from tests.conftest import ProcessGroup, zerostack_cmd
from tests.ledger.test_api import start
from zerostack.crypto import Identity
from zerostack.ledger import LedgerClient, SqliteLog, sign_tx


def test_every_commit_is_synced_to_disk(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "ledger.db")
    try:
        # 2 = FULL: in WAL mode the log is fsynced at every commit, before append returns
        assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        log.close()


def test_acknowledged_transactions_survive_sigkill(procs: ProcessGroup, tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    server = start(procs, db)
    senders = [Identity.generate() for _ in range(4)]
    with LedgerClient(server.url) as c:
        twins = [c.register_twin(s) for s in senders]
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def submit(ident: Identity, twin: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for n in range(1, 10_000):
                tx = sign_tx(ident, "name.register", twin, n, {"name": f"k{twin}-{n}"})
                try:
                    r = http.post("/tx", content=orjson.dumps(tx),
                                  headers={"content-type": "application/json"})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code != 200:
                    return
                with lock:
                    acked.append(r.json()["hash"])
                    if len(acked) >= 300:
                        enough.set()

    threads = [threading.Thread(target=submit, args=(s, t)) for s, t in zip(senders, twins, strict=True)]
    for t in threads:
        t.start()
    assert enough.wait(60)
    os.killpg(server.proc.pid, signal.SIGKILL)  # mid-stream: no clean shutdown
    server.proc.wait(10)
    for t in threads:
        t.join(30)
    with lock:
        answered = list(acked)
    assert len(answered) >= 300
    again = start(procs, db)
    with LedgerClient(again.url) as c:
        missing = [h for h in answered if c.tx(h) is None]
    assert missing == []
    again.proc.terminate()
    again.proc.wait(10)
    ok = subprocess.run([*zerostack_cmd(), "ledger", "verify", "--db", str(db), "--json"],
                        capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr
