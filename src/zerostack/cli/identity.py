"""`zerostack id`: create and show ed25519 identities kept as key files (mode 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from zerostack.cli.output import console, fail, print_json, styled
from zerostack.crypto import CryptoError, Identity, load_identity, save_identity

app = typer.Typer(help="Manage identities (ed25519 key pairs).", no_args_is_help=True,
                  rich_markup_mode=None)


def zerostack_home() -> Path:
    """The user's zerostack folder: $ZEROSTACK_HOME (default ~/.zerostack)."""
    return Path(os.environ.get("ZEROSTACK_HOME", Path.home() / ".zerostack"))


def identity_dir() -> Path:
    """Where key files live: $ZEROSTACK_HOME/identities (default ~/.zerostack/identities)."""
    return zerostack_home() / "identities"


def identity_path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        fail(f"invalid identity name {name!r}")
    return identity_dir() / f"{name}.key"


def load_named(name: str) -> Identity:
    path = identity_path(name)
    if not path.exists():
        fail(f"no identity named {name!r} (create it with `zerostack id new {name}`)")
    try:
        return load_identity(path)
    except CryptoError as exc:
        fail(str(exc))


@app.command("new")
def new(
    name: str,
    force: bool = typer.Option(False, help="Overwrite an existing identity."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a new identity NAME."""
    path = identity_path(name)
    if path.exists() and not force:
        fail(f"identity {name!r} already exists at {path}")
    ident = Identity.generate()
    save_identity(ident, path, name)
    if json_out:
        print_json({"name": name, "public": ident.public_hex, "path": str(path)})
    else:
        console.print(styled("created identity ", (name, "bold"),
                             f": {ident.public_hex}\nkey file: {path}"), highlight=False)


@app.command("show")
def show(
    name: str,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show identity NAME's public key (never the private key)."""
    ident = load_named(name)
    if json_out:
        print_json({"name": name, "public": ident.public_hex, "path": str(identity_path(name))})
    else:
        console.print(f"{name}: {ident.public_hex}")
