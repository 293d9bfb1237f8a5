"""Publishing: copy an flist's missing chunks to a hub, then the signed manifest itself."""

from __future__ import annotations

from dataclasses import dataclass

from zerostack.flist.manifest import FlistError, SignedFlist
from zerostack.flist.store import ChunkStore, copy_missing


@dataclass
class PushResult:
    """What a push sent, and what the hub was found to hold once it was done."""

    hash: str
    chunks_total: int
    chunks_sent: int
    bytes_sent: int
    chunks_held: int = 0
    manifest_held: bool = False


def push_flist(flist: SignedFlist, source: ChunkStore, hub: ChunkStore) -> PushResult:
    """Send what the hub lacks; the manifest goes last so a hub never names an image whose
    chunks it does not hold. Then count what the hub holds: a push is only reported done
    when every chunk and the manifest can be found there."""
    if not flist.signature_ok():
        raise FlistError("refusing to push an flist whose signature does not verify")
    keys = [bytes.fromhex(h) for h in flist.manifest.chunk_hashes()]
    sent, nbytes = copy_missing(keys, source, hub)
    hub.put_many([(flist.manifest.hash, flist.to_bytes())])
    *present, manifest_held = hub.exists_many([*keys, flist.manifest.hash])
    result = PushResult(flist.hash_hex, len(keys), sent, nbytes, sum(present), manifest_held)
    if result.chunks_held != len(keys) or not manifest_held:
        raise FlistError(f"after the push the hub holds {result.chunks_held} of {len(keys)} "
                         f"chunks and {'the' if manifest_held else 'no'} manifest of "
                         f"{flist.hash_hex[:16]}")
    return result
