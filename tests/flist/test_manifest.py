"""The flist format: canonical round trips, signatures and structural checks."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.crypto import Identity
from zerostack.flist import Entry, FlistError, ImageConfig, Manifest, SignedFlist

HEX = "ab" * 32
names = st.text(alphabet="abcdefgh.-_", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    files = draw(st.dictionaries(names, st.integers(0, 3 * 1024 * 1024), max_size=6))
    entries = [Entry(path="d", type="dir", mode=0o755)]
    for name, size in files.items():
        n = -(-size // (1024 * 1024))
        entries.append(Entry(path=f"d/{name}", type="file", mode=0o644, size=size,
                             uid=draw(st.integers(0, 70000)), chunks=(HEX,) * n))
    entries.append(Entry(path="l", type="symlink", mode=0o777, target="d"))
    config = ImageConfig(entrypoint=("/bin/sh",), env=tuple(draw(st.lists(st.text(max_size=8), max_size=3))))
    return Manifest(name=draw(st.text(max_size=10)), config=config,
                    entries=tuple(sorted(entries, key=lambda e: e.path)))


@given(manifests())
def test_signed_flist_round_trips_byte_for_byte(manifest: Manifest) -> None:
    ident = Identity.from_seed(b"\x01" * 32)
    signed = SignedFlist.sign(manifest, ident)
    again = SignedFlist.from_bytes(signed.to_bytes())
    assert again.to_bytes() == signed.to_bytes()
    assert again.hash_hex == manifest.hash_hex
    again.verify({ident.public_hex})


def _signed() -> tuple[SignedFlist, Identity]:
    ident = Identity.generate()
    m = Manifest(entries=(Entry(path="bin", type="dir", mode=0o755),
                          Entry(path="bin/x", type="file", mode=0o755, size=3, chunks=(HEX,))))
    return SignedFlist.sign(m, ident), ident


def test_tampered_manifest_fails_signature() -> None:
    signed, ident = _signed()
    raw = signed.to_bytes().replace(b'"mode":493', b'"mode":2541')  # 0o755 -> setuid 0o4755
    tampered = SignedFlist.from_bytes(raw)
    with pytest.raises(FlistError, match="signature does not verify"):
        tampered.verify({ident.public_hex})


def test_unsigned_and_foreign_publisher_are_refused() -> None:
    signed, _ = _signed()
    d = signed.to_dict()
    del d["signature"]

    with pytest.raises(FlistError, match="unsigned"):
        SignedFlist.from_bytes(orjson.dumps(d))
    with pytest.raises(FlistError, match="not among the publishers"):
        signed.verify({Identity.generate().public_hex})
    forged = SignedFlist(signed.manifest, Identity.generate().public_hex, signed.signature)
    with pytest.raises(FlistError, match="signature does not verify"):
        forged.verify(None)


@pytest.mark.parametrize("entries, message", [
    ([("a/b", "file")], "parent 'a' is not a directory"),
    ([("b", "dir"), ("a", "dir")], "not sorted"),
    ([("a", "dir"), ("a", "dir")], "not sorted or duplicated"),
    ([("a", "symlink")], "symlink needs a target"),
    ([("a", "hardlink")], "invalid path"),
])
def test_structural_checks(entries: list[tuple[str, str]], message: str) -> None:
    m = Manifest(entries=tuple(Entry(path=p, type=t, mode=0o755) for p, t in entries))  # type: ignore[arg-type]
    with pytest.raises(FlistError, match=message):
        m.check()


@pytest.mark.parametrize("path", ["/etc", "a/../b", "a//b", ".", "a/./b", ""])
def test_paths_that_could_escape_are_rejected(path: str) -> None:
    with pytest.raises(ValueError):
        Entry(path=path, type="dir", mode=0o755)


def test_file_chunk_count_must_match_size() -> None:
    m = Manifest(entries=(Entry(path="f", type="file", mode=0o644, size=3 * 1024 * 1024, chunks=(HEX,)),))
    with pytest.raises(FlistError, match="need 3 chunks"):
        m.check()
