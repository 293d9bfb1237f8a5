"""End to end with real processes: ledger server, node agent, the node's Zero-DB.

Multi-signature quorum, redis clients on provisioned namespaces, self-healing, cancel,
refusals that leave other workloads running, and kill -9 mid-provisioning.
"""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ProcessGroup, require_root, require_tool
from tests.node.harness import Grid
from zerostack.crypto import (
    Domain,
    Identity,
    SignatureRequirement,
    canonical_json,
    deployment_hash,
    hash_hex,
    seal_envelope,
)
from zerostack.ledger import LedgerRejected
from zerostack.ledger.tx import sign_approval, sign_tx
from zerostack.node.provisioners.volume import mounted_at


def admin(port: int, data: Path) -> redis.Redis:
    r = redis.Redis(port=port, single_connection_client=True)
    r.execute_command("AUTH", (data / "zdb-admin.secret").read_text().strip())
    return r


def namespaces(port: int, data: Path) -> set[str]:
    return {n.decode() for n in admin(port, data).execute_command("NSLIST")} - {"default"}


def open_ns(port: int, ns: str, password: str) -> redis.Redis:
    """A client on one namespace, with Zero-DB's raw replies (SET answers the key)."""
    r = redis.Redis(port=port, single_connection_client=True)
    for cmd in ("SELECT", "SET", "GET"):
        r.set_response_callback(cmd, lambda resp, **kw: resp)
    assert r.execute_command("SELECT", ns, password) == b"OK"
    return r


