"""Every command and sub-command of `zerostack` answers `--help` (help texts are plain
text: `host:port[/namespace]` once crashed `zerostack flist <any> --help`)."""

from __future__ import annotations

import subprocess
from typing import Any

import typer
from typer.testing import CliRunner

from tests.conftest import zerostack_cmd
from zerostack.cli.main import build_app


def command_paths() -> list[list[str]]:
    """The path of every command in the tree, groups included (the root is [])."""
    paths: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        paths.append(path)
        # A group's sub-commands, by name (Typer ships its own copy of click's classes).
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(build_app()), [])
    return paths


def test_every_command_has_help() -> None:
    paths = command_paths()
    # The tree is really walked: every top-level command and the flist sub-commands.
    names = {" ".join(p) for p in paths}
    assert {"deploy", "status", "logs", "demo", "flist push", "zdb check", "ledger nodes",
            "node run", "id new"} <= names
    runner = CliRunner()
    for path in paths:
        # main() builds an app holding only the command asked for: help it that way too.
        app = build_app(path[0] if path else None)
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output, result.exception)
        assert "Usage:" in result.output and "\x1b" not in result.output, (path, result.output)


def test_help_through_the_installed_command() -> None:
    for args in (["--help"], ["flist", "push", "--help"], ["flist", "build", "--help"]):
        proc = subprocess.run([*zerostack_cmd(), *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "Usage:" in proc.stdout
    assert "host:port[/namespace]" in proc.stdout
