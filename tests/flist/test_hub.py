"""The hub client against a real Zero-DB with a password-protected private namespace:
what it writes and reads lands in that namespace (checked with redis-cli), never in
`default`; a wrong password is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup, require_tool, zerostack_cmd
from tests.flist.hub import start_hub
from tests.flist.image import busybox_rootfs
from zerostack.crypto import Identity, save_identity
from zerostack.flist import (
    FlistError,
    Hub,
    ImageCache,
    ImageConfig,
    LocalStore,
    SignedFlist,
    build_dir,
    push_flist,
)

ADMIN = "admin-pw"
SECRET = "s3cret-pw"


def redis_cli(hub: str, *lines: str) -> list[str]:
    """Send `lines` to the hub through redis-cli on one connection; one reply a line."""
    host, port = hub.split(":")
    out = subprocess.run([require_tool("redis-cli"), "-h", host, "-p", port],
                         input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout.splitlines()


def quoted(key: bytes) -> str:
    """A binary key as redis-cli reads it: a double-quoted string of \\x escapes."""
    return '"' + "".join(f"\\x{b:02x}" for b in key) + '"'


@pytest.fixture
def hub(procs: ProcessGroup, tmp_path: Path) -> str:
    address = start_hub(procs, tmp_path, "--admin", ADMIN)
    for ns in ("images", "other"):
        assert redis_cli(address, f"AUTH {ADMIN}", f"NSNEW {ns}", f"NSSET {ns} password {SECRET}",
                         f"NSSET {ns} public 0") == ["OK"] * 4
    return address


def _flist(tmp_path: Path) -> tuple[SignedFlist, LocalStore, Identity]:
    root = busybox_rootfs(tmp_path / "src")
    (root / "etc" / "motd").write_bytes(b"hello from a private namespace\n")
    store = LocalStore(tmp_path / "store")
    manifest, _ = build_dir(root, store, ImageConfig(entrypoint=("/bin/sh",)), "bb")
    ident = Identity.generate()
    return SignedFlist.sign(manifest, ident), store, ident


def test_push_and_fetch_in_a_protected_namespace(hub: str, tmp_path: Path) -> None:
    flist, store, ident = _flist(tmp_path)
    keys = [bytes.fromhex(h) for h in flist.manifest.chunk_hashes()]
    with Hub(f"{hub}/images", SECRET) as h:
        result = push_flist(flist, store, h)
    assert result.chunks_sent == result.chunks_held == result.chunks_total == len(keys)
    assert result.manifest_held

    # Read back on redis-cli's own connection, in the namespace, with its password.
    replies = redis_cli(hub, f"SELECT images {SECRET}", "DBSIZE",
                        *(f"EXISTS {quoted(k)}" for k in keys),
                        f"GET {quoted(flist.manifest.hash)}")
    assert replies[0] == "OK"
    assert replies[1] == str(len(keys) + 1)
    assert replies[2:2 + len(keys)] == ["1"] * len(keys)
    assert SignedFlist.from_bytes(replies[-1].encode()).hash_hex == flist.hash_hex
    # Nothing went to `default`, nor to the other namespace.
    assert redis_cli(hub, "DBSIZE", f"SELECT other {SECRET}", "DBSIZE") == ["0", "OK", "0"]
    # Without the password the private namespace is closed to redis-cli too.
    assert "protected" in redis_cli(hub, "SELECT images")[0].lower()

    # Fetch from the protected namespace: every byte verified and materialized.
    with Hub(f"{hub}/images", SECRET) as h:
        image = ImageCache(tmp_path / "cache").fetch(h, flist.hash_hex, [ident.public_hex])
    assert (image.rootfs / "etc" / "motd").read_bytes() == b"hello from a private namespace\n"
    assert (image.rootfs / "bin" / "busybox").read_bytes() == \
        (tmp_path / "src" / "bin" / "busybox").read_bytes()


def test_wrong_password_is_refused_and_writes_nothing(hub: str, tmp_path: Path) -> None:
    flist, store, ident = _flist(tmp_path)
    for password in ("wrong", None):
        with pytest.raises(FlistError, match=r"namespace 'other' refused access") as err:
            with Hub(f"{hub}/other", password) as h:
                push_flist(flist, store, h)
        assert SECRET not in str(err.value)
    with pytest.raises(FlistError, match="refused access"):
        with Hub(f"{hub}/other", "wrong") as h:
            ImageCache(tmp_path / "cache").fetch(h, flist.hash_hex, [ident.public_hex])
    assert not (tmp_path / "cache" / "images" / flist.hash_hex).exists()
    assert redis_cli(hub, "DBSIZE", f"SELECT other {SECRET}", "DBSIZE") == ["0", "OK", "0"]


def test_cli_push_reports_what_the_namespace_holds(hub: str, tmp_path: Path) -> None:
    _, _, ident = _flist(tmp_path)
    home = tmp_path / "home"
    save_identity(ident, home / "identities" / "pub.key", "pub")
    env = {**os.environ, "ZEROSTACK_HOME": str(home), "ZEROSTACK_HUB_PASSWORD": SECRET,
           "COLUMNS": "300"}

    def zs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*zerostack_cmd(), *args], capture_output=True, text=True,
                              env=env, timeout=120)

    built = zs("flist", "build", str(tmp_path / "src"), "-o", str(tmp_path / "bb.flist"),
               "--identity", "pub", "--store", str(tmp_path / "store"), "--json")
    assert built.returncode == 0, built.stderr
    pushed = zs("flist", "push", str(tmp_path / "bb.flist"), "--hub", f"{hub}/images",
                "--store", str(tmp_path / "store"), "--json")
    assert pushed.returncode == 0, pushed.stderr
    out = json.loads(pushed.stdout)
    assert out["chunks_held"] == out["chunks"] == out["chunks_sent"] > 0 and out["manifest_held"]
    text = zs("flist", "push", str(tmp_path / "bb.flist"), "--hub", f"{hub}/images",
              "--store", str(tmp_path / "store"))
    assert f"0 of {out['chunks']} chunks sent" in text.stdout
    assert f"holds {out['chunks']} of {out['chunks']} chunks" in text.stdout
    assert redis_cli(hub, "DBSIZE") == ["0"]
    bad = zs("flist", "push", str(tmp_path / "bb.flist"), "--hub", f"{hub}/other",
             "--password", "nope", "--store", str(tmp_path / "store"))
    assert bad.returncode != 0 and "refused access" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert redis_cli(hub, f"SELECT other {SECRET}", "DBSIZE") == ["OK", "0"]
    flist_hash = json.loads(built.stdout)["hash"]
    shown = zs("flist", "inspect", flist_hash, "--hub", f"{hub}/images", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["hash"] == flist_hash
