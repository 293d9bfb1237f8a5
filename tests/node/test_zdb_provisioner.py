"""The zdb provisioner against a real Zero-DB server: namespace, password, limits, removal."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port
from zerostack.crypto import Identity
from zerostack.node.provisioners import NodeContext, Pool, ProvisionError, WorkloadID
from zerostack.node.provisioners.zdb import ZdbProvisioner
from zerostack.node.zdbd import ZdbServer
from zerostack.workloads import Deployment, ZdbWorkload


def test_namespace_lifecycle(tmp_path: Path) -> None:
    port = free_port()
    pools = [Pool("hdd1", tmp_path / "hdd1", "hdd")]
    server = ZdbServer(tmp_path, pools, port)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    try:
        assert (tmp_path / "hdd1" / "zdb" / "data").is_dir()  # HDD pool preferred
        node = NodeContext(tmp_path, Identity.generate(), pools, zdb_port=port,
                           zdb_admin=server.admin)
        prov = ZdbProvisioner(node)
        spec = ZdbWorkload(name="db", size=1 << 20, password="s3cret", mode="user")
        dep = Deployment.parse({"twin_id": 1, "workloads": [spec.model_dump()],
                                "signature_requirement": {"requests": [{"twin": 1, "key": "ab" * 32, "required": True}],
                                                          "weight_required": 1}})
        wid = WorkloadID(3, "db")
        res = prov.provision(wid, spec, dep)
        assert res.data == {"host": "127.0.0.1", "port": port, "namespace": "c3-db",
                            "mode": "user", "size": 1 << 20}
        assert prov.provision(wid, spec, dep) == res  # idempotent
        assert prov.namespaces() == {"default", "c3-db"}
        user = redis.Redis(port=port)
        with pytest.raises(redis.ResponseError):
            user.execute_command("SELECT", "c3-db", "wrong")
        # a client pool reconnects per command; keep one connection to stay in the namespace
        conn = user.connection_pool.get_connection()
        conn.send_command("SELECT", "c3-db", "s3cret")
        assert conn.read_response() == b"OK"
        conn.send_command("SET", "k", "v")
        assert conn.read_response() == b"k"
        info = prov.info("c3-db")
        assert info["data_limits_bytes"] == str(1 << 20) and info["password"] == "yes"
        with pytest.raises(ProvisionError, match="mode of a used namespace"):
            prov.provision(wid, spec.model_copy(update={"mode": "seq"}), dep)
        user.connection_pool.release(conn)
        prov.update(wid, spec, spec.model_copy(update={"public": True, "size": 2 << 20}), dep)
        info = prov.info("c3-db")
        assert info["public"] == "yes" and info["data_limits_bytes"] == str(2 << 20)
        assert info["password"] == "yes"
        # removed behind the agent's back: exists() notices, provision recreates once
        prov._cmd("NSDEL", "c3-db")
        assert not prov.exists(wid, spec)
        prov.provision(wid, spec, dep)
        assert prov.exists(wid, spec)
        prov.deprovision(wid, spec)
        prov.deprovision(wid, spec)
        assert prov.namespaces() == {"default"}
        prov.close()
    finally:
        loop.run_until_complete(server.stop())
        loop.close()


def test_the_agent_reaches_its_zero_db_where_it_listens() -> None:
    from zerostack.node.zdbd import connect_address

    assert connect_address("198.18.0.10") == "198.18.0.10"
    assert connect_address("fd00:5a::10") == "fd00:5a::10"
    assert connect_address("0.0.0.0") == "127.0.0.1"
    assert connect_address("::") == "::1"


def _free_replication_port(taken: set[int]) -> int:
    import random
    import socket

    from zerostack.workloads.types import REPLICATION_PORTS

    while True:
        port = random.choice(REPLICATION_PORTS)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port


def _dep(*workloads: ZdbWorkload) -> Deployment:
    return Deployment.parse({"twin_id": 1, "workloads": [w.model_dump() for w in workloads],
                             "signature_requirement": {
                                 "requests": [{"twin": 1, "key": "ab" * 32, "required": True}],
                                 "weight_required": 1}})


def test_a_replica_on_another_node_follows_its_primary_namespace(tmp_path: Path) -> None:
    """Two nodes (their own folders, the same loopback): the primary namespace runs on a
    server of its own, the replica follows it, reads what was written, refuses writes;
    removing either stops its server and deletes its files."""
    ports: set[int] = set()
    pport, rport = _free_replication_port(ports), _free_replication_port(ports)
    password = "r3plication-" + "x" * 20
    nodes = []
    for i in (1, 2):
        ctx = NodeContext(tmp_path / f"n{i}", Identity.generate(),
                          [Pool("hdd", tmp_path / f"n{i}" / "hdd", "hdd")])
        ctx.extra.update(node_id=i, zdb_primaries={1: "127.0.0.1"})
        nodes.append(ZdbProvisioner(ctx))
    primary = ZdbWorkload(name="arch-0", size=1 << 20, mode="seq", password="ns-s3cret",
                          replication={"port": pport, "password": password})
    replica = ZdbWorkload(name="arch-0-r", size=1 << 20, mode="seq",
                          replication={"port": rport, "password": password},
                          replica_of={"workload": "arch-0", "node": 1, "port": pport})
    pwid, rwid = WorkloadID(7, "arch-0"), WorkloadID(8, "arch-0-r")
    try:
        res = nodes[0].provision(pwid, primary, _dep(primary))
        assert res.data == {"host": "127.0.0.1", "port": pport, "namespace": "arch-0",
                            "mode": "seq", "size": 1 << 20, "replicated": True}
        assert nodes[0].provision(pwid, primary, _dep(primary)) == res  # idempotent
        root = tmp_path / "n1" / "hdd" / "zdb" / "replicated" / "c7-arch-0"
        assert (root / "zdb-admin.secret").stat().st_mode & 0o777 == 0o600
        assert root.stat().st_mode & 0o777 == 0o700
        got = nodes[1].provision(rwid, replica, _dep(replica))
        assert got.data["namespace"] == "arch-0" and got.data["read_only"] is True
        assert password not in str(got.data) and password not in str(res.data)

        writer = redis.Redis(port=pport, socket_timeout=5)
        conn = writer.connection_pool.get_connection()
        conn.send_command("SELECT", "arch-0", "ns-s3cret")
        assert conn.read_response() == b"OK"
        conn.send_command("SET", "", b"kept twice")
        key = conn.read_response()
        writer.connection_pool.release(conn)
        reader = redis.Redis(port=rport, socket_timeout=5)
        rconn = reader.connection_pool.get_connection()
        value = None
        deadline = time.monotonic() + 15
        while value is None:
            try:
                rconn.send_command("SELECT", "arch-0", "ns-s3cret")
                rconn.read_response()
                rconn.send_command("GET", key)
                value = rconn.read_response()
            except redis.ResponseError:
                value = None  # the namespace is not copied yet
            if value is None:
                assert time.monotonic() < deadline, "the replica did not catch up"
                time.sleep(0.1)
        assert value == b"kept twice"
        assert nodes[1].live_state(rwid, replica) == (
            "ok", "read-only replica of arch-0 on node 1: link online")
        assert nodes[0].live_state(pwid, primary) is None
        rconn.send_command("SET", "", b"no")
        with pytest.raises(redis.ResponseError, match="read-only"):
            rconn.read_response()
        reader.connection_pool.release(rconn)
        reader.close()
        writer.close()

        # the process died: exists() says so, provision starts it again on the same files
        server = nodes[1]._servers["c8-arch-0-r"]
        server.stop()
        assert not nodes[1].exists(rwid, replica)
        assert nodes[1].live_state(rwid, replica)[0] == "error"  # type: ignore[index]
        nodes[1].provision(rwid, replica, _dep(replica))
        assert nodes[1].exists(rwid, replica)
        with pytest.raises(ProvisionError, match="cannot change in place"):
            nodes[1].update(rwid, replica, replica.model_copy(update={"replica_of": None}),
                            _dep(replica))

        nodes[1].deprovision(rwid, replica)
        nodes[0].deprovision(pwid, primary)
        nodes[0].deprovision(pwid, primary)  # already gone: fine
        assert not root.exists()
        assert not (tmp_path / "n2" / "hdd" / "zdb" / "replicated" / "c8-arch-0-r").exists()
    finally:
        for p in nodes:
            p.close()


def test_a_replica_is_refused_on_its_primarys_node_or_without_its_primary(
        tmp_path: Path) -> None:
    ctx = NodeContext(tmp_path, Identity.generate(), [Pool("hdd", tmp_path / "hdd", "hdd")])
    ctx.extra.update(node_id=1, zdb_primaries={2: ""})
    prov = ZdbProvisioner(ctx)
    spec = ZdbWorkload(name="r", size=1 << 20,
                       replication={"port": 24001, "password": "p" * 16},
                       replica_of={"workload": "a", "node": 1, "port": 24002})
    with pytest.raises(ProvisionError, match="on this same node"):
        prov.provision(WorkloadID(1, "r"), spec, _dep(spec))
    other = spec.model_copy(update={"replica_of": spec.replica_of.model_copy(  # type: ignore[union-attr]
        update={"node": 2})})
    with pytest.raises(ProvisionError, match="no registered address"):
        prov.provision(WorkloadID(1, "r"), other, _dep(other))
    assert not (tmp_path / "hdd" / "zdb" / "replicated" / "c1-r" / "zdb.pid").exists()
    dep = _dep(spec)
    from zerostack.workloads import summarize
    shown = summarize(dep)["workloads"][0]
    assert shown["replica_of"] == "a on node 1" and "p" * 16 not in str(shown)
    assert "on this same node 1" in (dep.replication_problem(1) or "")
    assert dep.replication_problem(2) is None
    loose = ZdbWorkload(name="r", size=1 << 20, replica_of={"workload": "a"})
    assert "fills them in" in (_dep(loose).replication_problem(2) or "")
    with pytest.raises(Exception, match="on the same node"):
        _dep(loose, ZdbWorkload(name="a", size=1 << 20))
    with pytest.raises(Exception, match="replica of itself"):
        ZdbWorkload(name="a", size=1 << 20, replica_of={"workload": "a"})


def test_the_primarys_address_is_read_from_its_registered_endpoint() -> None:
    from zerostack.node.zdbd import endpoint_address

    assert endpoint_address("198.18.0.10") == "198.18.0.10"
    assert endpoint_address("198.18.0.10:7000") == "198.18.0.10"
    assert endpoint_address("[fd00:5a::10]:7000") == "fd00:5a::10"
    assert endpoint_address("fd00:5a::10") == "fd00:5a::10"
    assert endpoint_address("http://10.0.0.1:80") == "10.0.0.1"
    assert endpoint_address("") == endpoint_address("node.example") == ""


def test_a_replica_pointed_at_a_server_without_the_password_sends_it_nothing(
        tmp_path: Path) -> None:
    """The node learns its primary's address from a ledger answer it cannot check: told a
    wrong one, its replica's server gives that address no password and follows nothing."""
    from tests.zdb.replication.test_replauth import FAKES, Listener, fake_primary

    pport = _free_replication_port(set())
    rport = _free_replication_port({pport})
    password = "r3plication-" + "y" * 20
    fake = Listener(fake_primary(FAKES["made-up proof"]), port=pport, host="127.0.0.2")
    ctx = NodeContext(tmp_path / "n2", Identity.generate(),
                      [Pool("hdd", tmp_path / "n2" / "hdd", "hdd")])
    ctx.extra.update(node_id=2, zdb_primaries={1: "127.0.0.2"})  # the ledger's lie
    node = ZdbProvisioner(ctx)
    replica = ZdbWorkload(name="arch-0-r", size=1 << 20, mode="seq",
                          replication={"port": rport, "password": password},
                          replica_of={"workload": "arch-0", "node": 1, "port": pport})
    wid = WorkloadID(8, "arch-0-r")
    try:
        node.provision(wid, replica, _dep(replica))
        deadline = time.monotonic() + 30
        while len([r for r in fake.received if r]) < 2:
            assert time.monotonic() < deadline, "the replica never tried the address"
            time.sleep(0.1)
        assert node.live_state(wid, replica) == (
            "ok", "read-only replica of arch-0 on node 1: link connecting")
        with fake.lock:
            everything = b"".join(fake.received)
        assert password.encode() not in everything
        assert b"CHALLENGE" in everything and b"PROOF" not in everything
        log = (tmp_path / "n2" / "hdd" / "zdb" / "replicated" / "c8-arch-0-r" /
               "zdb.log").read_text()
        assert "event=zdb.replication.primary.unproven primary=127.0.0.2" in log
        assert password not in log
        node.deprovision(wid, replica)
    finally:
        node.close()
        fake.close()
