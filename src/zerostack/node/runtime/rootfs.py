"""A container's filesystem on the host: its writable layer (a size-limited ext4 image,
loop-mounted), the overlay of that layer over the cached image, the shift of the image's
owners into the container's host id range, and the staging directory runc reads it from.

Every mount is `nosuid,nodev`: a set-id file a tenant plants in its image, layer or volume
never gives a host user its owner's ids. runc mounts the rootfs from inside the
container's user namespace, so it reaches it (and the staged volumes) through `stage`
(0710, group = the container's root on the host), never through the node's private data
directory, which that namespace's root may not enter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerostack.node.hostfs import wait_loop_free
from zerostack.node.runtime.idmap import RANGE
from zerostack.node.runtime.runc import is_mounted, unmount
from zerostack.node.runtime.spec import ContainerError

STAGE_ROOT = Path("/run/zerostack/containers")
MIN_DISK = 16 << 20  # ext4 metadata and the image's shifted inodes need some room

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(source: str, target: Path, fstype: str, flags: int, data: str = "") -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags,
                   data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise ContainerError(f"mounting {fstype or 'bind'} at {target} failed: {os.strerror(err)}")


def _run(*args: str) -> None:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise ContainerError(f"{args[0]} is not installed on this node") from None
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and args[0] != "e2fsck"):
        raise ContainerError(f"{args[0]} failed: {proc.stderr.strip()[:300]}")


@dataclass(frozen=True)
class Layout:
    """Where one container's filesystem pieces live on the host."""

    dir: Path  # the runtime's private directory for the container
    stage: Path  # what runc reads: rootfs/, volumes/<n>/, sys/
    base: int  # host uid and gid of the container's root

    @property
    def layer_image(self) -> Path:
        return self.dir / "layer.img"

    @property
    def layer(self) -> Path:
        return self.dir / "layer"

    @property
    def upper(self) -> Path:
        return self.layer / "upper"

    @property
    def work(self) -> Path:
        return self.layer / "work"

    @property
    def rootfs(self) -> Path:
        return self.stage / "rootfs"

    @property
    def sys(self) -> Path:
        return self.stage / "sys"

    def volume(self, index: int) -> Path:
        return self.stage / "volumes" / str(index)

    def to_dict(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "stage": str(self.stage), "base": self.base}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(Path(d["dir"]), Path(d["stage"]), int(d["base"]))


def check_layer_size(layout: Layout, size: int) -> None:
    """Refuse a size below the existing layer's: shrinking would lose the container's data."""
    try:
        have = layout.layer_image.stat().st_size
    except FileNotFoundError:
        return
    if max(size, MIN_DISK) < have:
        raise ContainerError(f"the writable layer cannot shrink from {have} to {size} bytes")


def prepare_layer(layout: Layout, size: int) -> None:
    """Create the writable layer's filesystem of `size` bytes, or grow it to `size`.

    The image is sparse: it takes host disk only as the container writes. A layer never
    shrinks (that would lose the container's data): a smaller size is refused."""
    check_layer_size(layout, size)
    size = max(size, MIN_DISK)
    image = layout.layer_image
    if image.exists():
        if size > image.stat().st_size:
            unmount(layout.layer)
            _layer_released(layout)
            with open(image, "r+b") as f:
                f.truncate(size)
            _run("e2fsck", "-f", "-y", str(image))
            _run("resize2fs", "-f", str(image))
        return
    tmp = image.with_name(".layer.img.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    # No journal: a layer is the container's scratch space, rebuilt by nothing; lazy init
    # keeps formatting a large sparse image at a few milliseconds.
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
         "-E", "nodiscard,lazy_itable_init=1", str(tmp))
    os.replace(tmp, image)


def _layer_released(layout: Layout) -> None:
    """Wait until the kernel has freed the loop device of the layer's last mount: growing
    the image or mounting it while that device still holds it would reach the old device,
    of the old size."""
    stays = wait_loop_free(layout.layer_image)
    if stays:
        raise ContainerError(f"{', '.join(stays)} still holds {layout.layer_image} after "
                             "its unmount: the layer is in use")


