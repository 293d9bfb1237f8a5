"""`zerostack zdb`: run a Zero-DB server with the reference 0-db's flags; `zerostack demo`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from zerostack.cli.output import console, fail

if TYPE_CHECKING:
    from zerostack.zdb.server import ServerConfig

app = typer.Typer(
    help="Run a Zero-DB server (Redis protocol, always-append, compatible with 0-db v2).",
    invoke_without_command=True,
    no_args_is_help=False,
)

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, option: str) -> int:
    """Bytes from `4096`, `1M`, `256M`, `1G` (binary units, optional `B`/`iB`)."""
    match = _SIZE.match(text)
    if match is None:
        fail(f"{option}: invalid size {text!r} (use bytes or a unit: 64K, 1M, 256M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@app.callback()
def serve(
    ctx: typer.Context,
    listen: str = typer.Option("0.0.0.0", "--listen", help="Address to listen on (TCP)."),
    port: int = typer.Option(9900, "--port", help="TCP port to listen on."),
    socket_path: Path | None = typer.Option(
        None, "--socket", help="Listen on this unix socket instead of TCP."),
    data: Path = typer.Option(Path("./zdb-data"), "--data", help="Data files directory."),
    index: Path = typer.Option(Path("./zdb-index"), "--index", help="Index files directory."),
    mode: str = typer.Option(
        "mix", "--mode", help="user (own keys), seq (server-assigned keys) or mix (per namespace)."),
    datasize: str = typer.Option(
        "256M", "--datasize", help="Rotate to a new data/index file pair past this size."),
    admin: str | None = typer.Option(
        None, "--admin", envvar="ZEROSTACK_ZDB_ADMIN", show_envvar=True,
        help="Admin password; without it every client is admin."),
    protect: bool = typer.Option(
        False, "--protect", help="Guard 'default' with the admin password (read-only otherwise)."),
    maxsize: str | None = typer.Option(
        None, "--maxsize", help="Default size limit of new namespaces (e.g. 1G)."),
    sync: bool = typer.Option(False, "--sync", help="fsync every write before answering."),
    synctime: int = typer.Option(
        0, "--synctime", help="fsync at most every SECS seconds (instead of --sync)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every client connection."),
) -> None:
    """Run a Zero-DB server until Ctrl-C, SIGTERM or STOP."""
    if ctx.invoked_subcommand is not None:
        return
    from zerostack.zdb.engine import EngineConfig, Mode
    from zerostack.zdb.server import ServerConfig

    modes = {"user": Mode.USER, "seq": Mode.SEQ, "mix": Mode.MIXED, "mixed": Mode.MIXED}
    if mode.lower() not in modes:
        fail(f"--mode: expected user, seq or mix, got {mode!r}")
    if sync and synctime:
        fail("--sync and --synctime exclude each other: choose one sync policy")
    if synctime < 0:
        fail("--synctime must be a positive number of seconds")
    if protect and not admin:
        fail("--protect needs --admin: the default namespace is guarded by the admin password")
    if not 0 <= port <= 65535:
        fail(f"--port {port} is not a TCP port")
    engine = EngineConfig(
        data_dir=data, index_dir=index, mode=modes[mode.lower()],
        datasize=parse_size(datasize, "--datasize"), sync=sync, synctime=synctime,
        maxsize=parse_size(maxsize, "--maxsize") if maxsize else 0,
    )
    config = ServerConfig(engine=engine, listen=listen, port=port, socket_path=socket_path,
                          admin_password=admin or None, protect=protect)
    _run(config, verbose)


def _run(config: ServerConfig, verbose: bool) -> None:
    from zerostack.zdb.engine import ZdbError
    from zerostack.zdb.server import run_forever, setup_logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    try:
        run_forever(config)
    except ZdbError as exc:
        fail(f"cannot open the Zero-DB data: {exc}")
    except OSError as exc:
        fail(f"cannot start Zero-DB: {exc}")
    except KeyboardInterrupt:
        pass


def demo(
    port: int = typer.Option(9900, "--port", help="TCP port on 127.0.0.1."),
    home: Path = typer.Option(Path("./var/zdb"), "--dir", help="Where the demo keeps its data."),
) -> None:
    """Start a local Zero-DB (data under ./var/zdb) and show how to talk to it."""
    from zerostack.zdb.engine import EngineConfig, Mode
    from zerostack.zdb.server import ServerConfig

    data, index = home / "data", home / "index"
    console.print(
        f"[bold]Zero-DB[/] on [cyan]127.0.0.1:{port}[/], data in {data}, index in {index}\n\n"
        f"  redis-cli -p {port} SET hello world\n"
        f"  redis-cli -p {port} GET hello\n"
        f"  redis-cli -p {port} NSNEW photos\n\n"
        "  python: import redis\n"
        f"          r = redis.Redis(port={port})\n"
        "          r.set('hello', 'world'); print(r.get('hello'))\n\n"
        "Ctrl-C stops it; the data stays for the next run.",
        highlight=False,
    )
    engine = EngineConfig(data_dir=data, index_dir=index, mode=Mode.MIXED)
    _run(ServerConfig(engine=engine, listen="127.0.0.1", port=port), verbose=False)
