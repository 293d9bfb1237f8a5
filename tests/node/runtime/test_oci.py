"""The OCI config is a pure function of the spec and the image: command, env, user, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from zerostack.flist import ImageConfig
from zerostack.node.runtime import (
    ContainerError,
    ContainerSpec,
    VolumeBind,
    oci_config,
    resolve_user,
)
from zerostack.node.runtime.oci import HostPaths, seccomp_profile

HOST = HostPaths(Path("/run/stage/rootfs"), 1 << 24)

HASH = "ab" * 32


def _rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nwheel:x:10:app\n")
    return tmp_path


def test_command_env_and_limits(tmp_path: Path) -> None:
    image = ImageConfig(entrypoint=("/bin/app",), cmd=("--serve",), env=("PATH=/bin", "A=image"),
                        working_dir="/srv", user="app")
    spec = ContainerSpec(id="c1", image_hash=HASH, env={"A": "spec"}, secret_env={"TOKEN": "s"},
                         memory=64 << 20, cpu_millis=500, pids=50,
                         volumes=(VolumeBind(tmp_path, "/data", readonly=True),))
    host = HostPaths(Path("/run/stage/rootfs"), 1 << 24, (Path("/run/stage/volumes/0"),))
    cfg = oci_config(spec, image, _rootfs(tmp_path), host)
    proc = cfg["process"]
    assert proc["args"] == ["/bin/app", "--serve"]
    assert "A=spec" in proc["env"] and "TOKEN=s" in proc["env"] and "PATH=/bin" in proc["env"]
    assert proc["cwd"] == "/srv"
    assert proc["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10]}
    assert proc["capabilities"]["effective"] == []  # non-root holds no capability
    assert "CAP_SYS_ADMIN" not in proc["capabilities"]["bounding"]
    assert proc["noNewPrivileges"] is True
    res = cfg["linux"]["resources"]
    assert res["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert res["cpu"]["quota"] == 50_000 and res["pids"] == {"limit": 50}
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {"user", "pid", "network", "ipc",
                                                               "uts", "mount"}
    assert cfg["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1 << 24, "size": 65536}]
    assert cfg["linux"]["gidMappings"] == cfg["linux"]["uidMappings"]
    assert cfg["root"]["path"] == "/run/stage/rootfs"
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]
    bind = next(m for m in cfg["mounts"] if m["destination"] == "/data")
    assert "ro" in bind["options"] and bind["source"] == "/run/stage/volumes/0"
    assert {"nosuid", "nodev"} <= set(bind["options"])

    # An overridden entrypoint drops the image's cmd; args replace it.
    spec2 = ContainerSpec(id="c2", image_hash=HASH, entrypoint=("/bin/sh",), args=("-c", "true"))
    assert oci_config(spec2, image, tmp_path, HOST)["process"]["args"] == ["/bin/sh", "-c", "true"]
    spec3 = ContainerSpec(id="c3", image_hash=HASH, args=("--once",))
    assert oci_config(spec3, image, tmp_path, HOST)["process"]["args"] == ["/bin/app", "--once"]


def test_user_resolution(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    assert resolve_user(root, "") == (0, 0, [])
    assert resolve_user(root, "1000") == (1000, 1000, [10])
    assert resolve_user(root, "app:wheel") == (1000, 10, [])
    assert resolve_user(root, "4242:4343") == (4242, 4343, [])
    with pytest.raises(ContainerError, match="not in the image's /etc/passwd"):
        resolve_user(root, "nobody")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("/etc/passwd")  # never read through a symlink
    with pytest.raises(ContainerError, match="not in the image"):
        resolve_user(root, "root")


@pytest.mark.parametrize("kwargs, message", [
    ({"id": "bad id"}, "container id"),
    ({"memory": 1024}, "at least 4 MiB"),
    ({"volumes": (VolumeBind(Path("/x"), "data"),)}, "absolute"),
])
def test_bad_specs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ContainerError, match=message):
        ContainerSpec(**{"id": "ok", "image_hash": HASH, **kwargs})  # type: ignore[arg-type]


def test_nothing_to_run(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="nothing to run"):
        oci_config(ContainerSpec(id="c", image_hash=HASH), ImageConfig(), tmp_path, HOST)


def test_root_is_never_mapped_to_a_host_user(tmp_path: Path) -> None:
    spec = ContainerSpec(id="c", image_hash=HASH, args=("true",))
    for base in (0, 1000, (1 << 24) + 5):
        with pytest.raises(ContainerError, match="not a container range"):
            oci_config(spec, ImageConfig(), tmp_path, HostPaths(Path("/r"), base))


def test_seccomp_is_an_allowlist_without_namespaces_or_io_uring() -> None:
    profile = seccomp_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    allowed = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
               and "args" not in rule for n in rule["names"]}
    for name in ("unshare", "setns", "mount", "umount2", "pivot_root", "io_uring_setup",
                 "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key",
                 "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module",
                 "finit_module", "delete_module", "userfaultfd", "open_by_handle_at",
                 "fsopen", "fsmount", "move_mount", "open_tree", "reboot", "swapon", "acct",
                 "clock_settime", "settimeofday", "syslog", "quotactl", "iopl", "ioperm"):
        assert name not in allowed, name
        assert all(name not in rule["names"] for rule in profile["syscalls"]), name
    assert {"read", "execve", "ptrace", "chroot", "wait4"} <= allowed
    clone = next(r for r in profile["syscalls"] if r["names"] == ["clone"])
    # Allowed only when no namespace flag (CLONE_NEWUSER = 0x10000000 among them) is set.
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0,
                              "op": "SCMP_CMP_MASKED_EQ"}]
    assert 0x10000000 & 0x7E020000
    clone3 = next(r for r in profile["syscalls"] if r["names"] == ["clone3"])
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == 38
