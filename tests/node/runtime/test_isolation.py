"""What a container is kept from, seen from inside by the probe image and from the host by
a user `nobody`: user namespace, capabilities, seccomp, namespaces, nosuid mounts, set-id
files, and the size limit of the writable layer."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.node.runtime.conftest import Env
from tests.node.runtime.probe import probe_rootfs
from tests.node.runtime.test_containers import wait_for
from zerostack.crypto import Identity
from zerostack.flist import (
    CachedImage,
    Hub,
    ImageConfig,
    LocalStore,
    SignedFlist,
    build_dir,
    push_flist,
)
from zerostack.node.hostfs import loop_devices
from zerostack.node.provisioners import NodeContext, Pool, WorkloadID
from zerostack.node.provisioners.volume import VolumeProvisioner
from zerostack.node.runtime import ContainerError, ContainerSpec, VolumeBind
from zerostack.node.runtime.idmap import RANGE
from zerostack.node.runtime.oci import CAPABILITIES
from zerostack.node.runtime.runc import is_mounted
from zerostack.workloads import Deployment, VolumeWorkload

CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
            "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
            "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18}
NOBODY = 65534


@pytest.fixture(scope="module")
def probe(env: Env) -> CachedImage:
    require_tool("gcc")
    store = LocalStore(env.tmp / "probe-store")
    manifest, _ = build_dir(probe_rootfs(env.tmp / "probe-img"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, env.publisher)
    with Hub(env.hub) as h:
        push_flist(flist, store, h)
        return env.cache.fetch(h, flist.hash_hex, [env.publisher.public_hex])


@contextlib.contextmanager
def volume(env: Env, name: str) -> Iterator[Path]:
    """A real volume (loop-mounted ext4) made by the node's volume provisioner."""
    require_tool("mkfs.ext4")
    node = NodeContext(env.tmp / f"vnode-{name}", Identity.generate(),
                       pools=[Pool("ssd", env.tmp / f"vpool-{name}", "ssd")])
    prov = VolumeProvisioner(node)
    spec = VolumeWorkload(name="data", size=32 << 20)
    dep = Deployment.parse({"twin_id": 1, "workloads": [spec.model_dump()],
                            "signature_requirement": {"requests": [{"twin": 1, "key": "ab" * 32, "required": True}],
                                                      "weight_required": 1}})
    wid = WorkloadID(1, "data")
    prov.provision(wid, spec, dep)
    try:
        yield node.volume_mountpoint(wid)
    finally:
        prov.deprovision(wid, spec)


def run_to_end(env: Env, spec: ContainerSpec, image: CachedImage) -> str:
    """Run a container to its exit and return its stdout."""
    env.runtime.start(spec, image)
    wait_for(lambda: env.runtime.status(spec.id).last_exit is not None, what="exit")
    return "\n".join(line.split(" ", 2)[2] for line in env.runtime.logs(spec.id, 1000)
                     if " stdout " in line)


