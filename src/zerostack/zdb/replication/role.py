"""A server's replication role: a primary that ships to replicas, or a replica following a
primary until it is promoted. The command handlers reach it through `role_of(state)`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from zerostack.zdb.engine import Engine
from zerostack.zdb.replication.primary import Primary
from zerostack.zdb.replication.replica import Replica

log = logging.getLogger("zerostack.zdb")

_ROLES: dict[int, ReplicationRole] = {}


class ReplicationRole:
    """Owns the Primary (always there: a promoted replica serves replicas too) and, while
    this server is a replica, the Replica task."""

    def __init__(self, engine: Engine, replica_of: tuple[str, int] | None = None,
                 primary_auth: str | None = None, min_replicas: int = 0,
                 min_replicas_timeout: float = 10.0, name: str = "") -> None:
        self.engine = engine
        self.busy: set[str] = set()
        self.primary = Primary(engine, self.busy, min_replicas, min_replicas_timeout)
        self.replica: Replica | None = None
        if replica_of is not None:
            self.replica = Replica(engine, replica_of[0], replica_of[1], primary_auth, name)
        self.promoted_at = 0.0
        # Set by the server: switch the command table when the role changes; find the
        # transport and peer address of a client session (for REPLSYNC).
        self.on_role_change: Callable[[], None] = lambda: None
        self.connection_of: Callable[[object], tuple[asyncio.Transport, str] | None] = \
            lambda session: None
        # Set by the server: let clients held while a namespace was compacted go on.
        self.on_namespace_free: Callable[[str], None] = lambda name: None

    @property
    def is_replica(self) -> bool:
        return self.replica is not None

    def register(self, state: object) -> None:
        _ROLES[id(state)] = self

    def unregister(self, state: object) -> None:
        _ROLES.pop(id(state), None)

    def start(self) -> None:
        if self.replica is not None:
            self.replica.start()

    async def stop(self) -> None:
        if self.replica is not None:
            await self.replica.stop()
        await self.primary.stop()

    async def promote(self) -> bool:
        """Stop following and accept writes; False when this server is already a primary."""
        replica = self.replica
        if replica is None:
            return False
        await replica.stop()
        self.replica = None
        self.promoted_at = time.time()
        self.on_role_change()
        positions = " ".join(f"{n}@{ns.position()[0]}:{ns.position()[1]}"
                             for n, ns in self.engine.namespaces.items())
        log.warning("event=zdb.replication.promoted former_primary=%s:%d positions=\"%s\"",
                    replica.host, replica.port, positions)
        return True

    def info_text(self) -> str:
        lines = ["# replication", f"role: {'replica' if self.replica else 'primary'}"]
        if self.promoted_at:
            lines.append(f"promoted_at: {int(self.promoted_at)}")
        if self.replica is not None:
            lines += self.replica.info_lines()
        lines += self.primary.info_lines()
        return "\n".join(lines) + "\n"


def role_of(state: object) -> ReplicationRole | None:
    return _ROLES.get(id(state))
