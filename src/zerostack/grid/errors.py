"""The grid's one exception type."""

from __future__ import annotations


class GridError(Exception):
    """A grid process that did not start or answer, or a grid folder that could not be
    cleaned; the message says what and why (with the tail of a log when there is one)."""
