"""Fixtures for container tests: a hub, a published busybox image, a runtime; all cleaned up."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup, require_root, require_tool
from tests.flist.hub import start_hub
from tests.flist.image import busybox_rootfs
from zerostack.crypto import Identity
from zerostack.flist import (
    CachedImage,
    Hub,
    ImageCache,
    ImageConfig,
    LocalStore,
    SignedFlist,
    build_dir,
    push_flist,
)
from zerostack.node.runtime import ContainerRuntime
from zerostack.node.runtime.runc import is_mounted


@dataclass
class Env:
    hub: str
    publisher: Identity
    store: LocalStore
    cache: ImageCache
    runtime: ContainerRuntime
    image: CachedImage
    tmp: Path

    def new_id(self, name: str) -> str:
        return f"t{os.getpid()}-{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_root()
    require_tool("runc")
    tmp = tmp_path_factory.mktemp("runtime")
    procs = ProcessGroup()
    runtime = ContainerRuntime(tmp / "node" / "runtime")
    try:
        hub = start_hub(procs, tmp)
        ident = Identity.generate()
        store = LocalStore(tmp / "store")
        manifest, _ = build_dir(busybox_rootfs(tmp / "img"), store,
                                ImageConfig(entrypoint=("/bin/sh", "-c"), env=("IMAGE_ENV=1",)))
        flist = SignedFlist.sign(manifest, ident)
        cache = ImageCache(tmp / "node" / "images")
        with Hub(hub) as h:
            push_flist(flist, store, h)
            image = cache.fetch(h, flist.hash_hex, [ident.public_hex])
        yield Env(hub, ident, store, cache, runtime, image, tmp)
    finally:
        layouts = [runtime.layout(cid) for cid in runtime.ids()]
        for cid in runtime.ids():
            runtime.delete(cid)
        procs.stop_all()
        for layout in layouts:  # deleting a container leaves none of its mounts
            assert not is_mounted(layout.rootfs) and not is_mounted(layout.layer)
