"""Property: importing random layer stacks (files, whiteouts, opaque dirs) yields exactly
the tree a simple reference model of overlay semantics predicts."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.flist.image import docker_save_tarball, layer_bytes
from zerostack.flist import LocalStore, import_image

FILES = ["a/x", "a/y", "b/x", "c", "d"]
DIRS = ["a", "b"]
op = st.one_of(
    st.tuples(st.just("file"), st.sampled_from(FILES), st.binary(max_size=8)),
    st.tuples(st.just("whiteout"), st.sampled_from(FILES + DIRS), st.just(b"")),
    st.tuples(st.just("opaque"), st.sampled_from(DIRS), st.just(b"")),
)
layers = st.lists(st.lists(op, max_size=6), min_size=1, max_size=4)


def model(stack: list[list[tuple[str, str, bytes]]]) -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}  # path -> content (None: directory)

    def drop(path: str, keep_self: bool = False) -> None:
        for p in list(tree):
            if p.startswith(path + "/") or (p == path and not keep_self):
                del tree[p]

    for layer in stack:
        for kind, path, _ in layer:
            if kind == "whiteout":
                drop(path)
            elif kind == "opaque" and tree.get(path, b"") is None:
                drop(path, keep_self=True)
        for kind, path, data in layer:
            if kind == "file":
                if "/" in path:
                    tree.setdefault(path.split("/")[0], None)
                tree[path] = data
    return tree


def to_layer(layer: list[tuple[str, str, bytes]]) -> bytes:
    rows: list[tuple[str, bytes | None, bytes, int, str]] = []
    for kind, path, data in layer:
        if kind == "file":
            rows.append((path, data, tarfile.REGTYPE, 0o644, ""))
        elif kind == "whiteout":
            parent, _, name = path.rpartition("/")
            rows.append((f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"",
                         tarfile.REGTYPE, 0o644, ""))
        else:
            rows.append((f"{path}/.wh..wh..opq", b"", tarfile.REGTYPE, 0o644, ""))
    return layer_bytes(rows)


@settings(max_examples=60, deadline=None)
@given(layers)
def test_layers_apply_like_overlayfs(stack: list[list[tuple[str, str, bytes]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        tarball = docker_save_tarball(Path(tmp) / "i.tar", {}, [to_layer(x) for x in stack])
        manifest = import_image(tarball, store).manifest
        got: dict[str, bytes | None] = {}
        for e in manifest.entries:
            if e.type == "dir":
                got[e.path] = None
            else:
                chunks = store.get_many([bytes.fromhex(c) for c in e.chunks])
                got[e.path] = b"".join(c or b"" for c in chunks)
        assert got == model(stack)
