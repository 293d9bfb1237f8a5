"""The OCI runtime config (runc's config.json) for a container: a pure function of its spec.

Isolation: user, pid, mount, ipc, uts and network namespaces (root in the container is an
unprivileged id range on the host); cgroup limits on CPU, memory (without swap) and pids; no
new privileges; a reduced capability set; /proc and /sys paths masked or read-only; a seccomp
allowlist in the spirit of Docker's default profile, without io_uring and without any way to
make namespaces (module loading, kexec, keyrings, bpf, mount, unshare... all refused).
"""

from __future__ import annotations

import os
import resource
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerostack.flist import ImageConfig
from zerostack.node.hostfs import open_beneath
from zerostack.node.runtime.idmap import RANGE
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

# The seccomp allowlist, by area; everything else fails with EPERM. Names the host's
# libseccomp does not know are skipped by runc, and calls newer than every listed one get
# ENOSYS, so a libc falls back to an older call.
_FILES = """access faccessat faccessat2 chdir fchdir getcwd chmod fchmod fchmodat chown chown32
fchown fchown32 fchownat lchown lchown32 creat open openat openat2 close close_range dup dup2
dup3 fcntl fcntl64 flock fsync fdatasync sync syncfs sync_file_range ftruncate ftruncate64
truncate truncate64 fallocate fadvise64 fadvise64_64 readahead link linkat symlink symlinkat
unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir mknod mknodat readlink readlinkat
stat stat64 lstat lstat64 fstat fstat64 fstatat64 newfstatat statx statfs statfs64 fstatfs
fstatfs64 getdents getdents64 utime utimes utimensat utimensat_time64 futimesat umask getxattr
lgetxattr fgetxattr setxattr lsetxattr fsetxattr listxattr llistxattr flistxattr removexattr
lremovexattr fremovexattr chroot"""
_IO = """read readv pread64 preadv preadv2 write writev pwrite64 pwritev pwritev2 lseek _llseek
sendfile sendfile64 splice tee vmsplice copy_file_range ioctl io_setup io_destroy io_submit
io_cancel io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set select _newselect
pselect6 pselect6_time64 poll ppoll ppoll_time64 epoll_create epoll_create1 epoll_ctl
epoll_ctl_old epoll_wait epoll_wait_old epoll_pwait epoll_pwait2 eventfd eventfd2 signalfd
signalfd4 timerfd_create timerfd_settime timerfd_settime64 timerfd_gettime timerfd_gettime64
inotify_init inotify_init1 inotify_add_watch inotify_rm_watch fanotify_mark pipe pipe2"""
_MEMORY = """brk mmap mmap2 munmap mremap mprotect madvise mincore msync mlock mlock2 mlockall
munlock munlockall remap_file_pages membarrier memfd_create memfd_secret pkey_alloc pkey_free
pkey_mprotect process_mrelease"""
_PROCESSES = """execve execveat exit exit_group fork vfork wait4 waitid waitpid kill tkill tgkill
getpid getppid gettid getpgid setpgid getpgrp getsid setsid getpriority setpriority prctl
arch_prctl modify_ldt set_tid_address set_robust_list get_robust_list get_thread_area
set_thread_area rseq futex futex_time64 futex_waitv restart_syscall pidfd_open
pidfd_send_signal ptrace process_vm_readv process_vm_writev capget capset seccomp getrlimit
ugetrlimit setrlimit prlimit64 getrusage times sched_getaffinity sched_setaffinity
sched_getattr sched_setattr sched_getparam sched_setparam sched_getscheduler
sched_setscheduler sched_get_priority_max sched_get_priority_min sched_rr_get_interval
sched_rr_get_interval_time64 sched_yield getcpu uname sysinfo getrandom landlock_add_rule
landlock_create_ruleset landlock_restrict_self"""
_IDS = """getuid getuid32 geteuid geteuid32 getgid getgid32 getegid getegid32 getresuid
getresuid32 getresgid getresgid32 getgroups getgroups32 setuid setuid32 setgid setgid32 setreuid
setreuid32 setregid setregid32 setresuid setresuid32 setresgid setresgid32 setfsuid setfsuid32
setfsgid setfsgid32 setgroups setgroups32"""
_SIGNALS_TIME = """rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn
rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sigaltstack sigprocmask
sigreturn pause alarm clock_gettime clock_gettime64 clock_getres clock_getres_time64
clock_nanosleep clock_nanosleep_time64 nanosleep gettimeofday time getitimer setitimer
timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime
timer_settime64 adjtimex"""
_NET_IPC = """socketpair socketcall bind connect listen accept accept4 getsockname getpeername
getsockopt setsockopt send sendto sendmsg sendmmsg recv recvfrom recvmsg recvmmsg
recvmmsg_time64 shutdown ipc msgctl msgget msgrcv msgsnd semctl semget semop semtimedop
semtimedop_time64 shmat shmctl shmdt shmget mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink"""
ALLOWED_SYSCALLS = sorted({n for group in (_FILES, _IO, _MEMORY, _PROCESSES, _IDS, _SIGNALS_TIME,
                                           _NET_IPC) for n in group.split()})
