"""The probe image: busybox-static plus a script that reports, from inside a container, what
it can see and do, and two tiny static programs (syscall attempts, the effective uid).

`docs/security.md` quotes the probe's output; `test_isolation.py` asserts on it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.flist.image import busybox_rootfs

APPLETS = ("grep", "tr", "df", "dd", "unshare", "chmod", "cp", "stat", "sed", "sort")

PROBE_SH = r"""#!/bin/sh
# What a tenant sees from inside its container.
echo "== identity"
id
echo "uid_map: $(cat /proc/self/uid_map | tr -s ' ')"
echo "gid_map: $(cat /proc/self/gid_map | tr -s ' ')"
echo "== capabilities and filters"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo "== processes"
for p in /proc/[0-9]*; do echo "pid ${p#/proc/} $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)"; done
echo "== interfaces"
tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '
echo "== mounts (mount point, per-mount options)"
cut -d' ' -f5,6 /proc/self/mountinfo
echo "== disk"
df -k / | tail -n 1 | tr -s ' '
echo "== namespaces and io_uring"
unshare -U true 2>&1 && echo "unshare -U: allowed" || echo "unshare -U: refused"
/bin/syscalls
"""

SYSCALLS_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

struct clone_args_v0 { uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack,
                       stack_size, tls; };

static void report(const char *what, long r, int err) {
    if (r >= 0) printf("%s: allowed\n", what);
    else printf("%s: refused (%s)\n", what, strerror(err));
}

static long child_or_wait(long r) {
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, NULL, 0);
    return r;
}

int main(void) {
    long r = syscall(SYS_unshare, CLONE_NEWUSER);
    report("unshare(CLONE_NEWUSER)", r, errno);
    r = child_or_wait(syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
    report("clone(CLONE_NEWUSER)", r, errno);
    r = child_or_wait(syscall(SYS_clone, CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0));
    report("clone(CLONE_NEWNET)", r, errno);
    struct clone_args_v0 ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_NEWUSER;
    ca.exit_signal = SIGCHLD;
    r = child_or_wait(syscall(435 /* clone3 */, &ca, sizeof ca));
    report("clone3(CLONE_NEWUSER)", r, errno);
    unsigned char params[120];
    memset(params, 0, sizeof params);
    r = syscall(425 /* io_uring_setup */, 4, params);
    report("io_uring_setup", r, errno);
    r = child_or_wait(syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0));
    report("clone(plain fork)", r, errno);
    return 0;
}
"""

EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d\n", (int)geteuid()); return 0; }
"""


def compile_static(source: str, out: Path) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    src.unlink()
    return out


def probe_rootfs(root: Path) -> Path:
    """The probe image's root: busybox, /probe.sh, /bin/syscalls, and /bin/suid-euid, a
    set-uid-root program printing its effective uid (what a hostile image would plant)."""
    busybox_rootfs(root)
    for applet in APPLETS:
        if not (root / "bin" / applet).exists():
            os.symlink("busybox", root / "bin" / applet)
    (root / "probe.sh").write_text(PROBE_SH)
    (root / "probe.sh").chmod(0o755)
    compile_static(SYSCALLS_C, root / "bin" / "syscalls")
    euid = compile_static(EUID_C, root / "bin" / "suid-euid")
    os.chown(euid, 0, 0)
    euid.chmod(0o4755)
    return root
