"""How the node touches its own files on the host: private modes for everything holding
keys, secrets or tenant data, link-free opening of paths built from outside data, and the
loop devices that back its filesystem images.

Standard library only: the per-container shim imports it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_NO_LINKS = os.O_NOFOLLOW | os.O_CLOEXEC
LOOP_FREE_WAIT = 30.0  # seconds for the kernel to free an unmounted image's loop device


def check_component(name: str) -> str:
    """`name` if it is one plain path component (no '/', NUL, '.', '..' or empty);
    ValueError otherwise. The last line of defence: callers check names against their
    own, narrower pattern first."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name or len(name) > 255:
        raise ValueError(f"{name[:80]!r} is not a plain file name")
    return name


def open_beneath(root: Path, parts: Sequence[str], flags: int = os.O_RDONLY | os.O_DIRECTORY
                 ) -> int:
    """Open `root/parts[0]/…/parts[-1]` without following a symbolic link at any step
    below `root` (the node's own directory, trusted), and return the descriptor.

    Every component is opened relative to its parent's descriptor with O_NOFOLLOW, so a
    link planted anywhere on the way fails with ELOOP (or ENOTDIR) instead of leading
    outside. Raises ValueError for a component that is not a plain name, OSError for a
    missing or linked step. A non-directory is opened O_NONBLOCK, so a FIFO cannot hang
    the caller; callers check the file type with `fstat`.
    """
    names = [check_component(p) for p in parts]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names[:-1]:
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NO_LINKS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not names:
            return fd
        last_flags = flags | _NO_LINKS | (0 if flags & os.O_DIRECTORY else os.O_NONBLOCK)
        last = os.open(names[-1], last_flags, dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return last


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) readable by its owner only, or make an existing
    one so; refuses a symbolic link in its place."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def restrict(path: Path) -> None:
    """Take every group and other permission off `path` if it exists (never through a
    link): what an upgraded node does to files an older version left readable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


def restrict_tree(path: Path) -> None:
    """`restrict` on `path` and, if it is a directory, on everything below it (links are
    neither followed nor changed; mount points below are left alone)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    restrict(path)
    if not stat.S_ISDIR(st.st_mode):
        return
    for dirpath, dirnames, filenames in os.walk(path):
        keep = []
        for name in dirnames:
            child = Path(dirpath) / name
            restrict(child)
            if not os.path.ismount(child):
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            restrict(Path(dirpath) / name)


def create_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open `path` for writing, creating it mode 0600 (an existing file is made 0600);
    never through a link."""
    fd = os.open(path, flags | os.O_CREAT | _NO_LINKS, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def loop_devices(path: Path, *, below: bool = False) -> list[str]:
    """The loop devices (`/dev/loopN`) whose backing file is `path`, or with `below` any
    file under the folder `path` (symlinks in `path` resolved)."""
    target = os.path.realpath(path)
    prefix = target.rstrip("/") + "/"
    found = []
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # not attached
        backing = backing.removesuffix(" (deleted)")
        if backing.startswith(prefix) if below else backing == target:
            found.append(f"/dev/{dev.name}")
    return found


def wait_loop_free(image: Path, timeout: float = LOOP_FREE_WAIT) -> list[str]:
    """Wait until no loop device backs the file `image`; returns the devices that still
    do after `timeout` seconds (empty: it is free).

    Unmounting a `-o loop` mount returns before the kernel has freed its loop device: it
    is detached automatically but asynchronously, tens of milliseconds later, longer on a
    busy machine. Until then the device holds the image at its old size, so growing or
    checking the image, or mounting it again (which may take that same device), must
    wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        devices = loop_devices(image)
        if not devices or time.monotonic() >= deadline:
            return devices
        time.sleep(0.02)