def wait_until(check: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def node_key(grid: Grid, node: int) -> str:
    info = grid.client.node(node)
    assert info is not None
    twin = grid.client.twin(info["twin"])
    assert twin is not None
    return str(twin["public_key"])


def raw_contract(grid: Grid, owner: Identity, node: int, deployment: dict[str, Any], *,
                 claimed_body: str | None = None, signer: Identity | None = None,
                 capacity: dict[str, int] | None = None) -> int:
    """Create a contract from a hand-made deployment dict (what a buggy or hostile client
    could send): the node must judge it, whatever the ledger accepted. `claimed_body` is a
    body hash other than the sealed body's; `signer` signs the deployment instead of the
    owner."""
    req = SignatureRequirement.from_dict(deployment["signature_requirement"])
    body = {k: v for k, v in deployment.items()
            if k not in ("contract_id", "signature_requirement", "delete_requirement")}
    real = deployment_hash(hash_hex(body), req, None)
    claimed = deployment_hash(claimed_body or hash_hex(body), req, None)
    sig = (signer or owner).sign(Domain.DEPLOYMENT, bytes.fromhex(real)).hex()
    sealed = seal_envelope([node_key(grid, node), owner.public_hex],
                           canonical_json({"deployment": deployment, "owner_signature": sig}))
    kw: dict[str, Any] = {"capacity": capacity} if capacity else {}
    return grid.client.create_contract(owner, node, claimed, base64.b64encode(sealed).decode(),
                                       req.to_dict(), body_hash=claimed_body or hash_hex(body),
                                       **kw)


def dep_dict(owner: Identity, twin: int, workloads: list[dict[str, Any]],
             others: list[tuple[Identity, int, bool]] = (),  # type: ignore[assignment]
             weight: int = 1) -> dict[str, Any]:
    """A full deployment (every field, as Deployment.to_dict writes it) by `owner`, with
    `others` = (identity, twin, required) as stakeholders of weight 1."""
    requests = [{"twin": twin, "key": owner.public_hex, "weight": 1, "required": True}]
    requests += [{"twin": t, "key": i.public_hex, "weight": 1, "required": r}
                 for i, t, r in others]
    return {"version": 1, "twin_id": twin, "contract_id": 0, "metadata": "", "description": "",
            "nonce": os.urandom(4).hex(),
            "signature_requirement": {"requests": requests, "weight_required": weight},
            "delete_requirement": None, "workloads": workloads}


def zdb_wl(name: str, password: str = "pw", size: int = 1 << 20) -> dict[str, Any]:
    return {"type": "zdb", "name": name, "description": "", "size": size, "mode": "user",
            "password": password, "public": False, "disk_type": "hdd"}


def test_zdb_two_of_three_quorum_self_healing_and_cancel(procs: ProcessGroup,
                                                         tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    _, zport, data, node = grid.ready_node()
    owner, owner_twin = grid.user()
    stakeholders = [grid.user() for _ in range(3)]
    cid, dep = grid.deploy(
        owner, owner_twin, [{"type": "zdb", "name": "db", "size": "4M", "password": "s3cret"}],
        node, [f"{owner_twin}:0:required", *(f"{t}:1" for _, t in stakeholders)], 2)
    c = grid.client.contract(cid)
    assert c is not None and c["state"] == "created"
    # first stakeholder: weight 1 of 2, nothing may happen on the node
    grid.client.approve(stakeholders[0][0], cid, dep.hash())
    time.sleep(1.5)  # > one resync period of the agent
    assert namespaces(zport, data) == set()
    assert grid.client.contract(cid)["state"] == "created"
    # second stakeholder completes the quorum
    grid.client.approve(stakeholders[1][0], cid, dep.hash())
    c = grid.wait_contract(cid, {"deployed", "error"})
    assert c["state"] == "deployed", c["report"]
    [w] = c["report"]["workloads"]
    assert w["state"] == "ok" and w["data"]["namespace"] == f"c{cid}-db"
    assert w["data"]["port"] == zport
    ns = open_ns(zport, w["data"]["namespace"], "s3cret")
    assert ns.execute_command("SET", "hello", "world") == b"hello"
    assert ns.execute_command("GET", "hello") == b"world"
    ns.close()
    with pytest.raises(redis.ResponseError):
        open_ns(zport, w["data"]["namespace"], "wrong")
    # removed behind the agent's back: recreated once by the periodic reconcile
    admin(zport, data).execute_command("NSDEL", f"c{cid}-db")
    wait_until(lambda: namespaces(zport, data) == {f"c{cid}-db"}, what="namespace recreated")
    # cancel: deprovisioned and reported deleted
    grid.client.cancel(owner, cid)
    c = grid.wait_contract(cid, {"deleted"})
    assert [w["state"] for w in c["report"]["workloads"]] == ["deleted"]
    assert namespaces(zport, data) == set()


def test_volume_created_size_limited_and_removed(procs: ProcessGroup, tmp_path: Path) -> None:
    require_root()
    require_tool("mkfs.ext4")
    grid = Grid(procs, tmp_path)
    proc, _, data = grid.start_node("vnode", "--pool", f"ssd1:{tmp_path / 'ssd1'}:ssd",
                                    "--pool", f"hdd1:{tmp_path / 'hdd1'}:hdd")
    node = grid.node_id(data, proc)
    owner, twin = grid.user()
    cid, _ = grid.deploy(owner, twin, [{"type": "volume", "name": "vol", "size": "20M"}], node)
    mnt = data / "volumes" / f"c{cid}-vol"
    try:
        c = grid.wait_contract(cid, {"deployed", "error"})
        assert c["state"] == "deployed", c["report"]
        assert c["report"]["workloads"][0]["data"]["id"] == f"c{cid}-vol"
        assert mounted_at(mnt) is not None
        st = os.statvfs(mnt)
        assert 10 << 20 < st.f_blocks * st.f_frsize <= 20 << 20
        assert (tmp_path / "ssd1" / "volumes" / f"c{cid}-vol.img").exists()
        grid.client.cancel(owner, cid)
        grid.wait_contract(cid, {"deleted"})
        assert mounted_at(mnt) is None and not mnt.exists()
        assert not (tmp_path / "ssd1" / "volumes" / f"c{cid}-vol.img").exists()
    finally:
        if mounted_at(mnt) is not None:
            os.system(f"umount {mnt}")


def test_bad_contracts_are_refused_and_others_keep_running(procs: ProcessGroup,
                                                           tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    _, zport, data, node = grid.ready_node()
    owner, twin = grid.user()
    other, other_twin = grid.user()
    good, _ = grid.deploy(owner, twin, [{"type": "zdb", "name": "keep", "size": "1M",
                                         "password": "k"}], node)
    grid.wait_contract(good, {"deployed"})
    ns = open_ns(zport, f"c{good}-keep", "k")
    ns.execute_command("SET", "before", "1")

    def refused(cid: int, needle: str) -> None:
        c = grid.wait_contract(cid, {"error", "deployed"})
        assert c["state"] == "error", c
        assert needle in c["report"]["error"], c["report"]["error"]

    # 1. the contract's hash is not the hash of the sealed instructions
    d = dep_dict(owner, twin, [zdb_wl("wrong")])
    bogus = hash_hex({"metadata": "something else"})
    refused(raw_contract(grid, owner, node, d, claimed_body=bogus), "deployment hash mismatch")
    # 2. instructions signed by someone else than the owner they name
    refused(raw_contract(grid, owner, node, dep_dict(owner, twin, [zdb_wl("unsigned")]),
                         signer=other),
            f"the deployment is not signed by its owner (twin {twin}")
    # 3. a forged approval (twin `other` "signing" with someone else's key) never reaches
    #    the quorum: the ledger refuses it and the node provisions nothing
    d = dep_dict(owner, twin, [zdb_wl("forged")], [(other, other_twin, False)], weight=2)
    cid = raw_contract(grid, owner, node, d)
    h = grid.client.contract(cid)["deployment_hash"]
    forger = Identity.generate()
    nonce = grid.client.next_nonce(other_twin)
    with pytest.raises(LedgerRejected, match="does not verify"):
        grid.client.submit(sign_tx(other, "contract.approve", other_twin, nonce, {
            "contract": cid, "deployment_hash": h, "signature": sign_approval(forger, cid, 1, node, h)}))
    assert grid.client.contract(cid)["state"] == "created"
    # 4. more than the node has
    refused(raw_contract(grid, owner, node, dep_dict(owner, twin, [zdb_wl("huge", size=1 << 50)])),
            "over capacity: hru")
    # 5. an unknown workload field
    refused(raw_contract(grid, owner, node,
                         dep_dict(owner, twin, [{**zdb_wl("typo"), "sise": 5}])),
            "workloads.0.zdb.sise: Extra inputs are not permitted")
    # nothing of the above exists; the good namespace still serves its data
    assert namespaces(zport, data) == {f"c{good}-keep"}
    assert ns.execute_command("GET", "before") == b"1"
    assert grid.client.contract(good)["state"] == "deployed"
    ns.close()


def test_a_public_ip_the_node_cannot_hold_is_an_error_and_its_cancel_frees_it(
        procs: ProcessGroup, tmp_path: Path) -> None:
    """The ledger gives the contract an address of the farm's pool; a node with no link
    on its subnet reports the workload `error` (touching nothing), and the cancel gives
    the address back."""
    grid = Grid(procs, tmp_path)
    _, _, _, node = grid.ready_node("nnode")
    owner, twin = grid.user()
    public_ip = {"type": "public_ip", "name": "ip"}
    grid.client.send(grid.farmer, "farm.public_ips", {"farm": grid.farm, "add": [
        {"ip": "198.18.250.200/24", "gateway": "198.18.250.1"}]})
    cid, _ = grid.deploy(owner, twin, [zdb_wl("db"), public_ip], node)
    c = grid.wait_contract(cid, {"error", "deployed"})
    assert c["state"] == "error", c
    assert c["public_ips"] == ["198.18.250.200/24"]
    ws = {w["name"]: w for w in c["report"]["workloads"]}
    assert "is not on a link of this node" in ws["ip"]["message"], ws
    assert ws["db"]["state"] == "ok"
    grid.client.cancel(owner, cid)
    grid.wait_contract(cid, {"deleted"})
    assert not any(grid.client.node(node)["reserved"].values())
    assert grid.client.contract(cid)["public_ips"] == []  # back in the pool

def test_kill9_mid_provisioning_converges(procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    proc, zport, data, node = grid.ready_node()
    owner, twin = grid.user()
    workloads = [{"type": "zdb", "name": f"db{i}", "size": "1M", "password": f"p{i}"}
                 for i in range(60)]
    cid, _ = grid.deploy(owner, twin, workloads, node)

    def some_done() -> bool:
        try:
            with sqlite3.connect(data / "state.db", timeout=1) as db:
                return db.execute("SELECT count(*) FROM workloads").fetchone()[0] > 0
        except sqlite3.Error:
            return False

    wait_until(some_done, what="provisioning started")
    os.killpg(proc.pid, signal.SIGKILL)  # the agent and its Zero-DB, mid-way
    proc.wait()
    with sqlite3.connect(data / "state.db") as db:
        states = [s for (s,) in db.execute("SELECT state FROM workloads")]
    proc2, _, _ = grid.start_node(zdb_port=zport)
    # 60 namespaces, each NSNEW/NSSET syncing its descriptor: under a loaded CI machine
    # this takes tens of seconds
    c = grid.wait_contract(cid, {"deployed", "error"}, timeout=90)
    assert c["state"] == "deployed", c["report"]
    assert sorted(w["name"] for w in c["report"]["workloads"]) == sorted(
        w["name"] for w in workloads)
    assert all(w["state"] == "ok" for w in c["report"]["workloads"])
    assert namespaces(zport, data) == {f"c{cid}-db{i}" for i in range(60)}
    for i in (0, 59):
        assert open_ns(zport, f"c{cid}-db{i}", f"p{i}").execute_command("SET", "k", "v")
    with sqlite3.connect(data / "state.db") as db:
        assert db.execute("SELECT count(*), min(state), max(state) FROM workloads"
                          ).fetchone() == (60, "ok", "ok")
    assert grid.node_id(data, proc2) == node  # same identity, no second registration
    print(f"killed with {len(states)} workloads recorded: {sorted(set(states))}")


def test_update_applies_the_diff_and_refuses_a_type_change(procs: ProcessGroup,
                                                           tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    _, zport, data, node = grid.ready_node("unode")
    owner, twin = grid.user()
    cid, _ = grid.deploy(owner, twin, [zdb_wl("a"), zdb_wl("b")], node)
    grid.wait_contract(cid, {"deployed"})
    open_ns(zport, f"c{cid}-a", "pw").execute_command("SET", "x", "1")

    def update(workloads: list[dict[str, Any]], version: int) -> None:
        with grid.bot(owner) as bot:
            bot.update(cid, bot.build({"workloads": workloads}, [], None, version))

    # v2: a grows, b goes, c comes
    update([zdb_wl("a", size=2 << 20), zdb_wl("c")], 2)
    wait_until(lambda: (grid.client.contract(cid) or {}).get("report") is not None
               and grid.client.contract(cid)["report"]["version"] == 2, what="v2 report")
    c = grid.client.contract(cid)
    assert c["state"] == "deployed", c["report"]
    assert [w["name"] for w in c["report"]["workloads"]] == ["a", "c"]
    assert namespaces(zport, data) == {f"c{cid}-a", f"c{cid}-c"}
    info = admin(zport, data).execute_command("NSINFO", f"c{cid}-a").decode()
    assert f"data_limits_bytes: {2 << 20}" in info
    assert open_ns(zport, f"c{cid}-a", "pw").execute_command("GET", "x") == b"1"
    # v3 turns `a` into a volume: refused, v2's workloads keep running
    update([{"type": "volume", "name": "a", "size": 16 << 20}, zdb_wl("c")], 3)
    wait_until(lambda: grid.client.contract(cid)["state"] == "error", what="v3 refused")
    assert "cannot change type from zdb to volume" in grid.client.contract(cid)["report"]["error"]
    assert namespaces(zport, data) == {f"c{cid}-a", f"c{cid}-c"}
