"""--min-replicas by group commit: writes of many clients are confirmed together, each reply
only once enough replicas hold the write, unconfirmed ones answered by one timer, and no
later reply (REPLWAIT, WAIT) overtakes a write's confirmation."""

from __future__ import annotations

import threading
import time

import redis

from tests.zdb.conftest import ZdbStarter
from tests.zdb.replication.helpers import REPL_AUTH, info, wait_identical, wait_until

NOT_CONFIRMED = "not confirmed by enough replicas"


def test_unconfirmed_writes_fail_and_no_later_reply_overtakes_them(
        zdb_start: ZdbStarter) -> None:
    primary = zdb_start("--min-replicas", "1", "--min-replicas-timeout", "1", *REPL_AUTH)
    r = primary.client()
    pipe = r.pipeline(transaction=False)
    pipe.execute_command("SET", "a", "1")
    pipe.execute_command("REPLWAIT", 1, 50)  # its reply would come later: it runs after
    pipe.execute_command("SET", "b", "2")
    pipe.execute_command("PING")
    started = time.monotonic()
    replies = pipe.execute(raise_on_error=False)
    took = time.monotonic() - started
    assert NOT_CONFIRMED in str(replies[0]), replies
    assert replies[1] == 0, replies
    assert NOT_CONFIRMED in str(replies[2]) and replies[3] == b"PONG", replies
    assert 1.8 < took < 6, took  # two batches, each held for the 1 s timeout
    # The data is on the primary all the same (the error says so).
    assert r.execute_command("GET", "a") == b"1"


def test_many_clients_are_confirmed_together_and_end_identical(zdb_start: ZdbStarter) -> None:
    primary = zdb_start("--min-replicas", "1", "--min-replicas-timeout", "10", *REPL_AUTH)
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)
    wait_until(lambda: info(primary).get("connected_replicas") == "1", 20, "replica")
    errors: list[object] = []
    acked: list[bytes] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        c = redis.Redis(port=primary.port, socket_timeout=30)
        c.response_callbacks.clear()
        for batch in range(20):
            pipe = c.pipeline(transaction=False)
            keys = [b"c%d-%d-%d" % (index, batch, i) for i in range(10)]
            for key in keys:
                pipe.execute_command("SET", key, key)
            for key, reply in zip(keys, pipe.execute(raise_on_error=False), strict=True):
                with lock:
                    (acked if reply == key else errors).append(reply)
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(acked) == 16 * 20 * 10
    # Every acknowledged write was on the replica when it was answered.
    c = replica.client()
    missing = [k for k in acked[:: 37] if c.execute_command("GET", k) != k]
    assert not missing, missing[:3]
    wait_identical(primary, replica)