def section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(f"== {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("== ")), len(lines))
    return lines[start:end]


def test_probe_sees_an_isolated_container(env: Env, probe: CachedImage) -> None:
    cid = env.new_id("probe")
    with volume(env, "probe") as vol:
        spec = ContainerSpec(id=cid, image_hash=probe.hash, args=("/probe.sh",), restart="never",
                             volumes=(VolumeBind(vol, "/data"),), disk=64 << 20)
        try:
            out = run_to_end(env, spec, probe)
            layout = env.runtime.layout(cid)
        finally:
            env.runtime.delete(cid)
    print(out)  # the probe's report, as docs/security.md shows it
    # Root in the container, an unprivileged range on the host.
    assert "uid=0(root) gid=0(root)" in out
    uid_map = next(x for x in out.splitlines() if x.startswith("uid_map:")).split()[1:]
    assert uid_map[0] == "0" and uid_map[2] == str(RANGE)
    assert int(uid_map[1]) >= RANGE and int(uid_map[1]) == layout.base
    assert f"gid_map: {' '.join(uid_map)}" in out.replace("gid_map:  ", "gid_map: ")
    # Exactly the default capability set, and seccomp filtering.
    status = dict(x.split(":\t") for x in section(out, "capabilities and filters"))
    default = sum(1 << CAP_BITS[c] for c in CAPABILITIES)
    assert int(status["CapBnd"], 16) == default and int(status["CapEff"], 16) == default
    assert int(status["CapAmb"], 16) == 0 and int(status["CapInh"], 16) == 0
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    # Its own processes only (the script, its pipes), no host interface.
    pids = [x.split()[1] for x in section(out, "processes")]
    assert "1" in pids and len(pids) < 8
    assert all("sleep" not in x and "python" not in x for x in section(out, "processes"))
    assert section(out, "interfaces") == ["lo"]
    # The rootfs and the volume are mounted nosuid,nodev.
    mounts = dict(x.split(" ", 1) for x in section(out, "mounts (mount point, per-mount options)"))
    for point in ("/", "/data"):
        assert {"nosuid", "nodev"} <= set(mounts[point].split(",")), (point, mounts[point])
    # df shows the writable layer (64 MiB), not the host disk.
    total_kib = int(section(out, "disk")[0].split()[1])
    assert 48 << 10 < total_kib <= 64 << 10
    # No way to a new user namespace, nor to io_uring; an ordinary fork still works.
    calls = section(out, "namespaces and io_uring")
    assert "unshare -U: refused" in calls
    for call in ("unshare(CLONE_NEWUSER)", "clone(CLONE_NEWUSER)", "clone(CLONE_NEWNET)",
                 "io_uring_setup"):
        assert f"{call}: refused (Operation not permitted)" in calls, calls
    assert "clone3(CLONE_NEWUSER): refused (Function not implemented)" in calls
    assert "clone(plain fork): allowed" in calls


def as_nobody(path: Path) -> int | None:
    """Execute `path` as the host user nobody: the euid it reports, None if refused."""
    try:
        proc = subprocess.run([str(path)], user=NOBODY, group=NOBODY, extra_groups=[],
                              capture_output=True, text=True, timeout=10, check=False)
    except PermissionError:
        return None
    if proc.returncode != 0 or not proc.stdout.startswith("euid="):
        return None
    return int(proc.stdout.strip().split("=")[1])


@contextlib.contextmanager
def traversable(paths: list[Path]) -> Iterator[None]:
    """Let others search every directory above `paths` for the duration, so what stops
    `nobody` below is the mounts and the files, not a directory's mode."""
    changed: dict[Path, int] = {}
    for p in paths:
        for d in p.parents:
            mode = stat.S_IMODE(d.stat().st_mode)
            if d not in changed and not mode & 0o001:
                changed[d] = mode
                d.chmod(mode | 0o001)
    try:
        yield
    finally:
        for d, mode in changed.items():
            d.chmod(mode)


def test_set_id_files_from_image_and_container_never_reach_host_users(
        env: Env, probe: CachedImage) -> None:
    cid = env.new_id("suid")
    plant = ("cp /bin/suid-euid /data/planted && chmod 4755 /data/planted && "
             "cp /bin/suid-euid /planted && chmod 4755 /planted && "
             "stat -c '%a %u %n' /bin/suid-euid /data/planted /planted && exec sleep 1000")
    with volume(env, "suid") as vol:
        spec = ContainerSpec(id=cid, image_hash=probe.hash, args=(plant,), stop_timeout=0.2,
                             volumes=(VolumeBind(vol, "/data"),), restart="never")
        try:
            env.runtime.start(spec, probe)
            wait_for(lambda: any("/planted" in x for x in env.runtime.logs(cid)),
                     what="planted files")
            inside = "\n".join(env.runtime.logs(cid))
            # Inside, the container's root made real set-uid-root files.
            assert "4755 0 /data/planted" in inside and "4755 0 /planted" in inside
            layout = env.runtime.layout(cid)
            targets = {
                "image cache": probe.rootfs / "bin" / "suid-euid",
                "container rootfs (image file)": layout.rootfs / "bin" / "suid-euid",
                "container rootfs (planted)": layout.rootfs / "planted",
                "writable layer (planted)": layout.upper / "planted",
                "volume (planted)": vol / "planted",
                "volume as staged for runc (planted)": layout.volume(0) / "planted",
            }
            assert is_mounted(layout.rootfs) and is_mounted(vol)
            # The planted copies are set-uid on the host too, owned by the container's root.
            assert (vol / "planted").stat().st_mode & stat.S_ISUID
            assert (vol / "planted").stat().st_uid == layout.base
            with traversable(list(targets.values())):
                seen = {name: as_nobody(path) for name, path in targets.items()}
        finally:
            env.runtime.delete(cid)
    assert all(euid in (None, NOBODY) for euid in seen.values()), seen
    # The files do run as nobody where the host can execute them: the bits are just void.
    for name in ("image cache", "container rootfs (image file)", "container rootfs (planted)",
                 "volume (planted)", "volume as staged for runc (planted)"):
        assert seen[name] == NOBODY, (name, seen)


def test_writable_layer_is_size_limited_and_leaves_the_host_disk_alone(
        env: Env, probe: CachedImage) -> None:
    cid = env.new_id("fill")
    host = os.statvfs(env.tmp)
    free_before = host.f_bavail * host.f_frsize
    script = ("df -k / | tail -n 1; dd if=/dev/zero of=/fill bs=1M count=128 2>&1; "
              "echo dd-exit $?; sync")
    spec = ContainerSpec(id=cid, image_hash=probe.hash, args=(script,), restart="never",
                         disk=32 << 20)
    try:
        out = run_to_end(env, spec, probe)
        image = env.runtime.dir(cid) / "layer.img"
        used_on_host = image.stat().st_blocks * 512
        st = os.statvfs(env.tmp)
        free_after = st.f_bavail * st.f_frsize
    finally:
        env.runtime.delete(cid)
    assert "No space left on device" in out and "dd-exit 1" in out, out
    total_kib = int(out.splitlines()[0].split()[1])
    assert total_kib <= 32 << 10
    # The layer holds at most its size; the host disk lost no more than that (other
    # suites share this disk, so allow them some writes of their own).
    assert used_on_host <= 32 << 20
    assert free_before - free_after < 96 << 20


def test_joined_network_namespace_gets_its_own_sysfs(env: Env, probe: CachedImage) -> None:
    """A container attached to a namespace the node made still sees only that namespace's
    devices, in /proc and in /sys (a sysfs the node mounts from inside the namespace)."""
    require_tool("ip")
    cid = env.new_id("netns")
    ns = f"zt{os.getpid() % 100000}{cid[-4:]}"
    ends = [f"za{cid[-6:]}", f"zb{cid[-6:]}"]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", ends[0], "type", "veth", "peer", "name",
                        ends[1]], check=True)
        script = "ls /sys/class/net | sort | tr '\\n' ' '; echo; tail -n +3 /proc/net/dev | cut -d: -f1"
        spec = ContainerSpec(id=cid, image_hash=probe.hash, args=(script,), restart="never",
                             netns=f"/run/netns/{ns}")
        try:
            out = run_to_end(env, spec, probe)
            layout = env.runtime.layout(cid)
            assert not is_mounted(layout.sys)  # the run is over: the shim unmounted it
        finally:
            env.runtime.delete(cid)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    lines = out.splitlines()
    assert lines[0].split() == sorted(["lo", *ends]), out
    assert sorted(x.strip() for x in lines[1:]) == sorted(["lo", *ends])


