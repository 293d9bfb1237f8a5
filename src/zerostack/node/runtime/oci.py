"""The OCI runtime config (runc's config.json) for a container: a pure function of its spec.

Isolation: pid, mount, ipc, uts and network namespaces; cgroup limits on CPU, memory
(without swap) and pids; no new privileges; a reduced capability set; /proc and /sys
paths masked or read-only; a seccomp filter refusing syscalls a container has no business
making (module loading, kexec, keyrings, bpf, mount, namespaces changes...).
"""

from __future__ import annotations

import os
import resource
import stat
from pathlib import Path
from typing import Any

from zerostack.flist import ImageConfig
from zerostack.node.hostfs import open_beneath
from zerostack.node.runtime.spec import ContainerError, ContainerSpec

# Docker's default set minus MKNOD, NET_RAW, SETFCAP and AUDIT_WRITE.
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
]
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
DENIED_SYSCALLS = [
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "init_module", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie",
    "mount", "move_mount", "name_to_handle_at", "open_by_handle_at", "open_tree",
    "perf_event_open", "pivot_root", "quotactl", "reboot", "request_key", "setns", "settimeofday",
    "swapoff", "swapon", "syslog", "umount2", "unshare", "userfaultfd", "uselib", "vhangup",
]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD = 100_000


def _read_image_file(rootfs: Path, rel: str) -> list[list[str]]:
    """Colon-separated rows of an image file like etc/passwd. Never follows a symlink at any
    step and reads only a regular file, so an image cannot make the node read its own files
    (an `etc` linked to the host's /etc) or hang on a FIFO."""
    try:
        fd = open_beneath(rootfs, rel.split("/"), os.O_RDONLY)
    except (OSError, ValueError):
        return []
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        text = f.read(1 << 20).decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(rootfs: Path, user: str) -> tuple[int, int, list[int]]:
    """`name|uid[:group|gid]` -> (uid, gid, additional gids), names looked up in the image."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _read_image_file(rootfs, "etc/passwd")
    groups = _read_image_file(rootfs, "etc/group")
    gid: int | None = None
    if name.isdigit():
        uid = int(name)
        row = next((r for r in passwd if len(r) > 3 and r[2] == name), None)
    else:
        row = next((r for r in passwd if r[0] == name and len(r) > 3), None)
        if row is None:
            raise ContainerError(f"user {name!r} is not in the image's /etc/passwd")
        uid = int(row[2])
    if row is not None and row[3].isdigit():
        gid = int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((r for r in groups if r[0] == group and len(r) > 2), None)
            if grow is None or not grow[2].isdigit():
                raise ContainerError(f"group {group!r} is not in the image's /etc/group")
            gid = int(grow[2])
    extra: list[int] = []
    if row is not None and not group:
        for r in groups:
            if len(r) > 3 and r[2].isdigit() and row[0] in r[3].split(",") and int(r[2]) != gid:
                extra.append(int(r[2]))
    return uid, gid if gid is not None else 0, extra


def command(spec: ContainerSpec, image: ImageConfig) -> list[str]:
    """Docker's rule: an overridden entrypoint drops the image's cmd; args replace cmd."""
    if spec.entrypoint:
        args = [*spec.entrypoint, *spec.args]
    else:
        args = [*image.entrypoint, *(spec.args or image.cmd)]
    if not args:
        raise ContainerError("nothing to run: neither the image nor the workload gives a command")
    return args


def environment(spec: ContainerSpec, image: ImageConfig) -> list[str]:
    env: dict[str, str] = {}
    for item in image.env:
        key, _, value = item.partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOSTNAME"] = spec.hostname or spec.id
    env.update(spec.env)
    env.update(spec.secret_env)
    for key in env:
        if not key or "=" in key or "\x00" in key or "\x00" in env[key]:
            raise ContainerError(f"environment variable name {key[:40]!r} is invalid")
    return [f"{k}={v}" for k, v in env.items()]


def cgroups_path(container_id: str) -> str:
    return f"/zerostack/{container_id}"


def oci_config(spec: ContainerSpec, image: ImageConfig, image_rootfs: Path) -> dict[str, Any]:
    """runc's config.json for `spec`, the image mounted (overlay) at `<bundle>/rootfs`."""
    uid, gid, extra_gids = resolve_user(image_rootfs, spec.user or image.user)
    caps = list(CAPABILITIES)
    # A non-root process keeps the bounding set only: it cannot use capabilities itself.
    own_caps = caps if uid == 0 else []
    cwd = spec.workdir or image.working_dir or "/"
    if not cwd.startswith("/"):
        raise ContainerError(f"working directory {cwd!r} must be absolute")
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    for v in spec.volumes:
        mounts.append({"destination": v.target, "type": "bind", "source": str(v.source),
                       "options": ["rbind", "rprivate", "nosuid", "nodev",
                                   "ro" if v.readonly else "rw"]})
    # Never above the node's own hard limit, which runc could not raise.
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    net: dict[str, Any] = {"type": "network"}
    if spec.netns:
        net["path"] = spec.netns
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": extra_gids},
            "args": command(spec, image),
            "env": environment(spec, image),
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": own_caps, "permitted": own_caps,
                             "inheritable": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": min(1024, nofile)}],
            "noNewPrivileges": True,
            "oomScoreAdj": 500,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": spec.hostname or spec.id,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, net, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}],
            "cgroupsPath": cgroups_path(spec.id),
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": spec.memory, "swap": spec.memory},
                "cpu": {"shares": max(2, spec.cpu_millis * 1024 // 1000),
                        "quota": spec.cpu_millis * CPU_PERIOD // 1000, "period": CPU_PERIOD},
                "pids": {"limit": spec.pids},
            },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO",
                              "errnoRet": 1}],
            },
        },
    }
