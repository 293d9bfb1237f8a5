"""Import docker images: a `docker save` tarball or an OCI image layout (tar or directory).

Layers are applied in order onto an in-memory tree (whiteouts `.wh.NAME` delete a path,
`.wh..wh..opq` empties a directory of what lower layers put there); nothing is extracted
to disk, so a hostile layer cannot write outside the image. File content is read straight
from the layer tars when the tree is chunked.
"""

from __future__ import annotations

import contextlib
import gzip
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from zerostack.flist.build import SourceEntry, assemble
from zerostack.flist.manifest import EntryType, FlistError, ImageConfig, Manifest
from zerostack.flist.store import ChunkStore

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


def _norm(name: str) -> str:
    """A tar member name as a manifest path ('' for the root)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FlistError(f"layer member {name!r} climbs out of the image")
    return "/".join(parts)


class _Source:
    """Files of an image archive: a tar (random access) or a directory."""

    def __init__(self, path: Path, stack: contextlib.ExitStack) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self.tar = stack.enter_context(tarfile.open(path, "r:"))  # noqa: SIM115
            except tarfile.TarError as exc:
                raise FlistError(f"{path}: not an image tarball ({exc})") from None
            for m in self.tar.getmembers():
                self.members[_norm(m.name)] = m
        elif not path.is_dir():
            raise FlistError(f"{path}: no such image tarball or directory")

    def has(self, name: str) -> bool:
        return _norm(name) in self.members if self.tar else (self.path / name).is_file()

    def open(self, name: str) -> IO[bytes]:
        if self.tar is None:
            try:
                return open(self.path / _norm(name), "rb")
            except OSError as exc:
                raise FlistError(f"{self.path}: cannot read {name}: {exc}") from None
        member = self.members.get(_norm(name))
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise FlistError(f"{self.path}: {name} is missing from the image")
        return f

    def read_json(self, name: str) -> Any:
        with self.open(name) as f:
            try:
                return orjson.loads(f.read())
            except orjson.JSONDecodeError as exc:
                raise FlistError(f"{self.path}: {name} is not JSON: {exc}") from None


def _blob(digest: str) -> str:
    alg, _, hexpart = str(digest).partition(":")
    if not alg or not hexpart or "/" in hexpart or ".." in hexpart:
        raise FlistError(f"invalid blob digest {digest!r}")
    return f"blobs/{alg}/{hexpart}"


def _oci_manifest(src: _Source, desc: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = src.read_json(_blob(desc["digest"]))
    media = doc.get("mediaType") or desc.get("mediaType", "")
    if media in _INDEX_TYPES or "manifests" in doc:
        entries = doc.get("manifests") or []
        if not entries:
            raise FlistError("OCI index lists no manifests")
        chosen = next((m for m in entries
                       if (m.get("platform") or {}).get("os", "linux") == "linux"
                       and (m.get("platform") or {}).get("architecture", "amd64") == "amd64"),
                      entries[0])
        return _oci_manifest(src, chosen)
    return doc


@dataclass
class _Node:
    entry: SourceEntry
    # For a hardlink: the node it pointed to when its layer was applied, so the link can
    # become a plain copy if a later layer removes or replaces that target.
    link_to: _Node | None = None
    children: set[str] = field(default_factory=set)


class _Tree:
    """The image's file tree while layers are applied."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.root_children: set[str] = set()

    def _kids(self, path: str) -> set[str]:
        return self.root_children if path == "" else self.nodes[path].children

    def remove(self, path: str) -> None:
        node = self.nodes.pop(path, None)
        if node is None:
            return
        for child in list(node.children):
            self.remove(child)
        parent = posixpath.dirname(path)
        if parent == "" or parent in self.nodes:
            self._kids(parent).discard(path)

    def clear_dir(self, path: str) -> None:
        if path == "" or (path in self.nodes and self.nodes[path].entry.type == "dir"):
            for child in list(self._kids(path)):
                self.remove(child)

    def resolve_dir(self, path: str, depth: int = 0) -> str:
        """`path` with symlinked directories resolved inside the image; creates missing
        parents as 0755 directories, like container runtimes do when applying layers."""
        if path == "":
            return ""
        if depth > 40:
            raise FlistError(f"too many levels of symbolic links at {path!r}")
        parent = self.resolve_dir(posixpath.dirname(path), depth + 1)
        path = posixpath.join(parent, posixpath.basename(path)) if parent else posixpath.basename(path)
        node = self.nodes.get(path)
        if node is None:
            self.add(SourceEntry(path=path, type="dir", mode=0o755))
            return path
        if node.entry.type == "symlink":
            target = node.entry.target
            joined = target if target.startswith("/") else posixpath.join(posixpath.dirname(path), target)
            return self.resolve_dir(_norm(posixpath.normpath("/" + joined)), depth + 1)
        if node.entry.type != "dir":
            raise FlistError(f"layer puts a path under {path!r}, which is not a directory")
        return path

    def add(self, entry: SourceEntry, link_to: _Node | None = None) -> None:
        old = self.nodes.get(entry.path)
        if old is not None:
            if old.entry.type == "dir" and entry.type == "dir":
                old.entry = entry  # a directory seen again keeps its children
                return
            self.remove(entry.path)
        self.nodes[entry.path] = _Node(entry, link_to)
        self._kids(posixpath.dirname(entry.path)).add(entry.path)

    def sources(self) -> list[SourceEntry]:
        out: list[SourceEntry] = []
        for node in self.nodes.values():
            e = node.entry
            if e.type == "hardlink":
                target = self.nodes.get(e.target)
                if target is None or target is not node.link_to or target.entry.type != "file":
                    # The link outlived its target: keep the content as a plain file.
                    src = node.link_to.entry if node.link_to else None
                    if src is None or src.open is None:
                        raise FlistError(f"{e.path}: hardlink to {e.target!r}, which has no content")
                    e = SourceEntry(path=e.path, type="file", mode=src.mode, uid=src.uid,
                                    gid=src.gid, mtime=src.mtime, open=src.open)
            out.append(e)
        return out


