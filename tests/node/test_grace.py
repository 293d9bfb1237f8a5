"""The grace period on a real node: a contract whose owner cannot pay is paused (its
container frozen by the cgroup freezer, its Zero-DB namespace read-only), resumed after a
top-up, and removed (and reported so) when its grace period ends unpaid. The node acts on
billing notices signed by the ledger's operator key only; and it reports each period's
consumption, signed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ProcessGroup, require_root, require_tool
from tests.flist.hub import start_hub
from tests.flist.image import busybox_rootfs
from tests.node.harness import Grid
from zerostack.crypto import Domain, Identity, billing_notice_digest
from zerostack.flist import Hub, ImageConfig, LocalStore, SignedFlist, build_dir, push_flist
from zerostack.ledger import LedgerClient, LedgerRejected
from zerostack.ledger.errors import LedgerError
from zerostack.node.billing import check_notice
from zerostack.node.runtime import ContainerRuntime

# 1,000 base units per second for a core or a GiB; billed every 2 s; 10 s of grace
POLICY = {"prices": {"cru": 3_600_000, "mru": 3_600_000, "sru": 3_600_000, "hru": 3_600_000},
          "max": {"cru": 10**9, "mru": 10**9, "sru": 10**9, "hru": 10**9},
          "period": 2, "grace": 10, "max_traffic": 1 << 30}


def wait(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def drain(client: LedgerClient, owner: Identity, twin: int, sink: int) -> None:
    """Give all of `twin`'s money away: the next boundary cannot be paid."""
    while (left := client.account(twin)["balance"]) > 0:
        try:
            client.transfer(owner, sink, left)
        except LedgerRejected:  # a boundary charged it meanwhile: try again
            continue


def procs_state(runtime: ContainerRuntime, container: str) -> dict[int, str]:
    """pid -> the process state letter of every process of the container."""
    found = runtime.freezer(container)
    assert found is not None
    out = {}
    for pid in (found[0] / "cgroup.procs").read_text().split():
        stat = Path(f"/proc/{pid}/stat").read_text()
        out[int(pid)] = stat.rsplit(")", 1)[1].split()[0]
    return out


def is_frozen(runtime: ContainerRuntime, container: str) -> bool:
    """The kernel's word: cgroup v2 `cgroup.events` says frozen 1, or the v1 freezer says
    FROZEN and every process sleeps in the freezer (state D)."""
    found = runtime.freezer(container)
    if found is None:
        return False
    path, version = found
    if version == 2:
        return "frozen 1" in (path / "cgroup.events").read_text().splitlines()
    states = procs_state(runtime, container)
    return ((path / "freezer.state").read_text().strip() == "FROZEN" and bool(states)
            and all(s == "D" for s in states.values()))


def ns_client(port: int, ns: str) -> redis.Redis:
    r = redis.Redis(port=port, single_connection_client=True, socket_timeout=5)
    r.execute_command("SELECT", ns, "s3cret")
    return r


