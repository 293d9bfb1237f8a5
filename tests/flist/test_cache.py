"""Build → push to a real hub → fetch, verify and materialize; tampering is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest
import redis

from tests.conftest import ProcessGroup
from tests.flist.hub import start_hub
from tests.flist.image import busybox_rootfs
from zerostack.crypto import Domain, Identity
from zerostack.flist import (
    FetchStats,
    FlistError,
    Hub,
    ImageCache,
    ImageConfig,
    LocalStore,
    SignedFlist,
    build_dir,
    push_flist,
)


@pytest.fixture
def hub(procs: ProcessGroup, tmp_path: Path) -> str:
    return start_hub(procs, tmp_path)


def _image(tmp_path: Path) -> Path:
    root = busybox_rootfs(tmp_path / "src")
    (root / "etc" / "big").write_bytes(os.urandom(2 * 1024 * 1024 + 17))
    (root / "etc" / "big-copy").write_bytes((root / "etc" / "big").read_bytes())
    os.link(root / "etc" / "passwd", root / "etc" / "passwd.hard")
    (root / "etc" / "suid").write_bytes(b"x")
    (root / "etc" / "suid").chmod(0o4755)
    os.chown(root / "etc" / "group", 1000, 1000)
    os.mkfifo(root / "tmp" / "fifo")
    return root


def _publish(tmp_path: Path, hub: str, ident: Identity) -> tuple[SignedFlist, Path]:
    root = _image(tmp_path)
    store = LocalStore(tmp_path / "store")
    manifest, skipped = build_dir(root, store, ImageConfig(entrypoint=("/bin/sh",)), "bb")
    assert skipped == ["tmp/fifo"]
    flist = SignedFlist.sign(manifest, ident)
    with Hub(hub) as h:
        first = push_flist(flist, store, h)
        again = push_flist(flist, store, h)
    # big and big-copy share their chunks: stored once; a second push sends nothing.
    assert first.chunks_sent == first.chunks_total == len(manifest.chunk_hashes())
    assert again.chunks_sent == 0
    return flist, root


def _same_tree(a: Path, b: Path) -> None:
    for dirpath, dirs, files in os.walk(a):
        for name in dirs + files:
            pa = Path(dirpath) / name
            pb = b / pa.relative_to(a)
            sa = os.lstat(pa)
            if stat.S_ISFIFO(sa.st_mode):
                assert not pb.exists()
                continue
            sb = os.lstat(pb)
            # The cache keeps every mode bit but set-uid and set-gid on files.
            want = sa.st_mode & ~(stat.S_ISUID | stat.S_ISGID) if stat.S_ISREG(sa.st_mode) else (
                sa.st_mode)
            assert (want, sa.st_uid, sa.st_gid) == (sb.st_mode, sb.st_uid, sb.st_gid), pa
            if stat.S_ISLNK(sa.st_mode):
                assert os.readlink(pa) == os.readlink(pb)
            elif stat.S_ISREG(sa.st_mode):
                assert pa.read_bytes() == pb.read_bytes(), pa
                assert int(sa.st_mtime) == int(sb.st_mtime)


def test_fetch_materializes_an_identical_sealed_tree(tmp_path: Path, hub: str) -> None:
    ident = Identity.generate()
    flist, root = _publish(tmp_path, hub, ident)
    cache = ImageCache(tmp_path / "cache")
    stats = FetchStats()
    with Hub(hub) as h:
        image = cache.fetch(h, flist.hash_hex, [ident.public_hex], stats)
    _same_tree(root, image.rootfs)
    hard = image.rootfs / "etc" / "passwd.hard"
    assert os.stat(hard).st_ino == os.stat(image.rootfs / "etc" / "passwd").st_ino
    # big-copy's 3 chunks are big's: each distinct chunk comes from the hub once.
    assert stats.chunks_fetched == len(flist.manifest.chunk_hashes()) < sum(
        len(e.chunks) for e in flist.manifest.entries)
    assert stats.chunks_local == 0
    assert cache.list() == [flist.hash_hex]
    cache.check(flist.hash_hex)

    # Any change behind the cache's back breaks the seal; the next fetch repairs it.
    (image.rootfs / "etc" / "passwd").write_text("root::0:0::/:/bin/sh\n")
    with pytest.raises(FlistError, match="etc/passwd was modified"):
        cache.check(flist.hash_hex)
    with Hub(hub) as h:
        again = cache.fetch(h, flist.hash_hex, [ident.public_hex])
    _same_tree(root, again.rootfs)
    # Another image sharing content takes those chunks from the cache, not the hub.
    root2 = tmp_path / "src2"
    root2.mkdir()
    (root2 / "big").write_bytes((root / "etc" / "big").read_bytes())
    (root2 / "new").write_bytes(b"new content")
    manifest2, _ = build_dir(root2, LocalStore(tmp_path / "store"), ImageConfig())
    flist2 = SignedFlist.sign(manifest2, ident)
    stats2 = FetchStats()
    with Hub(hub) as h:
        push_flist(flist2, LocalStore(tmp_path / "store"), h)
        image2 = cache.fetch(h, flist2.hash_hex, [ident.public_hex], stats2)
    assert (stats2.chunks_local, stats2.chunks_fetched) == (3, 1)
    assert (image2.rootfs / "big").read_bytes() == (root / "etc" / "big").read_bytes()
    (again.rootfs / "etc" / "new-file").write_text("x")
    with pytest.raises(FlistError, match="etc was modified"):
        cache.check(flist.hash_hex)


def test_tampered_chunk_is_refused_and_nothing_is_cached(tmp_path: Path, hub: str) -> None:
    ident = Identity.generate()
    flist, _ = _publish(tmp_path, hub, ident)
    busybox = next(e for e in flist.manifest.entries if e.path == "bin/busybox")
    host, port = hub.split(":")
    r = redis.Redis(host=host, port=int(port))
    r.set(bytes.fromhex(busybox.chunks[1]), b"\x00" * 1024 * 1024)
    cache = ImageCache(tmp_path / "cache")
    with Hub(hub) as h, pytest.raises(FlistError, match="bin/busybox does not match its hash"):
        cache.fetch(h, flist.hash_hex, [ident.public_hex])
    assert cache.list() == []
    assert [p.name for p in cache.images.iterdir()] == []


def test_tampered_unsigned_and_foreign_manifests_are_refused(tmp_path: Path, hub: str) -> None:
    ident = Identity.generate()
    flist, _ = _publish(tmp_path, hub, ident)
    host, port = hub.split(":")
    r = redis.Redis(host=host, port=int(port))
    key = bytes.fromhex(flist.hash_hex)
    cache = ImageCache(tmp_path / "cache")
    good = flist.to_bytes()

    with Hub(hub) as h:
        with pytest.raises(FlistError, match="not among the publishers"):
            cache.fetch(h, flist.hash_hex, [Identity.generate().public_hex])

        doc = orjson.loads(good)
        doc["manifest"]["config"]["entrypoint"] = ["/bin/evil"]
        r.set(key, orjson.dumps(doc))
        with pytest.raises(FlistError, match="tampered"):
            cache.fetch(h, flist.hash_hex, [ident.public_hex])

        doc = orjson.loads(good)
        del doc["signature"]
        r.set(key, orjson.dumps(doc))
        with pytest.raises(FlistError, match="unsigned"):
            cache.fetch(h, flist.hash_hex, [ident.public_hex])

        other = Identity.generate()
        doc = orjson.loads(good)
        doc["signature"] = other.sign(Domain.FLIST_MANIFEST, flist.manifest.hash).hex()
        r.set(key, orjson.dumps(doc))
        with pytest.raises(FlistError, match="signature does not verify"):
            cache.fetch(h, flist.hash_hex, [ident.public_hex])
    assert cache.list() == []

    r.set(key, good)
    with Hub(hub) as h:
        assert cache.fetch(h, flist.hash_hex, [ident.public_hex]).hash == flist.hash_hex


def test_cache_keeps_no_set_id_file_and_refetches_one_sealed_with_it(
        tmp_path: Path, hub: str) -> None:
    ident = Identity.generate()
    flist, _ = _publish(tmp_path, hub, ident)
    assert next(e for e in flist.manifest.entries if e.path == "etc/suid").mode == 0o4755
    cache = ImageCache(tmp_path / "cache")
    with Hub(hub) as h:
        image = cache.fetch(h, flist.hash_hex, [ident.public_hex])
    suid = image.rootfs / "etc" / "suid"
    assert stat.S_IMODE(suid.stat().st_mode) == 0o755
    # A cache materialized by an older node kept the bit under a valid seal: refused, and
    # the next fetch materializes it again without the bit.
    suid.chmod(0o4755)
    seal_path = image.rootfs.parent / "seal.json"
    seal = orjson.loads(seal_path.read_bytes())
    index = [e.path for e in flist.manifest.entries].index("etc/suid")
    seal["paths"][index] = [*seal["paths"][index][:2], suid.lstat().st_mode,
                            *seal["paths"][index][3:6], suid.lstat().st_ctime_ns,
                            seal["paths"][index][7]]
    seal_path.write_bytes(orjson.dumps(seal))
    with pytest.raises(FlistError, match="etc/suid is set-id"):
        cache.check(flist.hash_hex)
    with Hub(hub) as h:
        again = cache.fetch(h, flist.hash_hex, [ident.public_hex])
    assert stat.S_IMODE((again.rootfs / "etc" / "suid").stat().st_mode) == 0o755
    cache.check(flist.hash_hex)
