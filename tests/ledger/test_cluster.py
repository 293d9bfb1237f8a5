"""The ledger as a cluster, with real etcd processes on 127.0.0.1: replicas agree block for
block, survive kill -9 of an etcd member and of a replica under load without losing or
doubling an acknowledged transaction, and a replica whose file was rewritten is refused
by the cluster, by the other replicas and by consumers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import etcd3gw
import orjson
import pytest

from tests.conftest import ProcessGroup, free_port, require_tool, wait_for_port, zerostack_cmd
from zerostack.cli.ledger_cluster import cluster_status
from zerostack.crypto import Identity, load_identity
from zerostack.ledger import LedgerClient, LedgerError, SqliteLog
from zerostack.ledger.block import GENESIS_HASH, Block, Checkpoint
from zerostack.ledger.chain import verify_log
from zerostack.ledger.cluster import LedgerCluster, start_cluster
from zerostack.ledger.errors import Rejected
from zerostack.ledger.etcd import EtcdLog, height_key
from zerostack.ledger.pin import HeaderPin
from zerostack.ledger.replica import Genesis
from zerostack.ledger.state import apply_with_receipt, tick
from zerostack.ledger.tx import parse_tx, sign_tx, tx_hash
from zerostack.ledger.validators import approve_set


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LedgerCluster]:
    require_tool("etcd")
    c = start_cluster(tmp_path / "cluster", replicas=3, etcd_members=3,
                      name=f"t{random.randrange(1 << 30)}")
    try:
        yield c
    finally:
        c.stop()


def heads(urls: list[str]) -> list[dict[str, Any]]:
    out = []
    for u in urls:
        with LedgerClient(u) as c:
            out.append(c.head())
    return out


def describe_replicas(urls: list[str], cluster: LedgerCluster | None = None) -> str:
    """What each replica serves (head, materialized and final heights, counters) and the
    tail of its log: printed when replicas do not converge."""
    lines = []
    for i, u in enumerate(urls):
        try:
            with LedgerClient(u, timeout=5) as c:
                head = c.head()
                info = c._get("/cluster")
            sigs = sorted(s["key"][:8] for s in head.get("signatures", []))
            lines.append(f"{u}: head={head['height']} {str(head['hash'])[:12]} sigs={sigs} "
                         f"status={ {k: v for k, v in info.items() if k != 'validators'} }")
        except LedgerError as exc:
            lines.append(f"{u}: unreachable: {exc}")
        if cluster is not None and i < len(cluster.replicas):
            logf = cluster.replicas[i].dir / "replica.log"
            if logf.exists():
                tail = logf.read_text(errors="replace").splitlines()[-25:]
                lines += [f"  | {t[:300]}" for t in tail]
    return "\n".join(lines)


def wait_same_head(urls: list[str], height: int, timeout: float = 30.0,
                   cluster: LedgerCluster | None = None) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            hs = heads(urls)
            if all(h["height"] >= height for h in hs) and len({
                    (h["height"], h["hash"]) for h in hs}) == 1:
                return hs
        except LedgerError:
            pass
        if time.monotonic() >= deadline:
            pytest.fail(f"replicas did not converge on {height} within {timeout:.0f} s:\n"
                        + describe_replicas(urls, cluster))
        time.sleep(0.1)


def test_replicas_agree_on_every_block_and_serve_final_ones(cluster: LedgerCluster) -> None:
    users = [Identity.generate() for _ in range(3)]
    for i, user in enumerate(users):
        with LedgerClient(cluster.urls[i]) as c:  # each user talks to another replica
            c.register_twin(user)
            c.register_name(user, f"n{i}")
            # read-your-writes on the replica that answered: answered once final there
            assert c.name(f"n{i}") is not None
    top = max(h["height"] for h in heads(cluster.urls))
    hs = wait_same_head(cluster.urls, top)
    assert len(hs[0]["signatures"]) == 3  # 3 validators: final takes all three
    # every block, on every replica: the same bytes of header, final by 3 signatures
    for h in range(1, top + 1):
        headers = []
        for u in cluster.urls:
            with LedgerClient(u) as c:
                headers.append(c.header(h))
        assert len({x["hash"] for x in headers}) == 1
    with LedgerClient(cluster.urls[0]) as c:
        vals = c.validators()
    assert sorted(vals["validators"]) == sorted(cluster.validators) and vals["quorum"] == 3
    status = cluster_status(cluster.urls)
    assert status["problems"] == [] and {r["state"] for r in status["replicas"]} == {"ok"}
    # a consumer pins the set and the head, over all three URLs
    with LedgerClient(cluster.urls) as c:
        pin = HeaderPin(cluster.dir / "pin.json")
        pin.check(c)
        assert pin.validators == sorted(cluster.validators) and pin.height == top
        everything = c.events(0, timeout=0)["events"]
        assert len(everything) == 6
        # a follower at event 2 whose replica dies resumes from its cursor elsewhere
        cursor = f"{everything[2]['height']}.{everything[2]['index']}"
        cluster.kill(cluster.replicas[0].proc)
        rest = c.events(cursor, timeout=0)["events"]
        assert [e["hash"] for e in rest] == [e["hash"] for e in everything[3:]]
        assert c.url != cluster.urls[0]


def _sender(url_list: list[str], user: Identity, twin: int, count: int, acked: dict[str, int],
            gaps: list[float], stop: threading.Event, lock: threading.Lock) -> None:
    """Submit `count` name registrations, one at a time, each until acknowledged: the same
    signed bytes are sent again after an error (never a new nonce for the same intent)."""
    with LedgerClient(url_list, timeout=10) as c:
        last = time.monotonic()
        for n in range(count):
            tx = sign_tx(user, "name.register", twin, n + 1, {"name": f"u{twin}-{n}"})
            while True:
                if stop.is_set():
                    return
                try:
                    result = c.submit(tx)
                    break
                except LedgerError:
                    time.sleep(0.05)
            now = time.monotonic()
            with lock:
                acked[result["hash"]] = int(result["height"])
                gaps.append(now - last)
            last = now


def test_kill9_of_an_etcd_member_and_a_replica_under_load(cluster: LedgerCluster) -> None:
    users = [Identity.generate() for _ in range(6)]
    twins = []
    with LedgerClient(cluster.urls) as c:
        for u in users:
            twins.append(c.register_twin(u))
    acked: dict[str, int] = {}
    gaps: list[float] = []
    lock, stop = threading.Lock(), threading.Event()
    per_user = 30
    threads = []
    for i, (u, t) in enumerate(zip(users, twins, strict=True)):
        urls = cluster.urls[i % 3:] + cluster.urls[:i % 3]  # spread the load
        threads.append(threading.Thread(target=_sender, args=(
            urls, u, t, per_user, acked, gaps, stop, lock), daemon=True))
    for th in threads:
        th.start()
    rng = random.Random()
    time.sleep(rng.uniform(0.5, 1.5))
    member = rng.choice(cluster.members)
    cluster.kill(member.proc)
    time.sleep(rng.uniform(0.3, 1.5))
    victim = rng.choice(cluster.replicas)
    cluster.kill(victim.proc)
    # while it is down, blocks are ordered but cannot be final (3 validators: all three
    # must sign): submissions are answered as ordered after FINAL_WAIT (3 s); it comes back,
    # over its own file, under load, and catches up
    time.sleep(rng.uniform(1.0, 2.0))
    cluster.start_replica(victim)
    deadline = time.monotonic() + 120
    for th in threads:
        th.join(max(0.1, deadline - time.monotonic()))
    stop.set()
    assert len(acked) == per_user * len(users), f"only {len(acked)} acknowledged"
    top = max(acked.values())
    hs = wait_same_head(cluster.urls, top, timeout=60, cluster=cluster)
    height = hs[0]["height"]
    # every acknowledged transaction is on every replica, once, where it was acknowledged
    for u in cluster.urls:
        seen: dict[str, int] = {}
        with LedgerClient(u) as c:
            for h in range(1, height + 1):
                block = c.block(h)
                assert block is not None
                for tx in block["txs"]:
                    th = tx_hash(tx)
                    assert th not in seen, f"{th} applied twice"
                    seen[th] = h
        for tx_h, at in acked.items():
            assert seen.get(tx_h) == at, f"acknowledged {tx_h} at {at}, found {seen.get(tx_h)}"
    longest = max(gaps)
    print(f"longest pause between acknowledgements: {longest:.2f} s")
    assert longest < 30


def _replica_info(url: str) -> dict[str, Any]:
    with LedgerClient(url) as c:
        info: dict[str, Any] = c._get("/cluster")
        return info


def _wait_info(url: str, what: str, height: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _replica_info(url)[what] >= height:
                return
        except LedgerError:
            pass
        assert time.monotonic() < deadline, f"{url}: {what} never reached {height}"
        time.sleep(0.1)


def test_a_signature_lost_to_a_kill9_is_published_again_at_restart(
        cluster: LedgerCluster) -> None:
    """A replica killed after writing a block to its file but before its signature reached
    etcd: the block is final in its own file (it collected the others' signatures), never
    on the others without its signature. Started again, it publishes it and the cluster
    converges."""
    a, b, c = cluster.replicas
    user = Identity.generate()
    with LedgerClient(a.url) as client:
        client.register_twin(user)
    wait_same_head(cluster.urls, max(h["height"] for h in heads(cluster.urls)), cluster=cluster)
    cluster.kill(b.proc)
    cluster.kill(c.proc)
    with LedgerClient(a.url, timeout=30) as client:  # ordered, not final (B and C are down)
        result = client.send(user, "name.register", {"name": "lost-sig"})
    height = int(result["height"])
    assert result["final"] is False
    etcd = EtcdLog(cluster.etcd_urls, cluster.name)
    # B follows the block and publishes its signature, then stops
    cluster.start_replica(b)
    _wait_info(b.url, "materialized", height)
    deadline = time.monotonic() + 30
    while etcd.get(f"sig/{height_key(height)}/{b.key}") is None:
        assert time.monotonic() < deadline, "B never published its signature"
        time.sleep(0.1)
    cluster.kill(b.proc)
    # C follows it, collects A's and B's signatures: final in C's file; killed, its own
    # publication is lost (what a kill -9 between the write and the put leaves)
    cluster.start_replica(c)
    _wait_info(c.url, "final", height)
    cluster.kill(c.proc)
    host, port = cluster.etcd_urls[0].removeprefix("http://").split(":")
    raw = etcd3gw.Etcd3Client(host=host, port=int(port), api_path="/v3/")
    assert raw.delete(f"{etcd.prefix}sig/{height_key(height)}/{c.key}")
    # B holds the block without C's signature; C must publish it again
    cluster.start_replica(b)
    cluster.start_replica(c)
    # (a restarted replica serves the head of its file at once: its final height tells)
    for r in cluster.replicas:
        try:
            _wait_info(r.url, "final", height)
        except AssertionError:
            pytest.fail(f"{r.url}: block {height} never final:\n"
                        + describe_replicas(cluster.urls, cluster))
    hs = wait_same_head(cluster.urls, height, timeout=30, cluster=cluster)
    assert hs[0]["height"] == height and len(hs[0]["signatures"]) == 3
    assert etcd.get(f"sig/{height_key(height)}/{c.key}") is not None


def _rewrite(db: Path, rogue: Identity, genesis: Genesis, drop: str) -> int:
    """What a dishonest operator does to its replica's file: drop transaction `drop`,
    recompute every later block (hashes, index, checkpoint) and sign them all again with
    its own key. Returns the height of the block it changed."""
    old = SqliteLog(db)
    blocks = [(s.height, s.data) for s in old.blocks(1)]
    old.close()
    db.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    new = SqliteLog(db)
    state, prev, changed = genesis.state(), GENESIS_HASH, 0
    for height, data in blocks:
        wire = orjson.loads(data)
        txs = [parse_tx(t) for t in wire["txs"]]
        kept = [t for t in txs if t.hash_hex != drop]
        if len(kept) != len(txs):
            changed = height
        state = tick(state, wire["header"]["time"])
        receipts = []
        for t in kept:
            result = apply_with_receipt(state, t, time=wire["header"]["time"])
            assert not isinstance(result, Rejected), result
            state, receipt = result
            receipts.append(receipt)
        block = Block.build(height, prev, wire["header"]["time"], kept).signed(rogue)
        new.append(block, receipts, Checkpoint.make(rogue, height, block.hash))
        prev = block.hash
    new.close()
    return changed


def test_a_replica_whose_history_was_rewritten_is_caught(
        cluster: LedgerCluster, procs: ProcessGroup) -> None:
    user = Identity.generate()
    with LedgerClient(cluster.urls) as c:
        c.register_twin(user)
        c.register_name(user, "held")
        release = c.send(user, "name.release", {"name": "held"})
        c.register_twin(Identity.generate())  # one more block after it
        assert c.name("held") is None
    # a dry node agent follows the honest cluster and pins it
    with LedgerClient(cluster.urls) as c:
        farmer = Identity.generate()
        c.register_twin(farmer)
        farm = c.create_farm(farmer, f"rw{random.randrange(1 << 30)}")
    node_dir = cluster.dir / "node"
    node_args = ["--farm", str(farm), "--data", str(node_dir), "--zdb-port", str(free_port()),
                 "--resync", "1", "--heartbeat", "3600", "--dry"]
    node_log = cluster.dir / "node.log"
    with open(node_log, "ab") as out:
        node = procs.start([*zerostack_cmd(), "node", "run", "--ledger",
                            ",".join(cluster.urls), *node_args], stdout=out, stderr=out)
    pinned = node_dir / "ledger-head.json"
    deadline = time.monotonic() + 40
    while not (pinned.exists() and "validators" in pinned.read_text()):
        assert node.poll() is None and time.monotonic() < deadline, node_log.read_text()
        time.sleep(0.1)
    top = max(h["height"] for h in heads(cluster.urls))
    wait_same_head(cluster.urls, top)
    time.sleep(1.5)  # a resync pass pins the last head
    node.terminate()
    node.wait(timeout=30)
    # a consumer saw the honest cluster
    pin_file = cluster.dir / "node-pin.json"
    with LedgerClient(cluster.urls) as c:
        HeaderPin(pin_file).check(c)
    rogue_replica = cluster.replicas[2]
    rogue = load_identity(rogue_replica.key_file)
    cluster.kill(rogue_replica.proc)
    etcd = EtcdLog(cluster.etcd_urls, cluster.name)
    genesis = Genesis.from_json(etcd.get("genesis") or b"")
    changed = _rewrite(rogue_replica.db, rogue, genesis, release["hash"])
    assert changed > 0
    # 1. started again in the cluster, it refuses its own file
    with pytest.raises(LedgerError):
        cluster.start_replica(rogue_replica, timeout=30)
    log = " ".join((rogue_replica.dir / "replica.log").read_text().split())  # unwrapped
    assert "differs from the one the cluster ordered" in log, log[-2000:]
    # 2. its operator serves the rewritten file alone: the file checks out on its own
    #    (every block signed by its key) and still holds the name...
    port = free_port()
    solo = procs.start([*zerostack_cmd(), "ledger", "serve", "--db", str(rogue_replica.db),
                        "--key", str(rogue_replica.key_file), "--listen", f"127.0.0.1:{port}"])
    wait_for_port(port, proc=solo)
    rogue_url = f"http://127.0.0.1:{port}"
    with LedgerClient(rogue_url) as c:
        assert c.name("held") is not None
    # ...but a node that saw the cluster refuses it: its blocks are not final
    with LedgerClient(rogue_url) as c, pytest.raises(LedgerError) as info:
        HeaderPin(pin_file).check(c)
    assert info.value.code == "untrusted" and "not final" in str(info.value)
    # the node agent, pointed at the rogue ledger alone, refuses to act on it and keeps
    # running
    with open(node_log, "ab") as out:
        node = procs.start([*zerostack_cmd(), "node", "run", "--ledger", rogue_url,
                            *node_args], stdout=out, stderr=out)
    deadline = time.monotonic() + 40
    while "ledger_refused" not in node_log.read_text():
        assert node.poll() is None and time.monotonic() < deadline, node_log.read_text()
        time.sleep(0.2)
    refusal = " ".join(node_log.read_text().split())
    assert "not final" in refusal or "forked" in refusal, refusal[-2000:]
    assert node.poll() is None
    # given the rogue and an honest replica, a consumer reports the rogue and moves on
    with LedgerClient([rogue_url, cluster.urls[0]]) as c:
        HeaderPin(pin_file).check(c)
        assert c.url == cluster.urls[0]
    # and `ledger status` over the replicas' URLs reports the fork
    status = cluster_status([*cluster.urls[:2], rogue_url])
    assert any("disagree on block" in p for p in status["problems"]), status
    # 3. the rewritten replica's signatures, published in etcd, are caught by the others
    with LedgerClient(rogue_url) as c:
        forged = c.header(changed)
    assert forged is not None
    sig = next(s for s in forged["signatures"] if s["key"] == rogue.public_hex)
    etcd.put(f"sig/{height_key(changed)}/{rogue.public_hex}", sig["signature"].encode())
    deadline = time.monotonic() + 15
    while True:
        infos = []
        for u in cluster.urls[:2]:
            with LedgerClient(u) as c:
                infos.append(c._get("/cluster"))
        if all(rogue.public_hex in i["disagree"] for i in infos):
            break
        assert time.monotonic() < deadline, infos
        time.sleep(0.2)
    # the two honest replicas (2 of 3: not a quorum) still hold the honest history
    with LedgerClient(cluster.urls[0]) as c:
        assert c.name("held") is None


def test_each_replica_file_verifies_with_its_key_and_holds_the_quorum(
        cluster: LedgerCluster) -> None:
    """Each replica's file is a ledger file that passes the full check of `verify`, every
    block signed by its replica's key, with the other validators' signatures beside it."""
    user = Identity.generate()
    with LedgerClient(cluster.urls) as c:
        c.register_twin(user)
        c.register_name(user, "x1")
    top = max(h["height"] for h in heads(cluster.urls))
    wait_same_head(cluster.urls, top)
    for r in cluster.replicas:
        log = SqliteLog(r.db)
        try:
            replayed = verify_log(log, operator_key=r.key, start=None)
            assert replayed.height >= top
            last = log.block(top)
            assert last is not None
            sigs = orjson.loads(last.data)["signatures"]
            assert sorted(s["key"] for s in sigs) == sorted(cluster.validators)
        finally:
            log.close()


def test_a_validator_is_added_by_the_quorum_and_then_carries_finality(
        cluster: LedgerCluster) -> None:
    """A fourth replica joins and follows; the three validators approve a set of four;
    from then on blocks are final with three of the four signatures, so the cluster
    keeps finalizing with one replica down; a consumer follows the change."""
    pin_file = cluster.dir / "user-pin.json"
    user = Identity.generate()
    with LedgerClient(cluster.urls) as c:
        c.register_twin(user)
        HeaderPin(pin_file).check(c)
    fourth = cluster.add_replica()
    new_set = sorted([*cluster.validators])  # the three genesis keys and the new one
    keys = [load_identity(r.key_file) for r in cluster.replicas[:3]]
    # too few approvals: refused, nothing changes
    with LedgerClient(cluster.urls[:3]) as c:
        twin = c.twin_id(user)
        few = {"validators": new_set, "epoch": 1,
               "approvals": [approve_set(k, 1, new_set) for k in keys[:2]]}
        with pytest.raises(LedgerError) as info:
            c.send(user, "validator.set", few, sender=twin)
        assert getattr(info.value, "code", "") == "unauthorized"
        payload = {"validators": new_set, "epoch": 1,
                   "approvals": [approve_set(k, 1, new_set) for k in keys]}
        result = c.send(user, "validator.set", payload, sender=twin)
        assert result["receipt"] == {"epoch": 1, "validators": new_set}
        assert c.validators()["quorum"] == 3
    # the new replica caught up and signs; then one of the genesis replicas dies
    cluster.kill(cluster.replicas[0].proc)
    live = [r.url for r in cluster.replicas[1:]]
    with LedgerClient(live) as c:
        c.register_name(user, "after-change")
        result = c.send(user, "name.register", {"name": "still-final"})
        assert result.get("final") is True, result
        head = c.head()
        assert fourth.key in {s["key"] for s in head["signatures"]}
        pin = HeaderPin(pin_file)
        pin.check(c)
        assert pin.epoch == 1 and pin.validators == new_set


def test_cluster_up_and_status_from_the_cli(tmp_path: Path, procs: ProcessGroup) -> None:
    """`zerostack ledger cluster up` runs etcd and replicas until SIGTERM, then stops
    them all; `zerostack ledger status` reads every replica."""
    require_tool("etcd")
    proc = procs.start([*zerostack_cmd(), "ledger", "cluster", "up", "--dir",
                        str(tmp_path / "c"), "--replicas", "2", "--etcd-members", "1",
                        "--cluster", f"cli{random.randrange(1 << 30)}", "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines = []
    while True:  # the JSON document ends with a closing brace on its own line
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else "no output"
        lines.append(line)
        if line.rstrip() == b"}":
            break
    info = orjson.loads(b"".join(lines))
    urls = [r["url"] for r in info["replicas"]]
    pids = [r["pid"] for r in info["replicas"]] + [m["pid"] for m in info["etcd"]]
    with LedgerClient(urls) as c:
        c.register_twin(Identity.generate())
    out = subprocess.run([*zerostack_cmd(), "ledger", "status", "--ledger", ",".join(urls),
                          "--json"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    status = orjson.loads(out.stdout)
    assert status["problems"] == [] and len(status["replicas"]) == 2
    assert {r["final"] for r in status["replicas"]} == {1}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in pids:  # every etcd member and replica is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
