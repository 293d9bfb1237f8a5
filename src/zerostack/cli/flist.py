"""`zerostack flist`: build, import, push, inspect and verify container images (flists)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import typer

from zerostack.cli.identity import load_named
from zerostack.cli.output import console, fail, print_json, print_table, styled
from zerostack.flist import (
    ChunkStore,
    FlistError,
    Hub,
    ImageConfig,
    LocalStore,
    Manifest,
    PushResult,
    SignedFlist,
    build_dir,
    fetch_flist,
    import_image,
    push_flist,
)
from zerostack.flist.manifest import check_path

app = typer.Typer(help="Container images (flists): build, import, push, inspect, verify.",
                  no_args_is_help=True, rich_markup_mode=None)

STORE_HELP = "Local chunk store (default $ZEROSTACK_HOME/chunks)."
HUB_HELP = "Hub address host:port[/namespace] (a Zero-DB namespace)."


def default_store() -> Path:
    home = Path(os.environ.get("ZEROSTACK_HOME", Path.home() / ".zerostack"))
    return home / "chunks"


def _read_flist(path: Path) -> SignedFlist:
    try:
        return SignedFlist.from_bytes(path.read_bytes())
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except FlistError as exc:
        fail(f"{path}: {exc}")


def _summary(flist: SignedFlist) -> dict[str, object]:
    m = flist.manifest
    return {
        "hash": flist.hash_hex,
        "name": m.name,
        "publisher": flist.publisher,
        "signature_valid": flist.signature_ok(),
        "entries": len(m.entries),
        "files": sum(1 for e in m.entries if e.type == "file"),
        "size": m.total_size,
        "chunks": len(m.chunk_hashes()),
        "config": m.config.as_dict(),
    }


def _push(flist: SignedFlist, store: LocalStore, hub: str, password: str | None) -> PushResult:
    try:
        with Hub(hub, password) as h, console.status(f"pushing to {hub}…"):
            return push_flist(flist, store, h)
    except FlistError as exc:
        fail(str(exc))


def _push_json(result: PushResult) -> dict[str, object]:
    return {"chunks": result.chunks_total, "chunks_sent": result.chunks_sent,
            "bytes_sent": result.bytes_sent, "chunks_held": result.chunks_held,
            "manifest_held": result.manifest_held}


def _push_line(result: PushResult, hub: str) -> str:
    return (f"{result.chunks_sent} of {result.chunks_total} chunks sent "
            f"({result.bytes_sent} bytes); {hub} holds {result.chunks_held} of "
            f"{result.chunks_total} chunks and the manifest")


def _write_and_maybe_push(flist: SignedFlist, out: Path, store: LocalStore, hub: str | None,
                          password: str | None, json_out: bool, extra: dict[str, object]) -> None:
    out.write_bytes(flist.to_bytes())
    result: dict[str, object] = {"flist": str(out), **_summary(flist), **extra}
    pushed = _push(flist, store, hub, password) if hub else None
    if hub and pushed:
        result["pushed"] = {"hub": hub, **_push_json(pushed)}
    if json_out:
        print_json(result)
    else:
        console.print(styled("flist ", (flist.hash_hex, "bold"), f" written to {out}"),
                      highlight=False)
        console.print(f"  {result['files']} files, {result['size']} bytes, "
                      f"{result['chunks']} chunks", highlight=False)
        if hub and pushed:
            console.print(f"  pushed: {_push_line(pushed, hub)}", highlight=False)


@app.command("build")
def build(
    directory: Path = typer.Argument(..., help="Root directory of the image."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the .flist."),
    identity: str = typer.Option(..., "--identity", help="Publisher identity that signs it."),
    name: str = typer.Option("", help="Image name, e.g. myapp:1.0."),
    entrypoint: list[str] = typer.Option([], "--entrypoint", help="Entrypoint word (repeat)."),
    cmd: list[str] = typer.Option([], "--cmd", help="Default argument (repeat)."),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE (repeat)."),
    workdir: str = typer.Option("", "--workdir", help="Working directory."),
    user: str = typer.Option("", "--user", help="user[:group], by name or id."),
    store: Path = typer.Option(None, "--store", help=STORE_HELP),
    hub: str = typer.Option(None, "--hub", help=HUB_HELP + " Push right away."),
    password: str = typer.Option(None, "--password", envvar="ZEROSTACK_HUB_PASSWORD"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Build a signed flist from DIRECTORY; chunks go to the local store."""
    for e in env:
        if "=" not in e:
            fail(f"--env {e!r} is not KEY=VALUE")
    ident = load_named(identity)
    local = LocalStore(store or default_store())
    config = ImageConfig(entrypoint=tuple(entrypoint), cmd=tuple(cmd), env=tuple(env),
                         working_dir=workdir, user=user)
    try:
        with console.status("chunking files…"):
            manifest, skipped = build_dir(directory, local, config, name)
        flist = SignedFlist.sign(manifest, ident)
    except (FlistError, OSError) as exc:
        fail(str(exc))
    _write_and_maybe_push(flist, output, local, hub, password, json_out, {"skipped": skipped})


