"""The flist format: a signed manifest of every path in an image plus the image config.

A `.flist` file (and the hub's copy of it) is canonical JSON of
`{"format", "manifest", "publisher", "signature"}`; the manifest's hash (blake2b-256 of its
canonical JSON) names the image and is what the publisher signs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zerostack.crypto import Domain, Identity, canonical_json, hash_obj, verify

FORMAT = "zerostack-flist/1"
CHUNK_SIZE = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
EntryType = Literal["file", "dir", "symlink", "hardlink"]


class FlistError(Exception):
    """An flist that is malformed, unsigned, wrongly signed, tampered or cannot be fetched."""


def check_path(path: str) -> str:
    """A manifest path: relative, '/'-separated, no empty, '.' or '..' component, no NUL."""
    if not path or path.startswith("/") or "\x00" in path:
        raise FlistError(f"invalid path {path!r} in manifest")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise FlistError(f"invalid path {path!r} in manifest")
    return path


class Entry(BaseModel):
    """One path of the image. `target` is a symlink's target or a hardlink's path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    type: EntryType
    mode: int = Field(ge=0, le=0o7777)
    uid: int = Field(default=0, ge=0)
    gid: int = Field(default=0, ge=0)
    size: int = Field(default=0, ge=0)
    mtime: int = Field(default=0, ge=0)
    target: str = ""
    chunks: tuple[str, ...] = ()

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        try:
            return check_path(v)
        except FlistError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("chunks")
    @classmethod
    def _chunks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            if not _HEX64.match(h):
                raise ValueError(f"chunk hash {h[:20]!r} is not 64 lowercase hex digits")
        return v

    def as_dict(self) -> dict[str, Any]:
        # Defaults are omitted so manifests stay small; parsing restores them.
        d: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode}
        for key in ("uid", "gid", "size", "mtime"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.target:
            d["target"] = self.target
        if self.chunks:
            d["chunks"] = list(self.chunks)
        return d


class ImageConfig(BaseModel):
    """How to run the image, as docker's config has it (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
        }


class Manifest(BaseModel):
    """Every path of an image (sorted, parents first) and its run config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    name: str = ""
    chunk_size: int = Field(default=CHUNK_SIZE, gt=0)
    config: ImageConfig = ImageConfig()
    entries: tuple[Entry, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "chunk_size": self.chunk_size,
            "config": self.config.as_dict(),
            "entries": [e.as_dict() for e in self.entries],
        }

    @cached_property
    def hash(self) -> bytes:
        # Cached: a manifest is frozen, and hashing a big one walks every entry.
        return hash_obj(self.as_dict())

    @property
    def hash_hex(self) -> str:
        return self.hash.hex()

    def chunk_hashes(self) -> list[str]:
        """Every distinct chunk the image needs, in first-use order."""
        seen: dict[str, None] = {}
        for e in self.entries:
            for h in e.chunks:
                seen.setdefault(h, None)
        return list(seen)

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries if e.type == "file")

    def check(self) -> None:
        """Structural soundness beyond field types, so materializing can never escape its dir."""
        types: dict[str, str] = {}
        previous = ""
        for e in self.entries:
            if e.path <= previous:
                raise FlistError(f"manifest entries not sorted or duplicated at {e.path!r}")
            previous = e.path
            parent = e.path.rpartition("/")[0]
            if parent and types.get(parent) != "dir":
                raise FlistError(f"{e.path!r}: parent {parent!r} is not a directory in the manifest")
            types[e.path] = e.type
            if e.type == "file":
                if e.target:
                    raise FlistError(f"{e.path!r}: a file has no target")
                expected = -(-e.size // self.chunk_size)
                if len(e.chunks) != expected:
                    raise FlistError(
                        f"{e.path!r}: {e.size} bytes need {expected} chunks, manifest lists {len(e.chunks)}"
                    )
            elif e.chunks or e.size:
                raise FlistError(f"{e.path!r}: only files have content")
            if e.type == "symlink" and (not e.target or "\x00" in e.target):
                raise FlistError(f"{e.path!r}: a symlink needs a target")
            if e.type == "dir" and e.target:
                raise FlistError(f"{e.path!r}: a directory has no target")
        for e in self.entries:
            if e.type == "hardlink":
                check_path(e.target)
                if types.get(e.target) != "file":
                    raise FlistError(f"{e.path!r}: hardlink target {e.target!r} is not a file")


@dataclass(frozen=True)
class SignedFlist:
    """A manifest with its publisher's signature over the manifest hash."""

    manifest: Manifest
    publisher: str
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, manifest: Manifest, identity: Identity) -> SignedFlist:
        manifest.check()
        return cls(manifest, identity.public_hex, identity.sign(Domain.FLIST_MANIFEST, manifest.hash))

    @property
    def hash_hex(self) -> str:
        return self.manifest.hash_hex

    def signature_ok(self) -> bool:
        return verify(Domain.FLIST_MANIFEST, self.publisher, self.manifest.hash, self.signature)

    def verify(self, allowed_publishers: set[str] | frozenset[str] | None = None) -> None:
        """Raise FlistError unless the signature is valid (and, if given, by an allowed key)."""
        if not self.signature_ok():
            raise FlistError(
                f"flist {self.hash_hex[:16]}: signature does not verify for publisher "
                f"{self.publisher[:16]} (manifest tampered or wrongly signed)"
            )
        if allowed_publishers is not None and self.publisher not in allowed_publishers:
            raise FlistError(
                f"flist {self.hash_hex[:16]}: publisher {self.publisher[:16]} is not among the "
                "publishers this deployment allows"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "manifest": self.manifest.as_dict(),
            "publisher": self.publisher,
            "signature": self.signature.hex(),
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedFlist:
        """Parse a `.flist`; checks structure, not the signature (call `verify`)."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise FlistError(f"not an flist: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise FlistError(f"not an flist (expected format {FORMAT!r})")
        if set(raw) != {"format", "manifest", "publisher", "signature"}:
            raise FlistError("an flist is exactly {format, manifest, publisher, signature}: unsigned?")
        try:
            manifest = Manifest.model_validate(raw["manifest"])
            signature = bytes.fromhex(raw["signature"])
            publisher = str(raw["publisher"])
        except (ValidationError, ValueError, TypeError) as exc:
            raise FlistError(f"malformed flist manifest: {exc}") from None
        manifest.check()
        return cls(manifest, publisher, signature)
