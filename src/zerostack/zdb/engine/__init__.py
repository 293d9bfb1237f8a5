"""Zero-DB storage engine: namespaces in the exact 0-db v2 file format, with no I/O loop.

Plain synchronous Python called by the RESP server; see docs/zdb-files.md for the files
and their crash-safety rules.
"""

from zerostack.zdb.engine.config import EngineConfig, Mode
from zerostack.zdb.engine.engine import Engine
from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.namespace import Namespace

__all__ = ["Engine", "EngineConfig", "Mode", "Namespace", "ZdbError"]