# Every clone flag that makes a namespace: user, mount, uts, ipc, pid, net, cgroup.
CLONE_NEW_ANY = 0x7E020000
AF_VSOCK = 40
# personality(2) values programs legitimately set: PER_LINUX, PER_LINUX32, both with
# UNAME26, and the query (0xffffffff); nothing that turns off address randomization.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
ENOSYS = 38
EPERM = 1


def seccomp_profile() -> dict[str, Any]:
    """The seccomp filter every container gets (also what `docs/containers.md` describes)."""
    rules: list[dict[str, Any]] = [{"names": ALLOWED_SYSCALLS, "action": "SCMP_ACT_ALLOW"}]
    # clone only without namespace flags (mask & flags == 0); clone3 hides its flags in
    # memory a filter cannot read, so it reports "not implemented" and libc uses clone.
    rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": CLONE_NEW_ANY, "valueTwo": 0,
                            "op": "SCMP_CMP_MASKED_EQ"}]})
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    rules.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]})
    for value in PERSONALITIES:
        rules.append({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]})
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": EPERM,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": rules}


@dataclass(frozen=True)
class HostPaths:
    """Where runc finds the container's pieces on the host, and its host id range."""

    rootfs: Path  # the overlay mount point
    base: int  # host uid and gid of the container's root
    volumes: tuple[Path, ...] = ()  # staged bind mounts, in the order of spec.volumes
    sys: Path | None = None  # a sysfs of a joined network namespace, when there is one
    hosts: Path | None = None  # the file bound read-only on /etc/hosts, when there is one


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


def oci_config(spec: ContainerSpec, image: ImageConfig, image_rootfs: Path,
               host: HostPaths) -> dict[str, Any]:
    """runc's config.json for `spec`, the image mounted (overlay) at `host.rootfs`."""
    if len(host.volumes) != len(spec.volumes):
        raise ContainerError("every volume needs its staged mount point")
    if host.base < RANGE or host.base % RANGE:
        # Root in the container must never be root (or any host user) on the host.
        raise ContainerError(f"host id range {host.base} is not a container range")
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
        # A joined network namespace is not owned by the container's user namespace, so
        # the node mounts its sysfs and the container gets a read-only bind of it.
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]} if host.sys is None else
        {"destination": "/sys", "type": "bind", "source": str(host.sys),
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    for v, staged in zip(spec.volumes, host.volumes, strict=True):
        mounts.append({"destination": v.target, "type": "bind", "source": str(staged),
                       "options": ["rbind", "rprivate", "nosuid", "nodev",
                                   "ro" if v.readonly else "rw"]})
    if host.hosts is not None:
        mounts.append({"destination": "/etc/hosts", "type": "bind", "source": str(host.hosts),
                       "options": ["bind", "rprivate", "nosuid", "nodev", "noexec", "ro"]})
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
        "root": {"path": str(host.rootfs), "readonly": False},
        "hostname": spec.hostname or spec.id,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "user"}, {"type": "pid"}, net, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}],
            "uidMappings": [{"containerID": 0, "hostID": host.base, "size": RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": host.base, "size": RANGE}],
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
            "seccomp": seccomp_profile(),
        },
    }
