"""Containers under real runc: entrypoint and env, memory limit and restarts, volumes,
health checks, logs, the image seal, and complete removal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.node.runtime.conftest import Env
from zerostack.node.runtime import (
    ContainerError,
    ContainerSpec,
    ContainerStatus,
    HealthProbe,
    VolumeBind,
    cgroup_dirs,
)
from zerostack.node.runtime.runc import is_mounted


def wait_for(fn: object, timeout: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_gone(env: Env, cid: str, pid: int | None) -> None:
    assert env.runtime.runc.state(cid) is None
    assert cgroup_dirs(cid) == []
    assert not env.runtime.dir(cid).exists()
    if pid is not None:
        assert not Path(f"/proc/{pid}").exists()
    with open("/proc/self/mountinfo") as f:
        assert cid not in f.read()


def test_entrypoint_env_memory_limit_restart_and_volume(env: Env) -> None:
    cid = env.new_id("oom")
    vol = env.tmp / f"vol-{cid}"
    vol.mkdir()
    # First run: record itself in the volume, then grow a string until the memory limit
    # kills it. Second run (restarted by the on-failure policy): sleep.
    script = ('echo "run $GREETING $TOKEN $IMAGE_ENV" ; echo run >> /data/runs ; '
              'if [ "$(wc -l < /data/runs)" -lt 2 ]; then '
              'exec awk \'BEGIN { s = "x"; while (1) s = s s }\'; fi; exec sleep 1000')
    spec = ContainerSpec(id=cid, image_hash=env.image.hash, args=(script,),
                         env={"GREETING": "hello"}, secret_env={"TOKEN": "s3cret"},
                         memory=32 << 20, volumes=(VolumeBind(vol, "/data"),),
                         restart="on-failure", stop_timeout=0.5)
    env.runtime.start(spec, env.image)
    try:
        status = wait_for(lambda: (s := env.runtime.status(cid)).restarts >= 1
                          and s.state == "ok" and s, what="restart after OOM")
        assert isinstance(status, ContainerStatus)
        assert status.last_exit == 137 and status.oom_killed  # SIGKILL by the OOM killer
        assert (vol / "runs").read_text() == "run\nrun\n"
        dirs = {p.parent.parent.name: p for p in cgroup_dirs(cid)}
        assert int((dirs["memory"] / "memory.limit_in_bytes").read_text()) == 32 << 20
        assert int((dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 100_000  # 1 core
        assert (dirs["pids"] / "pids.max").read_text().strip() == "1024"
        logs = env.runtime.logs(cid)
        assert sum("stdout run hello s3cret 1" in line for line in logs) == 2
        assert any("exited with 137 (out of memory)" in line for line in logs)
        assert (env.runtime.dir(cid) / "bundle" / "config.json").stat().st_mode & 0o077 == 0
        assert "s3cret" not in (env.runtime.dir(cid) / "spec.json").read_text()
        pid = status.pid
    finally:
        env.runtime.delete(cid)
    assert_gone(env, cid, pid)
    assert (vol / "runs").exists()  # a volume outlives the container


def test_restart_policies(env: Env) -> None:
    never = env.new_id("never")
    always = env.new_id("always")
    try:
        env.runtime.start(ContainerSpec(id=never, image_hash=env.image.hash,
                                        args=("exit 3",), restart="never"), env.image)
        s = wait_for(lambda: (x := env.runtime.status(never)).state == "error" and x,
                     what="never-restarted failure")
        assert isinstance(s, ContainerStatus) and s.last_exit == 3 and s.restarts == 0
        assert not s.oom_killed
        env.runtime.start(ContainerSpec(id=always, image_hash=env.image.hash,
                                        args=("echo tick; exit 0",), restart="always"), env.image)
        wait_for(lambda: env.runtime.status(always).restarts >= 2, what="always restarting")
        assert sum("tick" in line for line in env.runtime.logs(always)) >= 2
        time.sleep(0.3)
        assert env.runtime.status(never).restarts == 0
    finally:
        env.runtime.delete(never)
        env.runtime.delete(always)


def test_health_checks_probe_inside_the_container_netns(env: Env) -> None:
    web = env.new_id("web")
    dead = env.new_id("dead")
    try:
        (env.tmp / f"www-{web}").mkdir()
        (env.tmp / f"www-{web}" / "index.html").write_text("ok")
        env.runtime.start(ContainerSpec(
            id=web, image_hash=env.image.hash, args=("exec httpd -f -p 8080 -h /www",),
            volumes=(VolumeBind(env.tmp / f"www-{web}", "/www", readonly=True),),
            health=HealthProbe(port=8080, http_path="/index.html", interval=0.2),
            stop_timeout=0.3), env.image)
        s = wait_for(lambda: (x := env.runtime.status(web)).state == "ok" and x, what="healthy")
        assert isinstance(s, ContainerStatus) and "200" in s.message
        env.runtime.start(ContainerSpec(
            id=dead, image_hash=env.image.hash, args=("exec sleep 1000",),
            health=HealthProbe(port=9999, interval=0.1, grace=3.0), stop_timeout=0.3), env.image)
        assert env.runtime.status(dead).state == "init"
        s = wait_for(lambda: (x := env.runtime.status(dead)).state == "error" and x, what="unhealthy")
        assert isinstance(s, ContainerStatus) and "health check failing" in s.message
    finally:
        env.runtime.delete(web)
        env.runtime.delete(dead)


def test_same_spec_is_idempotent_and_changed_cache_is_refused(env: Env) -> None:
    cid = env.new_id("idem")
    spec = ContainerSpec(id=cid, image_hash=env.image.hash, args=("exec sleep 1000",),
                         stop_timeout=0.2)
    try:
        first = env.runtime.start(spec, env.image)
        again = env.runtime.start(spec, env.image)
        assert first.pid == again.pid and first.state == "ok"
        env.runtime.delete(cid)
        # A cache altered behind the node's back is refused and nothing starts.
        tampered = env.cache.images / env.image.hash / "rootfs" / "etc" / "passwd"
        st = tampered.stat()
        tampered.write_text("root::0:0::/:/bin/sh\n")
        os.utime(tampered, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(ContainerError, match="etc/passwd was modified"):
            env.runtime.start(spec, env.image)
        assert env.runtime.runc.state(cid) is None
        assert not is_mounted(env.runtime.layout(cid).rootfs)
    finally:
        env.runtime.delete(cid)
        from zerostack.flist import Hub

        with Hub(env.hub) as h:  # repair the shared image for the other tests
            env.image = env.cache.fetch(h, env.image.hash, [env.publisher.public_hex])


def test_isolation_seen_from_inside(env: Env) -> None:
    cid = env.new_id("iso")
    script = ("id; hostname; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
              "echo pids $(ls /proc | grep -cE '^[0-9]+$') $(test -d /proc/1 && echo has-1); "
              "echo ifaces $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '); "
              "cat /proc/kcore > /dev/null 2>&1 && echo kcore-readable || echo kcore-masked; "
              "echo x > /proc/sys/kernel/hostname 2>/dev/null && echo sys-writable || echo sys-ro; "
              "echo x > /bin/new && echo rootfs-writable")
    spec = ContainerSpec(id=cid, image_hash=env.image.hash, args=(script,), user="app",
                         hostname="box", restart="never")
    try:
        env.runtime.start(spec, env.image)
        wait_for(lambda: env.runtime.status(cid).last_exit is not None, what="exit")
        lines = env.runtime.logs(cid)
        out = "\n".join(line.split(" ", 2)[2] for line in lines
                        if " stdout " in line)
    finally:
        env.runtime.delete(cid)
    assert "uid=1000(app) gid=1000(app)" in out, lines
    assert "\nbox\n" in out
    assert "CapEff:\t0000000000000000" in out  # a non-root user holds no capability
    assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out
    bounding = int(next(x for x in out.splitlines() if x.startswith("CapBnd:")).split()[1], 16)
    assert not bounding & (1 << 21)  # CAP_SYS_ADMIN is not even in the bounding set
    # Its own pid namespace: the shell is pid 1, and only the few processes of the script.
    count, has_init = next(x for x in out.splitlines() if x.startswith("pids ")).split()[1:]
    assert int(count) < 10 and has_init == "has-1"
    assert "ifaces lo" in out.replace("\n", " ") and "eth" not in out  # loopback only
    assert "kcore-masked" in out and "sys-ro" in out
    # /bin belongs to root in the image: the app user cannot write there, even via overlay.
    assert "rootfs-writable" not in out
