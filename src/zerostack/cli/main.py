"""Entry point of the `zerostack` command; each subsystem contributes one sub-app or commands."""

from __future__ import annotations

import typer

from zerostack.cli import bot, flist, identity, ledger, logs, node, zdb

app = typer.Typer(
    name="zerostack",
    help="A grid of autonomous nodes driven by signed IT smart contracts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(identity.app, name="id")
app.add_typer(flist.app, name="flist")
app.command("logs")(logs.logs)
app.add_typer(zdb.app, name="zdb")
app.add_typer(node.app, name="node")
bot.register(app)
app.add_typer(ledger.app, name="ledger")
app.command("demo")(zdb.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
