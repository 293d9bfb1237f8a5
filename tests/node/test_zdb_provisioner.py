"""The zdb provisioner against a real Zero-DB server: namespace, password, limits, removal."""

from __future__ import annotations

import asyncio
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
