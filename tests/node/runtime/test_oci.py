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
    cfg = oci_config(spec, image, _rootfs(tmp_path))
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
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {"pid", "network", "ipc", "uts", "mount"}
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]
    bind = next(m for m in cfg["mounts"] if m["destination"] == "/data")
    assert "ro" in bind["options"] and bind["source"] == str(tmp_path)

    # An overridden entrypoint drops the image's cmd; args replace it.
    spec2 = ContainerSpec(id="c2", image_hash=HASH, entrypoint=("/bin/sh",), args=("-c", "true"))
    assert oci_config(spec2, image, tmp_path)["process"]["args"] == ["/bin/sh", "-c", "true"]
    spec3 = ContainerSpec(id="c3", image_hash=HASH, args=("--once",))
    assert oci_config(spec3, image, tmp_path)["process"]["args"] == ["/bin/app", "--once"]


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
        oci_config(ContainerSpec(id="c", image_hash=HASH), ImageConfig(), tmp_path)
