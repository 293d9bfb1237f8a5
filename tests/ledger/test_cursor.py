"""Event cursors: "H" or "H.I", anything else refused with a reason (never a crash)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.ledger.errors import LedgerError
from zerostack.ledger.service import parse_cursor


@pytest.mark.parametrize(("cursor", "position"), [
    ("0", (0, None)), (0, (0, None)), ("17", (17, None)), (17, (17, None)),
    ("17.0", (17, 0)), ("17.1499", (17, 1499)), ("007.02", (7, 2)),
])
def test_cursors_name_a_block_or_an_event(cursor: Any, position: tuple[int, int | None]) -> None:
    assert parse_cursor(cursor) == position


@pytest.mark.parametrize("cursor", ["", "-1", -1, "1.", ".1", "1.2.3", "1e3", " 1", "1 ",
                                    "١٢", "9" * 16, "1." + "9" * 10, True, 1.5, None, [1]])
def test_malformed_cursors_are_refused(cursor: Any) -> None:
    with pytest.raises(LedgerError) as info:
        parse_cursor(cursor)
    assert info.value.status == 400 and info.value.code == "bad_cursor"
    assert "not a block height H or an event H.I" in str(info.value)


@given(st.one_of(st.text(max_size=40), st.integers(), st.none(), st.floats()))
def test_any_cursor_parses_or_is_refused(cursor: Any) -> None:
    try:
        height, index = parse_cursor(cursor)
    except LedgerError as exc:
        assert exc.status == 400
        return
    assert 0 <= height < 10**15 and (index is None or 0 <= index < 10**9)
