"""Container images (flists): signed manifests whose file content lives in chunks on a hub.

Build from a directory or import a docker/OCI image, push chunks to a Zero-DB hub, and on a
node fetch, verify and materialize the image into a sealed, read-only cache.
"""

from zerostack.flist.build import build_dir, scan_dir
from zerostack.flist.cache import CachedImage, FetchStats, ImageCache, fetch_flist
from zerostack.flist.importer import ImportResult, import_image
from zerostack.flist.manifest import (
    CHUNK_SIZE,
    Entry,
    FlistError,
    ImageConfig,
    Manifest,
    SignedFlist,
)
from zerostack.flist.publish import PushResult, push_flist
from zerostack.flist.store import ChunkStore, Hub, HubAddress, LocalStore, copy_missing

__all__ = [
    "CHUNK_SIZE",
    "CachedImage",
    "ChunkStore",
    "Entry",
    "FetchStats",
    "FlistError",
    "Hub",
    "HubAddress",
    "ImageCache",
    "ImageConfig",
    "ImportResult",
    "LocalStore",
    "Manifest",
    "PushResult",
    "SignedFlist",
    "build_dir",
    "copy_missing",
    "fetch_flist",
    "import_image",
    "push_flist",
    "scan_dir",
]
