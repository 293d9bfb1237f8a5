"""Shared CLI output: Rich console, tables, `--json` printing and one-line failures.

Much of what the CLI prints comes from outside (the ledger, node reports, container logs,
file names, parse errors), so the consoles here never read markup or emoji codes in a
string, and every control character is shown as a visible escape instead of reaching the
terminal. Styling is added with `styled`, around text that stays plain.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import orjson
import typer
from rich.console import Console, RenderableType
from rich.status import Status
from rich.style import Style
from rich.table import Table
from rich.text import Text

# C0 controls but newline and tab, DEL, C1 controls (8-bit CSI, OSC… in UTF-8 terminals) and
# the bidirectional overrides that reorder what a reader sees.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: object) -> str:
    """`text` with every control character spelt out (ESC becomes the four characters
    `\\x1b`), so no escape sequence, bell or carriage return from outside reaches a terminal."""
    return _UNSAFE.sub(_visible, str(text))


def styled(*parts: object | tuple[object, str]) -> Text:
    """One line of plain text from `parts`; a `(text, style)` pair is shown in that Rich
    style. Nothing in the parts is read as markup, and each part is `clean`ed."""
    line = Text()
    for part in parts:
        if isinstance(part, tuple):
            line.append(clean(part[0]), style=part[1])
        else:
            line.append(clean(part))
    return line


class _PlainStatus(Status):
    """A spinner whose message is plain text, whatever it holds."""

    def update(self, status: RenderableType | None = None, **kwargs: Any) -> None:
        super().update(Text(clean(status)) if isinstance(status, str) else status, **kwargs)


class PlainConsole(Console):
    """A Rich console that reads no markup and no emoji codes in strings and spells out
    their control characters; `styled` Text is how the CLI adds style."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, **kwargs)

    def render_str(self, text: str, *, style: str | Style = "", **kwargs: Any) -> Text:
        # Every string printed, every table cell and title comes through here.
        kwargs.update(markup=False, emoji=False)
        return super().render_str(clean(text), style=style, **kwargs)

    def status(self, status: RenderableType, **kwargs: Any) -> Status:
        """A spinner; a string message is shown as plain text (Rich would read it as markup)."""
        message = Text(clean(status)) if isinstance(status, str) else status
        return _PlainStatus(message, console=self, **kwargs)


console = PlainConsole()
err_console = PlainConsole(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line reason to stderr and exit non-zero."""
    err_console.print(styled(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(code)


# orjson escapes C0 controls inside strings; DEL, C1 and bidi overrides it leaves raw.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _json(value: Any, option: int) -> str:
    text = orjson.dumps(value, option=option).decode()
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_json(value: Any) -> None:
    sys.stdout.write(_json(value, orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + "\n")


def json_line(value: Any) -> None:
    """`value` as one line of JSON, flushed (for streams a reader follows line by line)."""
    sys.stdout.write(_json(value, 0) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=Text(clean(title)))
    for c in columns:
        table.add_column(Text(clean(c)))
    for row in rows:
        table.add_row(*(Text("" if v is None else clean(v)) for v in row))
    console.print(table)