def mount_rootfs(layout: Layout, lower: Path, volumes: list[dict[str, Any]],
                 netns: str = "") -> None:
    """Mount the layer, the overlay, the volumes (and a sysfs of `netns`) under `stage`.

    Idempotent: what is already mounted stays; the id shift runs once per layer."""
    layout.layer.mkdir(mode=0o700, exist_ok=True)
    if not is_mounted(layout.layer):
        _layer_released(layout)
        _run("mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noexec", str(layout.layer_image),
             str(layout.layer))
    # the layer's root (mkfs makes it 0755) holds the tenant's files: the node's alone
    os.chmod(layout.layer, 0o700)
    root_st = os.stat(lower)
    for d in (layout.upper, layout.work):
        d.mkdir(mode=0o700, exist_ok=True)
    # The upper directory is the container's "/": it must look like the image's root.
    os.chown(layout.upper, _shift(root_st.st_uid, layout.base), _shift(root_st.st_gid, layout.base))
    os.chmod(layout.upper, root_st.st_mode & 0o7777)
    STAGE_ROOT.mkdir(parents=True, exist_ok=True, mode=0o711)
    layout.stage.mkdir(mode=0o710, exist_ok=True)
    os.chown(layout.stage, 0, layout.base)
    os.chmod(layout.stage, 0o710)
    layout.rootfs.mkdir(mode=0o700, exist_ok=True)
    if not is_mounted(layout.rootfs):
        # metacopy: changing an owner copies only the inode up, never the file's data.
        _mount("overlay", layout.rootfs, "overlay", MS_NOSUID | MS_NODEV,
               f"lowerdir={lower},upperdir={layout.upper},workdir={layout.work},metacopy=on")
    marker = layout.layer / "idmap"
    if not marker.exists() or marker.read_text() != str(layout.base):
        shift_tree(lower, layout.rootfs, layout.base)
        marker.write_text(str(layout.base))
    (layout.stage / "volumes").mkdir(mode=0o700, exist_ok=True)
    for i, v in enumerate(volumes):
        target = layout.volume(i)
        target.mkdir(mode=0o700, exist_ok=True)
        if is_mounted(target):
            continue
        source = Path(v["source"])
        if not v.get("readonly"):
            own_volume(source, layout.base)
        _mount(str(source), target, "", MS_BIND)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if v.get("readonly") else 0)
        _mount("", target, "", flags)
    if netns:
        # A sysfs only shows the network devices of the namespace that mounts it; the
        # container's user namespace does not own a joined namespace, so the node mounts it.
        layout.sys.mkdir(mode=0o700, exist_ok=True)
        if not is_mounted(layout.sys):
            _run("nsenter", f"--net={netns}", "mount", "-t", "sysfs", "-o",
                 "ro,nosuid,nodev,noexec", "sysfs", str(layout.sys))


def unmount_rootfs(layout: Layout) -> None:
    """Undo `mount_rootfs` (missing pieces are fine) and remove the staging directory."""
    volumes = layout.stage / "volumes"
    if volumes.is_dir():
        for target in sorted(volumes.iterdir()):
            unmount(target)
    for target in (layout.sys, layout.rootfs, layout.layer):
        unmount(target)
    # Stopped means stopped: the layer's loop device is gone too, not just its mount (a
    # layer still in use after a lazy unmount keeps it; the next mount reports that).
    wait_loop_free(layout.layer_image)
    if not layout.stage.is_dir():
        return
    # Only empty mount points are left: rmdir never deletes through a mount.
    try:
        if volumes.is_dir():
            for target in volumes.iterdir():
                target.rmdir()
        for sub in (volumes, layout.sys, layout.rootfs):
            if sub.is_dir():
                sub.rmdir()
        layout.stage.rmdir()
    except OSError as exc:
        raise ContainerError(f"cannot remove {layout.stage}: {exc}") from None


def _shift(host_id: int, base: int) -> int:
    """A container id (as the image or an unshifted volume holds it) in the host range."""
    return base + (host_id % RANGE)


def shift_tree(lower: Path, merged: Path, base: int) -> None:
    """Give every path of the overlay `merged` its owner from `lower`, moved by `base`."""
    lower_s, merged_s = str(lower), str(merged)
    dirs = [""]
    while dirs:
        rel = dirs.pop()
        st = os.lstat(lower_s + rel)
        os.lchown(merged_s + rel, _shift(st.st_uid, base), _shift(st.st_gid, base))
        with os.scandir(lower_s + rel) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    dirs.append(f"{rel}/{e.name}")
                    continue
                est = e.stat(follow_symlinks=False)
                os.lchown(f"{merged_s}{rel}/{e.name}", _shift(est.st_uid, base),
                          _shift(est.st_gid, base))


def own_volume(root: Path, base: int) -> None:
    """Move a volume's owners into the range starting at `base` (once: a volume whose root
    is already in the range is left alone), so the container's root can write to it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # Two containers of a deployment starting together: the second waits, then finds
        # the volume in the range and leaves it alone. So no walk ever runs while a
        # container (which could swap a directory for a symlink) uses the volume.
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if base <= st.st_uid < base + RANGE:
            return
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                p = os.path.join(dirpath, name)
                est = os.lstat(p)
                os.lchown(p, _shift(est.st_uid, base), _shift(est.st_gid, base))
        os.fchown(fd, _shift(st.st_uid, base), _shift(st.st_gid, base))
    finally:
        os.close(fd)
