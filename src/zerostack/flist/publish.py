"""Publishing: copy an flist's missing chunks to a hub, then the signed manifest itself."""

from __future__ import annotations

from dataclasses import dataclass

from zerostack.flist.manifest import FlistError, SignedFlist
from zerostack.flist.store import ChunkStore, copy_missing


@dataclass
class PushResult:
    hash: str
    chunks_total: int
    chunks_sent: int
    bytes_sent: int


def push_flist(flist: SignedFlist, source: ChunkStore, hub: ChunkStore) -> PushResult:
    """Send what the hub lacks; the manifest goes last so a hub never names an image whose
    chunks it does not hold."""
    if not flist.signature_ok():
        raise FlistError("refusing to push an flist whose signature does not verify")
    keys = [bytes.fromhex(h) for h in flist.manifest.chunk_hashes()]
    sent, nbytes = copy_missing(keys, source, hub)
    hub.put_many([(flist.manifest.hash, flist.to_bytes())])
    return PushResult(flist.hash_hex, len(keys), sent, nbytes)
