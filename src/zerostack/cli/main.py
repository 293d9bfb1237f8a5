"""Entry point of the `zerostack` command; each subsystem contributes one sub-app or commands.

Sub-apps are imported only when their command runs: starting `zerostack zdb` should not
pay for importing the ledger's HTTP stack or the image builder, so `main()` builds an app
holding just the command asked for (and everything for `--help`).
"""

from __future__ import annotations

import importlib
import sys

import typer

# command name -> (module under zerostack.cli, attribute, kind): "app" is a Typer sub-app,
# "command" a function registered as a top-level command.
_ENTRIES: dict[str, tuple[str, str, str]] = {
    "id": ("identity", "app", "app"),
    "zdb": ("zdb", "app", "app"),
    "ledger": ("ledger", "app", "app"),
    "node": ("node", "app", "app"),
    "flist": ("flist", "app", "app"),
    "deploy": ("bot", "deploy", "command"),
    "approve": ("bot", "approve", "command"),
    "status": ("bot", "status", "command"),
    "cancel": ("bot", "cancel", "command"),
    "logs": ("logs", "logs", "command"),
    "balance": ("billing", "balance", "command"),
    "transfer": ("billing", "transfer", "command"),
    "faucet": ("billing", "faucet", "command"),
    "bill": ("billing", "bill", "command"),
    "price": ("billing", "price", "command"),
    "payouts": ("billing", "payouts", "command"),
    "network": ("network", "app", "app"),
    "gateway": ("gateway", "app", "app"),
    "demo": ("demo", "demo", "command"),
    "template": ("templates", "template_app", "app"),
    "solution": ("templates", "solution_app", "app"),
    "up": ("grid", "up", "command"),
    "down": ("grid", "down", "command"),
    "grid": ("grid", "app", "app"),
    "story": ("story", "story", "command"),
}


def build_app(only: str | None = None) -> typer.Typer:
    """The `zerostack` app with every command, or with just `only` when it is known."""
    app = typer.Typer(
        name="zerostack",
        help="A grid of autonomous nodes driven by signed IT smart contracts.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # help texts name `host:port[/namespace]`: never Rich markup
    )

    @app.callback()
    def _root() -> None:
        """A grid of autonomous nodes driven by signed IT smart contracts."""

    names = [only] if only in _ENTRIES else list(_ENTRIES)
    for name in names:
        module_name, attr, kind = _ENTRIES[name]
        module = importlib.import_module(f"zerostack.cli.{module_name}")
        target = getattr(module, attr)
        if kind == "app":
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def main() -> None:
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    build_app(first)()


if __name__ == "__main__":
    main()
