"""Test images made from busybox-static: a tiny root filesystem and docker-save tarballs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "env", "sleep", "awk", "ls", "id", "nc", "httpd", "wget",
           "date", "head", "tail", "wc", "grep", "mkdir", "hostname", "cut", "true", "test")


def busybox_rootfs(root: Path) -> Path:
    """A root directory with bin/busybox, applet symlinks and the usual empty mount points."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    for d in ("etc", "proc", "sys", "dev", "tmp", "data", "root"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE,
         mode: int = 0o644, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    info.linkname = linkname
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def layer_bytes(build: list[tuple[str, bytes | None, bytes, int, str]]) -> bytes:
    """A layer tar from (name, data, type, mode, linkname) rows."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind, mode, link in build:
            _add(tar, name, data, kind=kind, mode=mode, linkname=link)
    return buf.getvalue()


def docker_save_tarball(path: Path, config: dict[str, object], layers: list[bytes],
                        tag: str = "test/busybox:1") -> Path:
    """Write a `docker save`-style tarball: manifest.json, the config JSON and layer tars."""
    config_doc = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                             "rootfs": {"type": "layers", "diff_ids": [
                                 "sha256:" + hashlib.sha256(b).hexdigest() for b in layers]}}).encode()
    config_name = hashlib.sha256(config_doc).hexdigest() + ".json"
    layer_names = [f"{hashlib.sha256(b).hexdigest()}/layer.tar" for b in layers]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]).encode()
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", manifest)
        _add(tar, config_name, config_doc)
        for name, data in zip(layer_names, layers, strict=True):
            _add(tar, name.split("/")[0] + "/", None, kind=tarfile.DIRTYPE, mode=0o755)
            _add(tar, name, data)
    return path


def busybox_layers() -> list[bytes]:
    """Two layers: busybox + applets + junk, then a layer deleting the junk with whiteouts."""
    busybox = BUSYBOX.read_bytes()
    base: list[tuple[str, bytes | None, bytes, int, str]] = [
        ("bin/", None, tarfile.DIRTYPE, 0o755, ""),
        ("bin/busybox", busybox, tarfile.REGTYPE, 0o755, ""),
        *[(f"bin/{a}", None, tarfile.SYMTYPE, 0o777, "busybox") for a in APPLETS],
        ("etc/", None, tarfile.DIRTYPE, 0o755, ""),
        ("etc/secret", b"lower layer secret\n", tarfile.REGTYPE, 0o600, ""),
        ("etc/hostname.orig", b"base\n", tarfile.REGTYPE, 0o644, ""),
        ("etc/link-to-orig", None, tarfile.LNKTYPE, 0o644, "etc/hostname.orig"),
        ("opt/", None, tarfile.DIRTYPE, 0o755, ""),
        ("opt/old/", None, tarfile.DIRTYPE, 0o755, ""),
        ("opt/old/a", b"a\n", tarfile.REGTYPE, 0o644, ""),
        ("opt/old/b", b"b\n", tarfile.REGTYPE, 0o644, ""),
        ("tmp/", None, tarfile.DIRTYPE, 0o1777, ""),
    ]
    top: list[tuple[str, bytes | None, bytes, int, str]] = [
        ("etc/", None, tarfile.DIRTYPE, 0o755, ""),
        ("etc/.wh.secret", b"", tarfile.REGTYPE, 0o644, ""),
        ("etc/.wh.hostname.orig", b"", tarfile.REGTYPE, 0o644, ""),
        ("opt/old/c", b"c\n", tarfile.REGTYPE, 0o644, ""),
        ("opt/old/.wh..wh..opq", b"", tarfile.REGTYPE, 0o644, ""),
        ("app/", None, tarfile.DIRTYPE, 0o755, ""),
        ("app/run.sh", b"#!/bin/sh\necho \"imported $GREETING from $(pwd)\"\n", tarfile.REGTYPE,
         0o755, ""),
    ]
    return [layer_bytes(base), layer_bytes(top)]
