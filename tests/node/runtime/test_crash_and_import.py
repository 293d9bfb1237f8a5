"""A node agent killed mid-start leaves exactly one instance; a docker-save image runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.flist.image import busybox_layers, docker_save_tarball
from tests.node.runtime.conftest import Env
from tests.node.runtime.test_containers import assert_gone, wait_for
from zerostack.flist import Hub, SignedFlist, import_image, push_flist
from zerostack.node.runtime import ContainerRuntime, ContainerSpec

STARTER = """
import sys
from pathlib import Path
from zerostack.flist import ImageCache
from zerostack.node.runtime import ContainerRuntime, ContainerSpec
runtime_root, cache_root, image_hash, cid = sys.argv[1:5]
image = ImageCache(Path(cache_root)).get(image_hash)
spec = ContainerSpec(id=cid, image_hash=image_hash, args=("exec sleep 1000",),
                     env={"ZS_MARK": cid}, stop_timeout=0.2)
print("starting", flush=True)
ContainerRuntime(Path(runtime_root)).start(spec, image)
print("started", flush=True)
"""


def instances(mark: str) -> list[int]:
    """Container inits (pid 1 of their own pid namespace) carrying the marker in their
    environment, by host pid: one per running instance of the container."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"ZS_MARK={mark}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid[-1] == "1":
            found.append(int(entry))
    return found


def test_agent_killed_mid_start_leaves_exactly_one_instance(env: Env) -> None:
    for delay in (0.0, 0.08, 0.2):
        cid = env.new_id("crash")
        spec = ContainerSpec(id=cid, image_hash=env.image.hash, args=("exec sleep 1000",),
                             env={"ZS_MARK": cid}, stop_timeout=0.2)
        agent = subprocess.Popen(
            [sys.executable, "-c", STARTER, str(env.runtime.root), str(env.cache.root),
             env.image.hash, cid], stdout=subprocess.PIPE, start_new_session=True)
        try:
            assert agent.stdout is not None
            assert agent.stdout.readline() == b"starting\n"
            time.sleep(delay)
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=10)
            # The restarted agent (a fresh runtime object) converges on one instance.
            restarted = ContainerRuntime(env.runtime.root)
            status = restarted.start(spec, env.image)
            assert status.state == "ok", status
            assert instances(cid) == [status.pid]
            time.sleep(0.5)
            assert restarted.start(spec, env.image).pid == status.pid
            assert instances(cid) == [status.pid]
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
            env.runtime.delete(cid)
        assert instances(cid) == []
        assert_gone(env, cid, None)


def test_imported_docker_image_runs(env: Env) -> None:
    config = {"Entrypoint": ["/app/run.sh"], "Env": ["PATH=/bin", "GREETING=image"],
              "WorkingDir": "/app"}
    tarball = docker_save_tarball(env.tmp / "app.tar", config, busybox_layers())
    flist = SignedFlist.sign(import_image(tarball, env.store).manifest, env.publisher)
    with Hub(env.hub) as h:
        push_flist(flist, env.store, h)
        image = env.cache.fetch(h, flist.hash_hex, [env.publisher.public_hex])
    assert not (image.rootfs / "etc" / "secret").exists()  # whited out in the top layer
    cid = env.new_id("docker")
    spec = ContainerSpec(id=cid, image_hash=flist.hash_hex, env={"GREETING": "hi"},
                         restart="never")
    try:
        env.runtime.start(spec, image)
        wait_for(lambda: env.runtime.status(cid).last_exit == 0, what="script to finish")
        lines = env.runtime.logs(cid)
        assert any(line.endswith("stdout imported hi from /app") for line in lines), lines
        assert env.runtime.status(cid).state == "ok"
    finally:
        env.runtime.delete(cid)
    assert_gone(env, cid, None)
    assert not Path(env.runtime.dir(cid)).exists()