def _member_opener(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        f = tar.extractfile(member)
        if f is None:
            raise FlistError(f"cannot read {member.name} from its layer")
        return f
    return opener


def _entry(m: tarfile.TarInfo, path: str, kind: EntryType, target: str = "",
           opener: Callable[[], IO[bytes]] | None = None) -> SourceEntry:
    return SourceEntry(path=path, type=kind, mode=m.mode, uid=m.uid, gid=m.gid,
                       mtime=int(m.mtime), target=target, open=opener)


def _apply_layer(tree: _Tree, tar: tarfile.TarFile, skipped: list[str]) -> None:
    members = tar.getmembers()
    # Whiteouts hide what lower layers hold, never this layer's own files, so they all
    # go first whatever their position in the tar.
    for m in members:
        path = _norm(m.name)
        base = posixpath.basename(path)
        if not base.startswith(WHITEOUT):
            continue
        parent = posixpath.dirname(path)
        if base == OPAQUE:
            tree.clear_dir(parent)
        else:
            tree.remove(posixpath.join(parent, base[len(WHITEOUT):]) if parent else base[len(WHITEOUT):])
    for m in members:
        path = _norm(m.name)
        if path == "" or posixpath.basename(path).startswith(WHITEOUT):
            continue
        parent = tree.resolve_dir(posixpath.dirname(path))
        path = posixpath.join(parent, posixpath.basename(path)) if parent else posixpath.basename(path)
        if m.isdir():
            tree.add(_entry(m, path, "dir"))
        elif m.issym():
            tree.add(_entry(m, path, "symlink", target=m.linkname))
        elif m.islnk():
            target = _norm(m.linkname)
            node = tree.nodes.get(target)
            if node is None or node.entry.type not in ("file", "hardlink"):
                raise FlistError(f"layer hardlink {path!r} -> {target!r}: no such file")
            if node.entry.type == "hardlink":  # chain: point at the real file
                node = node.link_to or node
                target = node.entry.path
            tree.add(_entry(m, path, "hardlink", target=target), link_to=node)
        elif m.isreg():
            tree.add(_entry(m, path, "file", opener=_member_opener(tar, m)))
        else:
            skipped.append(path)


def _image_config(raw: Any) -> ImageConfig:
    cfg = (raw or {}).get("config") or {}

    def strings(key: str) -> tuple[str, ...]:
        v = cfg.get(key) or []
        return tuple(str(x) for x in (v if isinstance(v, list) else [v]))

    return ImageConfig(entrypoint=strings("Entrypoint"), cmd=strings("Cmd"), env=strings("Env"),
                       working_dir=str(cfg.get("WorkingDir") or ""), user=str(cfg.get("User") or ""))


def _open_layer(src: _Source, name: str, stack: contextlib.ExitStack, tmp: Path) -> tarfile.TarFile:
    f = stack.enter_context(src.open(name))
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        # Compressed layers are unpacked once to a temp file: random access into gzip
        # would re-decompress from the start for every file.
        plain = tmp / f"layer-{len(list(tmp.iterdir()))}.tar"
        with gzip.GzipFile(fileobj=f) as gz, open(plain, "wb") as out:
            shutil.copyfileobj(gz, out, 1024 * 1024)
        f = stack.enter_context(open(plain, "rb"))  # noqa: SIM115
    elif magic == b"\x28\xb5\x2f\xfd":
        raise FlistError(f"layer {name} is zstd-compressed, which is not supported; "
                         "re-save the image with gzip or uncompressed layers")
    try:
        return stack.enter_context(tarfile.open(fileobj=f, mode="r:"))
    except tarfile.TarError as exc:
        raise FlistError(f"layer {name} is not a tar: {exc}") from None


@dataclass
class ImportResult:
    manifest: Manifest
    skipped: list[str]
    layers: int


def import_image(path: Path, store: ChunkStore, name: str = "") -> ImportResult:
    """Import a `docker save` tarball or an OCI layout (tar or dir) into `store`."""
    with contextlib.ExitStack() as stack:
        src = _Source(path, stack)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zs-import-")))
        if src.has("manifest.json"):
            docs = src.read_json("manifest.json")
            if not isinstance(docs, list) or not docs:
                raise FlistError(f"{path}: manifest.json lists no image")
            doc = docs[0]
            layer_names = [str(x) for x in doc.get("Layers") or []]
            config = src.read_json(str(doc.get("Config")))
            tags = doc.get("RepoTags") or []
            name = name or (str(tags[0]) if tags else "")
        elif src.has("index.json"):
            index = src.read_json("index.json")
            descs = index.get("manifests") or []
            if not descs:
                raise FlistError(f"{path}: index.json lists no manifest")
            desc = descs[0]
            name = name or str((desc.get("annotations") or {}).get(
                "org.opencontainers.image.ref.name", ""))
            manifest_doc = _oci_manifest(src, desc)
            layer_names = [_blob(layer["digest"]) for layer in manifest_doc.get("layers") or []]
            config = src.read_json(_blob(manifest_doc["config"]["digest"]))
        else:
            raise FlistError(f"{path}: neither a docker save tarball (manifest.json) nor an "
                             "OCI image layout (index.json)")
        tree = _Tree()
        skipped: list[str] = []
        for layer in layer_names:
            _apply_layer(tree, _open_layer(src, layer, stack, tmp), skipped)
        manifest = assemble(tree.sources(), store, _image_config(config), name)
        return ImportResult(manifest, skipped, len(layer_names))
