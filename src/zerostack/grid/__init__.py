"""A whole grid on one machine: a ledger, a farm and node agents, as real processes,
on loopback or each node on a host of its own (a network namespace on a simulated WAN)."""

from zerostack.grid.errors import GridError
from zerostack.grid.hosts import inside
from zerostack.grid.local import GridNode, LocalGrid
from zerostack.grid.teardown import release, remove_tree
from zerostack.grid.topology import Host, Topology

__all__ = ["GridError", "GridNode", "Host", "LocalGrid", "Topology", "inside", "release",
           "remove_tree"]
