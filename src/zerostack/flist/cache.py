"""The node's image cache: fetch a signed flist from the hub, verify every byte, materialize it.

One directory per manifest hash (`images/<hash>/rootfs`), written under a temp name and
renamed into place only once every chunk matched its hash, without set-uid, set-gid or
device files (containers run with no new privileges, so the bits could only ever serve a
host user who reaches the cache), then sealed: the seal records
each path's inode, size, mode, owner, mtime and ctime, so `check` can confirm before every
container start that nothing was changed since, without re-hashing the content.
The cache's own directories are 0700: images are tenant data, and no other host user may
read them or run what is inside.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson

from zerostack.flist.manifest import Entry, FlistError, Manifest, SignedFlist
from zerostack.flist.store import ChunkStore

FETCH_BATCH_BYTES = 16 * 1024 * 1024
FETCH_BATCH_KEYS = 128
WRITERS = 4
SETID_BITS = stat.S_ISUID | stat.S_ISGID
_SEAL_VERSION = 1
_PRIVATE_DIR = 0o700


def _check_hash(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32 or raw.hex() != text:
        raise FlistError(f"{text[:70]!r} is not an flist hash (64 lowercase hex digits)")
    return raw


@dataclass(frozen=True)
class CachedImage:
    """A verified, sealed image on this node; `rootfs` is read-only by convention."""

    hash: str
    rootfs: Path
    flist: SignedFlist

    @property
    def manifest(self) -> Manifest:
        return self.flist.manifest

    @property
    def cache_root(self) -> Path:
        """The ImageCache root this image belongs to (`<root>/images/<hash>/rootfs`)."""
        return self.rootfs.parent.parent.parent


@dataclass
class FetchStats:
    chunks_fetched: int = 0
    chunks_local: int = 0
    bytes_fetched: int = 0


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
            st.st_ctime_ns, st.st_nlink]


def fetch_flist(hub: ChunkStore, manifest_hash: str,
                allowed_publishers: Iterable[str] | None) -> SignedFlist:
    """Get a signed flist from the hub and check its hash and its publisher's signature."""
    key = _check_hash(manifest_hash)
    raw = hub.get_many([key])[0]
    if raw is None:
        raise FlistError(f"flist {manifest_hash[:16]} is not on the hub")
    flist = SignedFlist.from_bytes(raw)
    if flist.hash_hex != manifest_hash:
        raise FlistError(f"flist {manifest_hash[:16]} from the hub hashes to "
                         f"{flist.hash_hex[:16]}: the manifest was tampered with")
    flist.verify(None if allowed_publishers is None else frozenset(allowed_publishers))
    return flist


