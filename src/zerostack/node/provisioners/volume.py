"""Volumes: a sparse ext4 image on an SSD pool, loop-mounted under the node's data dir.

The filesystem's size is the limit: writes beyond it fail with ENOSPC inside the volume
and nowhere else. It is mounted `nosuid,nodev`: a set-id file a container writes into its
volume gives nobody on the host its owner's ids. Images are formatted under a temporary
name and renamed into place, so a crash never leaves a half-made image under the final
name. Images are 0600 in 0700 directories: through an image file anyone could read every
file of the volume.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from zerostack.node.hostfs import PRIVATE_FILE, private_dir, restrict, wait_loop_free
from zerostack.node.provisioners.base import (
    NodeContext,
    Pool,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.workloads import Deployment, VolumeWorkload, Workload

MIN_SIZE = 8 << 20  # mkfs.ext4 needs room for its own metadata
MOUNT_OPTIONS = "loop,nosuid,nodev"


def _released(image: Path) -> None:
    """Wait until the kernel has freed the loop device of the image's last mount: growing
    the image or mounting it while that device still holds it would reach the old device,
    of the old size."""
    stays = wait_loop_free(image)
    if stays:
        raise ProvisionError(f"{', '.join(stays)} still holds volume image {image.name} "
                             "after its unmount: the volume is in use")


def _run(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise ProvisionError(f"{args[0]} is not installed on this node") from exc
    if proc.returncode not in ok:
        raise ProvisionError(f"{' '.join(args[:2])} failed: {proc.stderr.strip()[:300]}")
    return proc.stdout


def mount_flags(path: Path) -> set[str]:
    """The per-mount options (field 6 of mountinfo) of what is mounted at `path`."""
    target = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return set(fields[5].split(","))
    return set()


def mounted_at(path: Path) -> str | None:
    """The device mounted at `path`, from /proc/self/mountinfo, or None."""
    target = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # mount point is field 5; octal escapes for spaces never occur in our names
            if fields[4] == target:
                sep = fields.index("-")
                return fields[sep + 2]
    return None


class VolumeProvisioner(Provisioner):
    """Size-limited filesystems; result: the volume's id (the container mounts it by name)."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self.make_private()

    def make_private(self) -> None:
        """Close the volume directories and images an older version left readable."""
        for pool in self._pools():
            vdir = pool.path / "volumes"
            if vdir.is_dir() and not vdir.is_symlink():
                private_dir(vdir)
                for image in vdir.iterdir():
                    restrict(image)
        mounts = self.node.data_dir / "volumes"
        if mounts.is_dir() and not mounts.is_symlink():
            private_dir(mounts)

    def _pools(self) -> list[Pool]:
        pools = [p for p in self.node.pools if p.kind == "ssd"] or list(self.node.pools)
        if not pools:
            # A node started without --pool keeps volumes in its data dir.
            pools = [Pool("default", self.node.data_dir / "pool", "ssd")]
        return pools

    def image_path(self, wid: WorkloadID) -> Path | None:
        for pool in self._pools():
            path = pool.path / "volumes" / f"{wid.key}.img"
            if path.exists():
                return path
        return None

    def _choose_pool(self, size: int) -> Pool:
        best: tuple[int, Pool] | None = None
        for pool in self._pools():
            pool.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.statvfs(pool.path)
            free = st.f_bavail * st.f_frsize
            if free >= size and (best is None or free > best[0]):
                best = (free, pool)
        if best is None:
            raise ProvisionError(f"no storage pool has {size} bytes free for this volume")
        return best[1]

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        assert isinstance(spec, VolumeWorkload)
        size = max(spec.size, MIN_SIZE)
        image = self.image_path(wid)
        if image is None:
            pool = self._choose_pool(size)
            vdir = private_dir(pool.path / "volumes")
            image = vdir / f"{wid.key}.img"
            tmp = vdir / f".{wid.key}.img.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, PRIVATE_FILE)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, PRIVATE_FILE)
                f.truncate(size)  # sparse: takes no disk until written
            _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", str(tmp))
            os.replace(tmp, image)
        mnt = self.node.volume_mountpoint(wid)
        private_dir(mnt.parent)
        mnt.mkdir(mode=0o700, exist_ok=True)
        if mounted_at(mnt) is None:
            _released(image)
            _run("mount", "-o", MOUNT_OPTIONS, str(image), str(mnt))
        elif not {"nosuid", "nodev"} <= mount_flags(mnt):
            _run("mount", "-o", "remount,nosuid,nodev", str(mnt))  # mounted by an older node
        if image.stat().st_size < size:
            self._grow(image, mnt, size)
        return Provisioned(data={"id": wid.key, "size": spec.size})

    def _grow(self, image: Path, mnt: Path, size: int) -> None:
        # Offline resize: online resize2fs needs an ioctl that sandboxed kernels refuse.
        if mounted_at(mnt) is not None:
            _run("umount", str(mnt))
        _released(image)
        with open(image, "r+b") as f:
            f.truncate(size)
        _run("e2fsck", "-f", "-y", str(image), ok=(0, 1))  # 1 = fixed something, fine
        _run("resize2fs", "-f", str(image))
        _run("mount", "-o", MOUNT_OPTIONS, str(image), str(mnt))

    def update(
        self, wid: WorkloadID, old: Workload, new: Workload, deployment: Deployment
    ) -> Provisioned:
        assert isinstance(new, VolumeWorkload)
        image = self.image_path(wid)
        if image is not None and max(new.size, MIN_SIZE) < image.stat().st_size:
            raise ProvisionError(f"volume {wid.name} cannot shrink from "
                                 f"{image.stat().st_size} to {new.size} bytes")
        return self.provision(wid, new, deployment)

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        mnt = self.node.volume_mountpoint(wid)
        if mounted_at(mnt) is not None:
            _run("umount", str(mnt))
        if mnt.exists() and mounted_at(mnt) is None:
            try:
                mnt.rmdir()
            except OSError as exc:
                raise ProvisionError(f"cannot remove mount point of {wid}: {exc}") from exc
        for pool in self._pools():
            for name in (f"{wid.key}.img", f".{wid.key}.img.tmp"):
                (pool.path / "volumes" / name).unlink(missing_ok=True)

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        return self.image_path(wid) is not None and mounted_at(
            self.node.volume_mountpoint(wid)) is not None
