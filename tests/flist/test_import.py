"""Importing docker-save tarballs and OCI layouts built here: layers, whiteouts, config."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from tests.flist.image import busybox_layers, docker_save_tarball, layer_bytes
from zerostack.flist import FlistError, LocalStore, import_image


def _paths(result_entries: tuple) -> dict[str, object]:  # type: ignore[type-arg]
    return {e.path: e for e in result_entries}


def test_docker_save_layers_and_whiteouts(tmp_path: Path) -> None:
    config = {"Entrypoint": ["/app/run.sh"], "Cmd": None, "Env": ["PATH=/bin", "GREETING=hi"],
              "WorkingDir": "/app", "User": "0:0"}
    tarball = docker_save_tarball(tmp_path / "img.tar", config, busybox_layers())
    result = import_image(tarball, LocalStore(tmp_path / "store"))
    m = result.manifest
    assert result.layers == 2
    assert m.name == "test/busybox:1"
    assert m.config.entrypoint == ("/app/run.sh",)
    assert m.config.env == ("PATH=/bin", "GREETING=hi")
    assert (m.config.working_dir, m.config.user) == ("/app", "0:0")
    paths = _paths(m.entries)
    assert "etc/secret" not in paths and "etc/hostname.orig" not in paths  # whiteouts
    assert not any(p.startswith("opt/old/") and p != "opt/old/c" for p in paths)  # opaque dir
    assert "opt/old/c" in paths
    # The hardlink's target was whited out: its content survives as a plain file.
    link = paths["etc/link-to-orig"]
    assert link.type == "file" and link.size == len(b"base\n")  # type: ignore[attr-defined]
    assert not any(".wh." in p for p in paths)
    assert paths["tmp"].mode == 0o1777  # type: ignore[attr-defined]
    assert paths["bin/sh"].target == "busybox"  # type: ignore[attr-defined]


def test_oci_layout_with_gzip_layers(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    layers = [gzip.compress(b) for b in busybox_layers()]
    layers.append(layer_bytes([("app/run.sh", b"#!/bin/sh\necho v2\n", tarfile.REGTYPE, 0o755, "")]))
    config = blob(json.dumps({"config": {"Cmd": ["/app/run.sh"], "Env": ["A=1"]}}).encode())
    manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": config},
        "layers": [{"digest": blob(b), "mediaType": "x"} for b in layers],
    }).encode())
    # A multi-platform index: the linux/amd64 manifest is chosen, whatever its position.
    other = blob(json.dumps({"schemaVersion": 2, "config": {"digest": config},
                             "layers": []}).encode())
    platforms = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": other, "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": manifest, "platform": {"os": "linux", "architecture": "amd64"}}],
    }).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"digest": platforms, "mediaType": "application/vnd.oci.image.index.v1+json",
         "annotations": {"org.opencontainers.image.ref.name": "v2"}}]}))
    store = LocalStore(tmp_path / "store")
    m = import_image(layout, store).manifest
    assert m.name == "v2" and m.config.cmd == ("/app/run.sh",)
    run = _paths(m.entries)["app/run.sh"]
    data = store.get_many([bytes.fromhex(run.chunks[0])])[0]  # type: ignore[attr-defined]
    assert data == b"#!/bin/sh\necho v2\n"

    with tarfile.open(tmp_path / "oci.tar", "w") as tar:
        tar.add(layout, arcname=".")
    assert import_image(tmp_path / "oci.tar", store).manifest.hash == m.hash


def test_hostile_layers_are_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    evil = layer_bytes([("../../etc/passwd", b"x", tarfile.REGTYPE, 0o644, "")])
    with pytest.raises(FlistError, match="climbs out"):
        import_image(docker_save_tarball(tmp_path / "a.tar", {}, [evil]), store)
    # A file "through" a symlink lands inside the image, never on the host.
    through = layer_bytes([("etc", None, tarfile.SYMTYPE, 0o777, "/host-etc"),
                           ("etc/passwd", b"inside\n", tarfile.REGTYPE, 0o644, "")])
    m = import_image(docker_save_tarball(tmp_path / "b.tar", {}, [through]), store).manifest
    assert {e.path for e in m.entries} == {"etc", "host-etc", "host-etc/passwd"}
    with pytest.raises(FlistError, match="neither a docker save"):
        import_image(docker_save_tarball(tmp_path / "c.tar", {}, []).parent / "store", store)
