"""A whole grid on one machine: a ledger, a farm and node agents, as real processes."""

from zerostack.grid.errors import GridError
from zerostack.grid.local import LocalGrid
from zerostack.grid.teardown import release, remove_tree

__all__ = ["GridError", "LocalGrid", "release", "remove_tree"]