def test_writable_layer_grows_with_its_spec_keeps_its_data_and_never_shrinks(
        env: Env, probe: CachedImage) -> None:
    cid = env.new_id("grow")
    script = "echo kept >> /state; cat /state | wc -l; df -k / | tail -n 1; exec sleep 1000"
    small = ContainerSpec(id=cid, image_hash=probe.hash, args=(script,), disk=32 << 20,
                          stop_timeout=0.2)
    try:
        env.runtime.start(small, probe)
        wait_for(lambda: any("/" in x and "overlay" in x for x in env.runtime.logs(cid)),
                 what="first df")
        env.runtime.start(dataclasses.replace(small, disk=64 << 20), probe)
        wait_for(lambda: sum("overlay" in x for x in env.runtime.logs(cid)) == 2,
                 what="second df")
        out = [x.split(" ", 2)[2] for x in env.runtime.logs(cid) if " stdout " in x]
        running = env.runtime.status(cid)
        with pytest.raises(ContainerError, match="cannot shrink"):
            env.runtime.start(small, probe)
        # Refused before anything changed: the same container still runs.
        assert env.runtime.status(cid).pid == running.pid is not None
    finally:
        env.runtime.delete(cid)
    assert out[0].strip() == "1" and out[2].strip() == "2", out  # the layer's data survived
    first, second = int(out[1].split()[1]), int(out[3].split()[1])
    assert first <= 32 << 10 < second <= 64 << 10


def test_a_stopped_container_leaves_no_loop_device_on_its_layer(
        env: Env, probe: CachedImage) -> None:
    # The kernel frees a `-o loop` mount's device some time after the unmount returns;
    # meanwhile a grow or a new mount of the layer would reach the old device, of the old
    # size. So stop returns only once the device is gone, every time.
    cid = env.new_id("loop")
    spec = ContainerSpec(id=cid, image_hash=probe.hash, args=("exec sleep 1000",),
                         disk=32 << 20, stop_timeout=0.2)
    try:
        env.runtime.start(spec, probe)
        image = env.runtime.layout(cid).layer_image
        for _ in range(5):
            wait_for(lambda: len(loop_devices(image)) == 1, what="the layer's loop device")
            env.runtime.stop(cid)
            assert loop_devices(image) == []
            env.runtime.start(spec, probe)
    finally:
        env.runtime.delete(cid)
    assert loop_devices(image) == []
