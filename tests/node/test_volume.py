"""The volume provisioner on a real loop-mounted ext4 image: size limit, idempotence, removal."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from zerostack.crypto import Identity
from zerostack.node.provisioners import NodeContext, Pool, WorkloadID
from zerostack.node.provisioners.volume import VolumeProvisioner, mount_flags, mounted_at
from zerostack.workloads import Deployment, VolumeWorkload


def test_volume_is_size_limited_idempotent_and_removed(tmp_path: Path) -> None:
    require_root()
    require_tool("mkfs.ext4")
    node = NodeContext(tmp_path / "node", Identity.generate(),
                       pools=[Pool("ssd1", tmp_path / "ssd1", "ssd")])
    prov = VolumeProvisioner(node)
    spec = VolumeWorkload(name="data", size=16 << 20)
    dep = Deployment.parse({"twin_id": 1, "workloads": [spec.model_dump()],
                            "signature_requirement": {"requests": [{"twin": 1, "key": "ab" * 32, "required": True}],
                                                      "weight_required": 1}})
    wid = WorkloadID(7, "data")
    mnt = node.volume_mountpoint(wid)
    try:
        res = prov.provision(wid, spec, dep)
        assert res.data["id"] == "c7-data"
        assert prov.exists(wid, spec) and mounted_at(mnt) is not None
        image = tmp_path / "ssd1" / "volumes" / "c7-data.img"
        assert image.stat().st_blocks * 512 < image.stat().st_size  # sparse
        # provisioning again changes nothing (same image, one mount)
        prov.provision(wid, spec, dep)
        with open("/proc/self/mountinfo") as f:
            assert sum(1 for line in f if f" {mnt} " in line) == 1
        (mnt / "small").write_bytes(b"x" * 1024)
        with pytest.raises(OSError) as err:
            with open(mnt / "big", "wb") as f:
                for _ in range(32):
                    f.write(b"\0" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        assert err.value.errno == errno.ENOSPC
        # growing keeps the data
        (mnt / "big").unlink()
        bigger = VolumeWorkload(name="data", size=32 << 20)
        prov.update(wid, spec, bigger, dep)
        assert (mnt / "small").read_bytes() == b"x" * 1024
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize > 24 << 20
        # unmounted behind the agent's back: exists() says so, provision remounts
        os.system(f"umount {mnt}")
        assert not prov.exists(wid, bigger)
        prov.provision(wid, bigger, dep)
        assert (mnt / "small").read_bytes() == b"x" * 1024
        assert {"nosuid", "nodev"} <= mount_flags(mnt)
        # mounted without nosuid,nodev (as nodes did before): provision remounts it with them
        subprocess.run(["mount", "-o", "remount,suid,dev", str(mnt)], check=True)
        assert "nosuid" not in mount_flags(mnt)
        prov.provision(wid, bigger, dep)
        assert {"nosuid", "nodev"} <= mount_flags(mnt)
    finally:
        prov.deprovision(wid, spec)
    assert mounted_at(mnt) is None and not mnt.exists()
    assert not (tmp_path / "ssd1" / "volumes" / "c7-data.img").exists()
    prov.deprovision(wid, spec)  # already gone: still fine
