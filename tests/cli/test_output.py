"""The CLI's consoles on a real (forced) terminal: outside text is never markup and its
control characters never reach the terminal raw; the CLI's own styling still does."""

from __future__ import annotations

import io
import json
import re

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from zerostack.cli import output
from zerostack.cli.output import PlainConsole, clean, styled

HOSTILE = "500 [/x] [bold]loud[/bold] :smile: \x1b]0;evil\x07 \x1b[2J \x9b31m \r\u202e"


def terminal() -> tuple[PlainConsole, io.StringIO]:
    out = io.StringIO()
    return PlainConsole(file=out, force_terminal=True, color_system="standard", width=400), out


def without_style(text: str) -> str:
    """The terminal text less the sequences Rich itself writes: styles (SGR), hiding and
    showing the cursor, and the line moves and erases of the spinner."""
    return re.sub(r"\x1b\[[0-9;]*m|\x1b\[\?25[lh]|\x1b\[[0-9]*[AK]|\r", "", text)


def test_print_table_status_and_styled_keep_outside_text_plain() -> None:
    con, out = terminal()
    con.print(HOSTILE)
    con.print(styled(("bold", "bold"), " ", HOSTILE))
    with con.status(HOSTILE) as spinner:
        spinner.update(HOSTILE)
    from rich.table import Table

    table = Table(title=HOSTILE)
    table.add_column(HOSTILE)
    table.add_row(HOSTILE)
    con.print(table)
    text = without_style(out.getvalue())
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text and "\r" not in text
    shown = "500 [/x] [bold]loud[/bold] :smile: \\x1b]0;evil\\x07 \\x1b[2J \\x9b31m \\x0d\\u202e"
    assert text.count(shown) >= 4
    assert "\x1b[1m" in out.getvalue()  # styled() still styles what the CLI chose


def test_fail_prints_one_plain_line(monkeypatch: pytest.MonkeyPatch) -> None:
    con, out = terminal()
    monkeypatch.setattr(output, "err_console", con)
    with pytest.raises(typer.Exit):
        output.fail(f"bad {HOSTILE}")
    text = without_style(out.getvalue())
    assert text.startswith("error: bad 500 [/x] [bold]loud[/bold]") and "\x1b" not in text


def test_json_escapes_what_orjson_leaves_raw(capsys: pytest.CaptureFixture[str]) -> None:
    output.print_json({"m": HOSTILE})
    output.json_line({"m": HOSTILE})
    text = capsys.readouterr().out
    assert all(c in "\n" or 0x20 <= ord(c) < 0x7f for c in text), text
    for line in (text.split("\n}\n")[0] + "\n}", text.split("\n}\n")[1]):
        assert json.loads(line)["m"] == HOSTILE


@given(st.text())
def test_clean_leaves_nothing_a_terminal_acts_on(text: str) -> None:
    cleaned = clean(text)
    assert not any((ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f
                   for c in cleaned)
    # Printable text is left alone.
    if all(c.isprintable() and c not in "\u200e\u200f" for c in text):
        assert cleaned == text