@app.command("import")
def import_(
    image: Path = typer.Argument(..., help="A `docker save` tarball or an OCI layout (tar or dir)."),
    identity: str = typer.Option(..., "--identity", help="Publisher identity that signs it."),
    output: Path = typer.Option(None, "-o", "--output", help="Default: IMAGE name + .flist."),
    name: str = typer.Option("", help="Image name (default: the image's tag)."),
    store: Path = typer.Option(None, "--store", help=STORE_HELP),
    hub: str = typer.Option(None, "--hub", help=HUB_HELP + " Push right away."),
    password: str = typer.Option(None, "--password", envvar="ZEROSTACK_HUB_PASSWORD"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Import a docker or OCI image as a signed flist (layers and whiteouts applied)."""
    ident = load_named(identity)
    local = LocalStore(store or default_store())
    out = output or Path(image.name.removesuffix(".tar") + ".flist")
    try:
        with console.status("applying layers…"):
            result = import_image(image, local, name)
        flist = SignedFlist.sign(result.manifest, ident)
    except (FlistError, OSError) as exc:
        fail(str(exc))
    _write_and_maybe_push(flist, out, local, hub, password, json_out,
                          {"layers": result.layers, "skipped": result.skipped})


@app.command("push")
def push(
    flist_file: Path = typer.Argument(..., help="The .flist to publish."),
    hub: str = typer.Option(..., "--hub", help=HUB_HELP),
    password: str = typer.Option(None, "--password", envvar="ZEROSTACK_HUB_PASSWORD"),
    store: Path = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Send the chunks the hub lacks, then the signed manifest."""
    flist = _read_flist(flist_file)
    result = _push(flist, LocalStore(store or default_store()), hub, password)
    if json_out:
        print_json({"hash": result.hash, "hub": hub, **_push_json(result)})
    else:
        console.print(f"pushed {result.hash}: {_push_line(result, hub)}", highlight=False)


def _load(ref: str, hub: str | None, password: str | None) -> SignedFlist:
    if Path(ref).exists():
        return _read_flist(Path(ref))
    if not hub:
        fail(f"{ref}: no such file (pass --hub to look a hash up on a hub)")
    try:
        with Hub(hub, password) as h:
            return fetch_flist(h, ref, None)
    except FlistError as exc:
        fail(str(exc))


@app.command("inspect")
def inspect(
    ref: str = typer.Argument(..., help="A .flist file, or a manifest hash with --hub."),
    hub: str = typer.Option(None, "--hub", help=HUB_HELP),
    password: str = typer.Option(None, "--password", envvar="ZEROSTACK_HUB_PASSWORD"),
    files: bool = typer.Option(False, "--files", help="List every path."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show an flist's hash, publisher, config and contents."""
    flist = _load(ref, hub, password)
    info = _summary(flist)
    if json_out:
        if files:
            info["paths"] = flist.manifest.as_dict()["entries"]
        print_json(info)
        return
    for key in ("hash", "name", "publisher", "signature_valid", "entries", "size", "chunks"):
        console.print(styled((key, "bold"), f": {info[key]}"), highlight=False)
    c = flist.manifest.config
    console.print(styled(("entrypoint", "bold"), f": {list(c.entrypoint)}  ",
                         ("cmd", "bold"), f": {list(c.cmd)}"), highlight=False)
    console.print(styled(("env", "bold"), f": {list(c.env)}  ", ("workdir", "bold"),
                         f": {c.working_dir!r}  ", ("user", "bold"), f": {c.user!r}"),
                  highlight=False)
    if files:
        print_table("paths", ["path", "type", "mode", "owner", "size", "target"],
                    ([e.path, e.type, oct(e.mode), f"{e.uid}:{e.gid}", e.size, e.target]
                     for e in flist.manifest.entries))


def _verify_content(manifest: Manifest, source: ChunkStore) -> list[str]:
    problems: list[str] = []
    keys = manifest.chunk_hashes()
    for i in range(0, len(keys), 16):
        batch = keys[i : i + 16]
        for key, data in zip(batch, source.get_many([bytes.fromhex(k) for k in batch]),
                             strict=True):
            if data is None:
                problems.append(f"chunk {key[:16]} is missing")
            elif hashlib.blake2b(data, digest_size=32).hexdigest() != key:
                problems.append(f"chunk {key[:16]} does not match its hash")
    return problems


@app.command("verify")
def verify_cmd(
    ref: str = typer.Argument(..., help="A .flist file, or a manifest hash with --hub."),
    hub: str = typer.Option(None, "--hub", help=HUB_HELP + " Check the hub's chunks."),
    password: str = typer.Option(None, "--password", envvar="ZEROSTACK_HUB_PASSWORD"),
    store: Path = typer.Option(None, "--store", help=STORE_HELP + " Checked without --hub."),
    publisher: list[str] = typer.Option([], "--publisher", help="Allowed publisher key (repeat)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check the signature (and allowed publishers), then every chunk's presence and hash."""
    flist = _load(ref, hub, password)
    try:
        flist.verify(frozenset(publisher) if publisher else None)
        for e in flist.manifest.entries:
            check_path(e.path)
        if hub:
            with Hub(hub, password) as h:
                problems = _verify_content(flist.manifest, h)
        else:
            problems = _verify_content(flist.manifest, LocalStore(store or default_store()))
    except FlistError as exc:
        fail(str(exc))
    where = hub or str(store or default_store())
    if json_out:
        print_json({"hash": flist.hash_hex, "publisher": flist.publisher, "checked": where,
                    "ok": not problems, "problems": problems})
    if problems:
        fail(f"flist {flist.hash_hex[:16]} on {where}: {len(problems)} bad chunks; "
             f"first: {problems[0]}")
    if not json_out:
        console.print(f"flist {flist.hash_hex} OK: signed by {flist.publisher}, "
                      f"{len(flist.manifest.chunk_hashes())} chunks verified on {where}")