def test_grace_pauses_resumes_and_removes_on_a_real_node(procs: ProcessGroup,
                                                         tmp_path: Path) -> None:
    require_root()
    require_tool("runc")
    publisher = Identity.generate()
    store = LocalStore(tmp_path / "store")
    manifest, _ = build_dir(busybox_rootfs(tmp_path / "img"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, publisher)
    hub = start_hub(procs, tmp_path)
    with Hub(hub) as h:
        push_flist(flist, store, h)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    grid = Grid(procs, tmp_path, "--dev-faucet", "--policy", str(policy))
    _, zport, data, node = grid.ready_node("node", "--hub", hub, "--flist-publisher",
                                           publisher.public_hex)
    runtime = ContainerRuntime(data / "containers")
    owner, twin = grid.user()
    _, sink = grid.user()
    grid.client.faucet(owner, 10**7)
    cid, _ = grid.deploy(owner, twin, [
        {"type": "zdb", "name": "db", "size": "4M", "password": "s3cret"},
        {"type": "container", "name": "app", "flist": f"{hub}/{flist.hash_hex}",
         "publishers": [publisher.public_hex], "memory": "32M",
         "args": ["trap 'exit 0' TERM; while true; do sleep 0.2; done"]},
    ], node)
    try:
        c = grid.wait_contract(cid, {"deployed", "error"}, timeout=60)
        assert c["state"] == "deployed", (c, grid.log_tail("node"))
        app = next(w for w in c["report"]["workloads"] if w["name"] == "app")
        container, ns = app["data"]["container"], f"c{cid}-db"
        db = ns_client(zport, ns)
        db.set("kept", "before")

        # the node reports every ended period, signed in its own domain
        billed = wait("a consumption report", lambda: (grid.client.contract(cid) or {})
                      .get("billing", {}).get("consumption"))
        assert billed["reserved"]["cru"] == 1 and billed["reserved"]["mru"] == 32 << 20

        # out of money: grace at the next boundary; the node pauses the contract
        drain(grid.client, owner, twin, sink)
        wait("grace", lambda: grid.client.contract(cid)["state"] == "grace")
        # the node reports once both are paused
        paused = wait("the paused report", lambda: len(p := _paused(grid, cid)) == 2 and p)
        assert set(paused) == {"app", "db"}, paused
        assert is_frozen(runtime, container)
        with pytest.raises(redis.ResponseError, match="read-only"):
            db.set("kept", "during grace")
        assert db.get("kept") == b"before"  # reads are still served
        assert grid.client.contract(cid)["state"] == "grace"

        # the notice the node acted on is the operator's, for this contract and node
        pin = json.loads((data / "ledger-head.json").read_text())
        notice = grid.client.billing_notice(cid)
        assert notice["standing"] == "grace"
        key = pin["operator_key"]
        assert check_notice(notice, key, cid, node, 0, "") == "grace"
        with pytest.raises(LedgerError, match="not signed"):
            check_notice({**notice, "standing": "ended"}, key, cid, node, 0, "")
        with pytest.raises(LedgerError, match="stale"):
            check_notice(notice, key, cid, node, notice["height"] + 1, "")

        # a top-up pays what is due: the contract and its workloads resume
        grid.client.faucet(owner, 10**7)
        wait("the contract back", lambda: grid.client.contract(cid)["state"] == "deployed")
        wait("the container thawed", lambda: not is_frozen(runtime, container), timeout=10)
        wait("writes served again", lambda: _writes(db), timeout=10)
        assert db.get("kept") == b"after"

        # out of money again, and the grace period runs out: cancelled without any vote,
        # the node removes everything on the operator's `ended` notice and reports it
        drain(grid.client, owner, twin, sink)
        wait("grace again", lambda: grid.client.contract(cid)["state"] == "grace")
        wait("the container frozen again", lambda: is_frozen(runtime, container))
        c = wait("the grace end", lambda: (x := grid.client.contract(cid))["state"] in
                 ("cancelled", "deleted") and x, timeout=30)
        assert c["cancel_votes"] == {}
        wait("the removal reported", lambda: grid.client.contract(cid)["state"] == "deleted")
        assert container not in runtime.ids()
        assert runtime.freezer(container) is None
        with pytest.raises(redis.ResponseError, match="not found"):
            ns_client(zport, ns)
        bill = grid.client.bill(cid)
        assert bill["billing"]["grace_ended"] > 0 and bill["billing"]["unpaid"] > 0
        assert "event=contract_ended_unpaid contract=" in (tmp_path / "node.log").read_text()
    finally:
        for cont in runtime.ids():
            runtime.delete(cont)


def _paused(grid: Grid, cid: int) -> list[str]:
    report = grid.client.contract(cid)["report"] or {}
    return [w["name"] for w in report.get("workloads", []) if w["state"] == "paused"]


def _writes(db: redis.Redis) -> bool:
    try:
        db.set("kept", "after")
        return True
    except redis.ResponseError:
        return False


def test_a_lying_ledger_cannot_pause_or_remove_for_non_payment(procs: ProcessGroup,
                                                               tmp_path: Path) -> None:
    """A man in the middle says a paying contract is in grace, or ended unpaid, and serves
    notices it changed or signed itself: the node pauses and removes nothing."""
    from tests.node.test_untrusted_ledger import Rewrite, passthrough, tampering_proxy

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({**POLICY, "period": 3600, "grace": 3600}))
    grid = Grid(procs, tmp_path, "--dev-faucet", "--policy", str(policy))
    owner, twin = grid.user()
    grid.client.faucet(owner, 10**9)
    attacker = Identity.generate()
    rule: list[Rewrite] = [passthrough]
    with tampering_proxy(grid.url, rewrite=rule) as lying_ledger:
        proc, zport, data = grid.start_node("node", ledger=lying_ledger)
        node = grid.node_id(data, proc)
        cid, _ = grid.deploy(owner, twin, [{"type": "zdb", "name": "db", "size": "4M",
                                            "password": "s3cret"}], node)
        assert grid.wait_contract(cid, {"deployed", "error"})["state"] == "deployed"
        db = ns_client(zport, f"c{cid}-db")

        def lie(state: str, notice: Callable[[dict[str, Any]], dict[str, Any]]) -> Rewrite:
            def rewrite(path: str, status: int, body: Any) -> tuple[int, Any]:
                if path == f"/contracts/{cid}/notice":
                    return status, notice(body)
                if path.startswith("/contracts") and status == 200:
                    if isinstance(body, list):
                        body = [{**c, "state": state} if c.get("id") == cid else c
                                for c in body]
                    elif body.get("id") == cid:
                        body = {**body, "state": state}
                return status, body
            return rewrite

        def signed_by_attacker(n: dict[str, Any], standing: str) -> dict[str, Any]:
            n = {**n, "standing": standing, "key": attacker.public_hex}
            n.pop("signature", None)
            n["signature"] = attacker.sign(Domain.BILLING_NOTICE,
                                           billing_notice_digest(n)).hex()
            return n

        log = tmp_path / "node.log"
        # 1. "in grace", with the operator's notice edited to say so
        rule[0] = lie("grace", lambda n: {**n, "standing": "grace", "state": "grace"})
        wait("the edited notice refused", lambda: "not signed by the ledger's operator key"
             in log.read_text())
        time.sleep(1.5)  # more than one more pass
        db.set("k", "still writable")
        # 2. "ended unpaid", with a notice the attacker signed
        rule[0] = lie("cancelled", lambda n: signed_by_attacker(n, "ended"))
        wait("the anomaly", lambda: "event=contract_anomaly" in log.read_text())
        time.sleep(1.5)
        assert db.get("k") == b"still writable"
        db.set("k", "after the lies")
        assert "contract_paused" not in log.read_text()
        assert "contract_ended_unpaid" not in log.read_text()
        rule[0] = passthrough
        assert grid.client.contract(cid)["state"] == "deployed"
