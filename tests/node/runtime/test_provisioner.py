"""The container provisioner inside a real node agent: deploy by contract, report, logs,
refuse bad images, cancel removes everything."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import ProcessGroup, free_port, zerostack_cmd
from tests.flist.image import busybox_rootfs
from tests.node.harness import Grid
from tests.node.runtime.conftest import Env
from tests.node.runtime.test_crash_and_import import instances
from zerostack.crypto import Identity, open_sealed, save_identity
from zerostack.flist import Hub, ImageConfig, SignedFlist, build_dir, push_flist
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


def test_provisioner_refuses_bad_images_and_serves_owner_logs(env: Env, tmp_path: Path) -> None:
    node = NodeContext(tmp_path / "node", Identity.generate())
    prov = ContainerProvisioner(node)
    wid = WorkloadID(7, "app")
    spec = ContainerWorkload(name="app", flist=f"{env.hub}/{env.image.hash}",
                             publishers=[Identity.generate().public_hex],
                             args=["trap 'exit 0' TERM; echo secret-line; sleep 1000 & wait"])
    with pytest.raises(ProvisionError, match="not among the publishers"):
        prov.provision(wid, spec, None)  # type: ignore[arg-type]
    assert prov.runtime.ids() == [] and not prov.exists(wid, spec)

    # An image whose chunk was altered on the hub, and one whose manifest is unsigned.
    root = busybox_rootfs(tmp_path / "img2")
    (root / "etc" / "unique").write_text(str(tmp_path))
    manifest, _ = build_dir(root, env.store, ImageConfig(entrypoint=("/bin/sh", "-c")))
    bad = SignedFlist.sign(manifest, env.publisher)
    with Hub(env.hub) as h:
        push_flist(bad, env.store, h)
    host, port = env.hub.split(":")
    r = redis.Redis(host=host, port=int(port))
    unique = next(e for e in manifest.entries if e.path == "etc/unique")
    r.set(bytes.fromhex(unique.chunks[0]), b"tampered")  # a chunk no other image shares
    tampered = spec.model_copy(update={"publishers": [env.publisher.public_hex],
                                       "flist": f"{env.hub}/{bad.hash_hex}"})
    with pytest.raises(ProvisionError, match="etc/unique does not match its hash"):
        prov.provision(wid, tampered, None)  # type: ignore[arg-type]
    unsigned = bad.to_dict()
    del unsigned["signature"]
    r.set(bytes.fromhex(bad.hash_hex), json.dumps(unsigned))
    with pytest.raises(ProvisionError, match="unsigned"):
        prov.provision(wid, tampered, None)  # type: ignore[arg-type]
    assert prov.runtime.ids() == [] and bad.hash_hex not in prov.images.list()

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
        assert prov.prune_images() == []  # the running container's image stays
    finally:
        prov.deprovision(wid, ok)
    assert prov.runtime.ids() == [] and cgroup_dirs(prov.container_id(wid)) == []
    assert prov.prune_images() == [env.image.hash] and prov.images.list() == []


def _logs_cli(tmp_path: Path, url: str, cid: int, workload: str, owner: Identity,
              stranger: Identity, expect: str) -> None:
    """`zerostack logs` against a real node's status endpoint (`GET /logs`)."""
    home = tmp_path / "home"
    save_identity(owner, home / "identities" / "owner.key", "owner")
    save_identity(stranger, home / "identities" / "stranger.key", "stranger")
    env = {**os.environ, "ZEROSTACK_HOME": str(home), "COLUMNS": "300"}
    ok = subprocess.run([*zerostack_cmd(), "logs", str(cid), workload, "--node", url,
                         "--identity", "owner", "--json"],
                        capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert any(line.endswith(expect) for line in json.loads(ok.stdout)["lines"])
    bad = subprocess.run([*zerostack_cmd(), "logs", str(cid), workload, "--node", url,
                          "--identity", "stranger"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "only the contract's owner" in bad.stderr
    missing = subprocess.run([*zerostack_cmd(), "logs", str(cid + 1000), workload, "--node",
                              url, "--identity", "owner"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode != 0 and "no contract" in missing.stderr


def test_container_deployed_by_contract_and_cancelled(env: Env, procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    status_port = free_port()
    proc, _, data = grid.start_node("cnode", "--status-port", str(status_port))
    runtime = ContainerRuntime(data / "containers")
    try:
        node = grid.node_id(data, proc)
        owner, twin = grid.user()
        cid, _ = grid.deploy(owner, twin, [
            {"type": "volume", "name": "vol", "size": "20M"},
            {"type": "container", "name": "web", "flist": f"{env.hub}/{env.image.hash}",
             "publishers": [env.publisher.public_hex], "memory": "32M",
             "env": {"GREETING": "from-contract"}, "secret_env": {"TOKEN": "t0k"},
             # First run: blow the memory limit (the OOM killer ends it, on-failure
             # restarts it); second run: serve, with the volume remembering both runs.
             "args": ["echo \"$GREETING $TOKEN\" >> /data/seen; cat /data/seen; "
                      "if [ \"$(wc -l < /data/seen)\" -lt 2 ]; then "
                      "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'; fi; "
                      "trap 'exit 0' TERM; httpd -f -p 8080 -h /data & wait"],
             "mounts": [{"volume": "vol", "mountpoint": "/data"}],
             "healthcheck": {"tcp_port": 8080, "interval": 1}},
        ], node)
        c = grid.wait_contract(cid, {"deployed", "error"}, timeout=60)
        assert c["state"] == "deployed", c["report"]
        web = next(w for w in c["report"]["workloads"] if w["name"] == "web")
        assert web["state"] == "ok" and web["data"]["state"] == "ok", web
        container = web["data"]["container"]
        logs = runtime.logs(container)
        assert sum(line.endswith("stdout from-contract t0k") for line in logs) == 3, logs
        status = runtime.status(container)
        assert status.state == "ok" and status.restarts == 1 and status.oom_killed, status
        memory = next(p for p in cgroup_dirs(container) if "memory" in p.parts)
        assert int((memory / "memory.limit_in_bytes").read_text()) == 32 << 20
        _logs_cli(tmp_path, f"http://127.0.0.1:{status_port}", cid, "web", owner,
                  Identity.generate(), "stdout from-contract t0k")
        grid.client.cancel(owner, cid)
        grid.wait_contract(cid, {"deleted"}, timeout=60)
        assert runtime.ids() == [] and runtime.runc.state(container) is None
        assert cgroup_dirs(container) == []
    finally:
        proc.kill()
        proc.wait()
        for left in runtime.ids():
            runtime.delete(left)
        _unmount_under(data)


def _unmount_under(data: Path) -> None:
    """Volumes a failed test left mounted (loop devices go with a lazy unmount + detach)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(str(data))]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    for image in data.parent.rglob("*.img"):
        out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


def test_agent_killed_mid_container_start_runs_exactly_one(env: Env, procs: ProcessGroup,
                                                           tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    proc, zport, data = grid.start_node("knode")
    runtime = ContainerRuntime(data / "containers")
    mark = f"mark-{tmp_path.name}"
    try:
        node = grid.node_id(data, proc)
        owner, twin = grid.user()
        cid, _ = grid.deploy(owner, twin, [
            {"type": "container", "name": "app", "flist": f"{env.hub}/{env.image.hash}",
             "publishers": [env.publisher.public_hex], "memory": "32M",
             "env": {"ZS_MARK": mark}, "args": ["trap 'exit 0' TERM; sleep 1000 & wait"]},
        ], node)
        # Kill the agent (and its Zero-DB) as soon as the container's start has begun.
        deadline = time.monotonic() + 60
        while not runtime.ids():
            assert time.monotonic() < deadline, grid.log_tail("knode")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc, _, _ = grid.start_node("knode", zdb_port=zport)
        c = grid.wait_contract(cid, {"deployed", "error"}, timeout=60)
        assert c["state"] == "deployed", c["report"]
        time.sleep(1.0)  # a duplicate, if any, would have started by now
        assert len(instances(mark)) == 1
        assert runtime.ids() == [c["report"]["workloads"][0]["data"]["container"]]
    finally:
        proc.kill()
        proc.wait()
        for left in runtime.ids():
            runtime.delete(left)
    assert instances(mark) == []
