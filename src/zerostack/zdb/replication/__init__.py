"""Zero-DB primary-replica replication by log shipping: a replica's data and index files
become byte-identical to its primary's (see docs/zdb-replication.md)."""

from zerostack.zdb.replication.primary import Follower, Primary
from zerostack.zdb.replication.replica import Replica, ReplicationError
from zerostack.zdb.replication.role import ReplicationConfig, ReplicationRole, role_of

__all__ = ["Follower", "Primary", "Replica", "ReplicationConfig", "ReplicationError",
           "ReplicationRole", "role_of"]
