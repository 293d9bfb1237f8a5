"""The container provisioner inside a real node agent: deploy by contract, report, logs,
refuse bad images, cancel removes everything."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup
from tests.node.harness import Grid
from tests.node.runtime.conftest import Env
from zerostack.crypto import Identity, open_sealed
from zerostack.node.provisioners import NodeContext, ProvisionError, WorkloadID
from zerostack.node.provisioners.container import ContainerProvisioner, parse_flist_ref
from zerostack.node.runtime import ContainerRuntime, cgroup_dirs, sign_log_request
from zerostack.workloads import ContainerWorkload


def test_flist_references() -> None:
    h = "ab" * 32
    assert parse_flist_ref(f"10.0.0.1:9900/hub/{h}", "") == (parse_flist_ref("10.0.0.1:9900/hub", h))
    hub, got = parse_flist_ref(h, "", default_hub="127.0.0.1:9900")
    assert (str(hub), got) == ("127.0.0.1:9900", h)
    with pytest.raises(ProvisionError, match="flist_hash"):
        parse_flist_ref("127.0.0.1:9900", "")


def test_provisioner_refuses_unlisted_publisher_and_serves_owner_logs(env: Env, tmp_path: Path) -> None:
    node = NodeContext(tmp_path / "node", Identity.generate())
    prov = ContainerProvisioner(node)
    wid = WorkloadID(7, "app")
    spec = ContainerWorkload(name="app", flist=f"{env.hub}/{env.image.hash}",
                             publishers=[Identity.generate().public_hex],
                             args=["trap 'exit 0' TERM; echo secret-line; sleep 1000 & wait"])
    with pytest.raises(ProvisionError, match="not among the publishers"):
        prov.provision(wid, spec, None)  # type: ignore[arg-type]
    assert prov.runtime.ids() == [] and not prov.exists(wid, spec)

    ok = spec.model_copy(update={"publishers": [env.publisher.public_hex]})
    try:
        done = prov.provision(wid, ok, None)  # type: ignore[arg-type]
        assert done.data["state"] == "ok" and prov.exists(wid, ok)
        owner, stranger = Identity.generate(), Identity.generate()
        time.sleep(0.3)
        answer = prov.answer_logs(sign_log_request(owner, 7, "app"), owner.public_hex)
        text = open_sealed(owner, base64.b64decode(answer["sealed"])).decode()
        assert "stdout secret-line" in text
        with pytest.raises(ProvisionError, match="only the contract's owner"):
            prov.answer_logs(sign_log_request(stranger, 7, "app"), owner.public_hex)
        forged = sign_log_request(stranger, 7, "app")
        forged = type(forged)(**{**forged.to_dict(), "requester": owner.public_hex})
        with pytest.raises(ProvisionError, match="signature does not verify"):
            prov.answer_logs(forged, owner.public_hex)
    finally:
        prov.deprovision(wid, ok)
    assert prov.runtime.ids() == [] and cgroup_dirs(prov.container_id(wid)) == []


def test_container_deployed_by_contract_and_cancelled(env: Env, procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    proc, _, data = grid.start_node("cnode")
    runtime = ContainerRuntime(data / "containers")
    try:
        node = grid.node_id(data, proc)
        owner, twin = grid.user()
        cid, _ = grid.deploy(owner, twin, [
            {"type": "volume", "name": "vol", "size": "20M"},
            {"type": "container", "name": "web", "flist": f"{env.hub}/{env.image.hash}",
             "publishers": [env.publisher.public_hex], "memory": "64M",
             "env": {"GREETING": "from-contract"}, "secret_env": {"TOKEN": "t0k"},
             "args": ["echo \"$GREETING $TOKEN\" >> /data/seen; cat /data/seen; "
                      "trap 'exit 0' TERM; httpd -f -p 8080 -h /data & wait"],
             "mounts": [{"volume": "vol", "mountpoint": "/data"}],
             "healthcheck": {"tcp_port": 8080, "interval": 1}},
        ], node)
        c = grid.wait_contract(cid, {"deployed", "error"}, timeout=60)
        assert c["state"] == "deployed", c["report"]
        web = next(w for w in c["report"]["workloads"] if w["name"] == "web")
        assert web["state"] == "ok" and web["data"]["state"] == "ok", web
        container = web["data"]["container"]
        assert any("from-contract t0k" in line for line in runtime.logs(container))
        assert runtime.status(container).state == "ok"
        grid.client.cancel(owner, cid)
        grid.wait_contract(cid, {"deleted"}, timeout=60)
        assert runtime.ids() == [] and runtime.runc.state(container) is None
        assert cgroup_dirs(container) == []
    finally:
        proc.kill()
        proc.wait()
        for left in runtime.ids():
            runtime.delete(left)