class ImageCache:
    """Verified images materialized under `root`, shared by every container on the node."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.locks = root / "locks"

    def image_dir(self, manifest_hash: str) -> Path:
        _check_hash(manifest_hash)
        return self.images / manifest_hash

    def make_private(self) -> None:
        """Create the cache's directories 0700, and close those an older version left open
        (the root, `images/`, `locks/` and each image's directory; the images' own
        sealed modes are kept, unreachable behind them)."""
        for d in (self.root, self.images, self.locks):
            _private_dir(d)
        for entry in os.scandir(self.images):
            if entry.is_dir(follow_symlinks=False):
                _private_dir(Path(entry.path))
                for name in ("flist", "seal.json"):
                    path = Path(entry.path) / name
                    if path.is_file() and not path.is_symlink():
                        os.chmod(path, 0o600)

    @contextlib.contextmanager
    def _lock(self, manifest_hash: str) -> Iterator[None]:
        _private_dir(self.root)
        _private_dir(self.locks)
        fd = os.open(self.locks / f"{manifest_hash}.lock",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def fetch(self, hub: ChunkStore, manifest_hash: str,
              allowed_publishers: Iterable[str] | None,
              stats: FetchStats | None = None) -> CachedImage:
        """The image `manifest_hash`, fetched and verified unless already cached and intact.

        `allowed_publishers` are the public keys (hex) whose signature the deployment
        accepts (None accepts any valid signature). Raises FlistError on any mismatch;
        nothing is left behind in that case.
        """
        allowed = None if allowed_publishers is None else frozenset(allowed_publishers)
        with self._lock(manifest_hash):
            target = self.image_dir(manifest_hash)
            if target.exists():
                image = self._load(manifest_hash)
                image.flist.verify(allowed)
                try:
                    self._check_seal(image)
                    return image
                except FlistError:
                    self._discard(target)  # altered behind our back: fetch it again
            flist = fetch_flist(hub, manifest_hash, allowed)
            _private_dir(self.images)
            for stale in self.images.glob(f".tmp-{manifest_hash}-*"):
                self._discard(stale)
            tmp = self.images / f".tmp-{manifest_hash}-{os.getpid()}-{threading.get_ident()}"
            try:
                tmp.mkdir(mode=0o700)
                rootfs = tmp / "rootfs"
                self._materialize(hub, flist.manifest, rootfs, stats or FetchStats())
                seal = {"version": _SEAL_VERSION, "hash": manifest_hash,
                        "root": _stamp(os.lstat(rootfs)),
                        "paths": [_stamp(os.lstat(f"{rootfs}/{e.path}"))
                                  for e in flist.manifest.entries]}
                for name, body in (("flist", flist.to_bytes()), ("seal.json", orjson.dumps(seal))):
                    fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(body)
                os.rename(tmp, target)
            except BaseException:
                self._discard(tmp)
                raise
            return CachedImage(manifest_hash, target / "rootfs", flist)

    def _load(self, manifest_hash: str) -> CachedImage:
        d = self.image_dir(manifest_hash)
        try:
            flist = SignedFlist.from_bytes((d / "flist").read_bytes())
        except OSError as exc:
            raise FlistError(f"image {manifest_hash[:16]} is not in the cache: {exc}") from None
        if flist.hash_hex != manifest_hash:
            raise FlistError(f"cached image {manifest_hash[:16]}: its manifest was altered")
        return CachedImage(manifest_hash, d / "rootfs", flist)

    def get(self, manifest_hash: str) -> CachedImage:
        """A cached image, checked against its seal (FlistError if absent or altered)."""
        image = self._load(manifest_hash)
        self._check_seal(image)
        return image

    def check(self, manifest_hash: str) -> None:
        """Confirm the cached image still matches its manifest; FlistError if not."""
        self.get(manifest_hash)

    def _check_seal(self, image: CachedImage) -> None:
        # Writing, chmod, chown, utime or replacing a file all move its ctime (or inode),
        # which userspace cannot set back; adding or removing a path moves its parent's.
        d = image.rootfs.parent
        try:
            seal = orjson.loads((d / "seal.json").read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise FlistError(f"cached image {image.hash[:16]} has no valid seal: {exc}") from None
        entries = image.manifest.entries
        if seal.get("hash") != image.hash or len(seal.get("paths", ())) != len(entries):
            raise FlistError(f"cached image {image.hash[:16]}: seal does not match the manifest")
        try:
            if _stamp(os.lstat(image.rootfs)) != seal["root"]:
                raise FlistError(f"cached image {image.hash[:16]}: the root directory changed")
            base = f"{image.rootfs}/"
            for e, stamp in zip(entries, seal["paths"], strict=True):
                st = os.lstat(base + e.path)
                if _stamp(st) != stamp or (e.type == "file" and st.st_size != e.size):
                    raise FlistError(f"cached image {image.hash[:16]}: {e.path} was modified")
                if e.type == "file" and st.st_mode & SETID_BITS:
                    # Cached before set-id bits were dropped: fetch it again.
                    raise FlistError(f"cached image {image.hash[:16]}: {e.path} is set-id")
        except FileNotFoundError as exc:
            raise FlistError(f"cached image {image.hash[:16]}: {exc.filename} is missing") from None

    def remove(self, manifest_hash: str) -> None:
        with self._lock(manifest_hash):
            self._discard(self.image_dir(manifest_hash))

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove every cached image not in `keep` (the ones containers still use), and
        temp dirs left by a crash; returns the hashes removed."""
        keep = set(keep)
        removed = [h for h in self.list() if h not in keep]
        for h in removed:
            self.remove(h)
        if self.images.exists():
            for p in self.images.iterdir():
                if p.name.startswith(".trash-"):
                    shutil.rmtree(p, ignore_errors=True)
        return removed

    def list(self) -> list[str]:
        if not self.images.exists():
            return []
        return sorted(p.name for p in self.images.iterdir() if not p.name.startswith("."))

    @staticmethod
    def _discard(path: Path) -> None:
        if path.exists():
            trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _local_chunks(self, exclude: str) -> dict[str, tuple[str, int, int]]:
        """Chunks already on this node inside other sealed images: hash -> (file, offset, len)."""
        out: dict[str, tuple[str, int, int]] = {}
        for h in self.list():
            if h == exclude:
                continue
            try:
                image = self._load(h)
            except FlistError:
                continue
            cs = image.manifest.chunk_size
            for e in image.manifest.entries:
                for i, c in enumerate(e.chunks):
                    n = min(cs, e.size - i * cs)
                    out.setdefault(c, (f"{image.rootfs}/{e.path}", i * cs, n))
        return out

    def _materialize(self, hub: ChunkStore, manifest: Manifest, rootfs: Path,
                     stats: FetchStats) -> None:
        rootfs.mkdir(mode=0o755)
        base = str(rootfs) + "/"  # plain strings: pathlib costs more than the syscalls here
        local = self._local_chunks(manifest.hash_hex)
        # Chunks to fetch from the hub, in the order files are written, and how many
        # times each is used (the prefetcher keeps a chunk until its last use).
        remote: list[tuple[str, int]] = []
        uses: dict[str, int] = {}
        cs = manifest.chunk_size
        for e in manifest.entries:
            for i, c in enumerate(e.chunks):
                if c in local:
                    continue
                if c not in uses:
                    remote.append((c, min(cs, e.size - i * cs)))
                    uses[c] = 0
                uses[c] += 1
        for e in manifest.entries:
            path = base + e.path
            if e.type == "dir":
                os.mkdir(path, 0o700)
            elif e.type == "symlink":
                os.symlink(e.target, path)
                os.lchown(path, e.uid, e.gid)
                os.utime(path, ns=(e.mtime * 10**9, e.mtime * 10**9), follow_symlinks=False)
        fetched = _Prefetcher(hub, remote, uses)
        lock = threading.Lock()
        # File creation is syscall-bound: a few writer threads overlap it (and the hashing,
        # which releases the GIL) while the prefetcher keeps the hub busy.
        try:
            with ThreadPoolExecutor(WRITERS, thread_name_prefix="flist-write") as pool:
                futures = [pool.submit(self._write_file, base, e, fetched, local, stats, lock)
                           for e in manifest.entries if e.type == "file"]
                for fut in futures:
                    if fut.exception() is not None:
                        fetched.fail(fut.exception())  # unblock and stop the other writers
                        for other in futures:
                            other.cancel()
                        raise fut.exception()  # type: ignore[misc]
            for e in manifest.entries:
                if e.type == "hardlink":
                    os.link(base + e.target, base + e.path)
        finally:
            fetched.close()
        stats.chunks_fetched += len(remote)
        stats.bytes_fetched += sum(n for _, n in remote)
        # Directories last, once nothing more is created inside them.
        for e in reversed(manifest.entries):
            if e.type == "dir":
                path = base + e.path
                os.lchown(path, e.uid, e.gid)
                os.chmod(path, e.mode & ~stat.S_ISUID)  # set-gid on a directory only inherits
                os.utime(path, ns=(e.mtime * 10**9, e.mtime * 10**9))

    @staticmethod
    def _write_file(base: str, e: Entry, fetched: _Prefetcher,
                    local: dict[str, tuple[str, int, int]], stats: FetchStats,
                    lock: threading.Lock) -> None:
        path = base + e.path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            offset = local_chunks = 0
            for c in e.chunks:
                data: bytes | None = None
                where = local.get(c)
                if where is not None:
                    data = _read_at(*where)
                    if data is None or hashlib.blake2b(data, digest_size=32).hexdigest() != c:
                        raise FlistError(f"chunk {c[:16]} changed in the local cache")
                    local_chunks += 1
                else:
                    data = fetched.take(c)
                    if hashlib.blake2b(data, digest_size=32).hexdigest() != c:
                        raise FlistError(f"chunk {c[:16]} of {e.path} does not match its hash "
                                         "(tampered or corrupt on the hub): image refused")
                os.write(fd, data)
                offset += len(data)
            if offset != e.size:
                raise FlistError(f"{e.path}: chunks hold {offset} bytes, manifest says {e.size}")
            # Owner before mode: chown clears set-id bits. The cache keeps none.
            os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode & ~SETID_BITS)
            os.utime(fd, ns=(e.mtime * 10**9, e.mtime * 10**9))
        finally:
            os.close(fd)
        with lock:
            stats.chunks_local += local_chunks


