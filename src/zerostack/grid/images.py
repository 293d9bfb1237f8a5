"""The example image a local grid offers its users: a tiny busybox root filesystem
(from Debian's busybox-static), built into a signed flist and pushed to the grid's hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from zerostack.crypto import Identity
from zerostack.flist import Hub, ImageConfig, LocalStore, SignedFlist, build_dir, push_flist
from zerostack.grid.errors import GridError

BUSYBOX = Path("/bin/busybox")
TOOLS = ("sh", "echo", "cat", "ls", "mkdir", "sleep", "httpd", "wget", "wc", "grep", "head",
         "tail", "env", "date", "nc", "true")


def busybox_tree(root: Path) -> Path:
    """`root` as a minimal Linux tree whose commands are links to one static busybox."""
    if not BUSYBOX.is_file():
        raise GridError(f"{BUSYBOX} is missing: install busybox-static "
                        "(scripts/install-system-deps)")
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for tool in TOOLS:
        link = root / "bin" / tool
        if not link.exists():
            os.symlink("busybox", link)
    for d in ("etc", "proc", "sys", "dev", "tmp", "data", "root"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def publish_example(workdir: Path, hub: str, publisher: Identity) -> str:
    """Build the busybox image under `workdir`, sign it with `publisher`, push it to
    `hub` (HOST:PORT, reachable from here); returns the flist reference HUB/HASH."""
    store = LocalStore(workdir / "store")
    manifest, _ = build_dir(busybox_tree(workdir / "rootfs"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")), name="busybox")
    flist = SignedFlist.sign(manifest, publisher)
    with Hub(hub) as h:
        push_flist(flist, store, h)
    return f"{hub}/{flist.hash_hex}"
