"""A whole grid on one machine: a ledger, a farm and node agents, as real processes."""

from zerostack.grid.local import GridError, LocalGrid

__all__ = ["GridError", "LocalGrid"]