def _private_dir(path: Path) -> None:
    """`path` as a directory only its owner can enter (created so, or made so)."""
    path.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != _PRIVATE_DIR:
        os.chmod(path, _PRIVATE_DIR)


def _read_at(path: str, offset: int, length: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError:
        return None
    return data if len(data) == length else None


class _Prefetcher:
    """Fetches hub chunks in a thread, a batch or two ahead of the writers, in write order."""

    def __init__(self, hub: ChunkStore, keys: Sequence[tuple[str, int]],
                 uses: dict[str, int]) -> None:
        self.hub = hub
        self.keys = list(keys)
        self.uses = dict(uses)
        self.ready: queue.Queue[tuple[list[str], list[bytes | None]] | BaseException | None] = (
            queue.Queue(2))
        self.buffer: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.done = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if self.keys:
            self.thread.start()

    def _run(self) -> None:
        try:
            batch: list[str] = []
            size = 0
            for n, (key, length) in enumerate(self.keys):
                batch.append(key)
                size += length
                last = n == len(self.keys) - 1
                if last or size >= FETCH_BATCH_BYTES or len(batch) >= FETCH_BATCH_KEYS:
                    if self.stop.is_set():
                        return
                    values = self.hub.get_many([bytes.fromhex(k) for k in batch])
                    self._put((batch, values))
                    batch, size = [], 0
            self._put(None)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: tuple[list[str], list[bytes | None]] | BaseException | None) -> None:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def fail(self, exc: BaseException | None) -> None:
        """Make every later `take` raise (a writer failed: the image is refused)."""
        self.error = self.error or exc or FlistError("image refused")
        self.stop.set()

    def take(self, key: str) -> bytes:
        with self.lock:
            while key not in self.buffer:
                if self.error is not None:
                    raise self.error if isinstance(self.error, FlistError) else FlistError(
                        f"hub fetch failed: {self.error}")
                if self.done:
                    raise FlistError(f"chunk {key[:16]} was never fetched")
                try:
                    item = self.ready.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    self.done = True
                    continue
                if isinstance(item, BaseException):
                    self.error = item
                    continue
                for k, v in zip(*item, strict=True):
                    if v is None:
                        self.error = FlistError(f"chunk {k[:16]} is missing from the hub: "
                                                "image refused")
                        break
                    self.buffer[k] = v
            self.uses[key] -= 1
            # A chunk several files share stays until its last use.
            return self.buffer.pop(key) if self.uses[key] <= 0 else self.buffer[key]

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
