"""Which Zero-DB modules run compiled: the request path is built with mypyc (see setup.py).

The compiled modules are the same typed sources; without a build they run as plain Python.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

NATIVE_MODULES = (
    "zerostack.zdb.protocol",
    "zerostack.zdb.server",
    "zerostack.zdb.commands.read",
    "zerostack.zdb.commands.write",
    "zerostack.zdb.commands.rules",
    "zerostack.zdb.commands.session",
    "zerostack.zdb.engine.nsfiles",
    "zerostack.zdb.engine.recovery",
    "zerostack.zdb.engine.reads",
    "zerostack.zdb.engine.writes",
    "zerostack.zdb.engine.history",
    "zerostack.zdb.engine.namespace",
    "zerostack.zdb.engine.files",
    "zerostack.zdb.engine.format",
    "zerostack.zdb.engine.engine",
)
"""Modules on the per-request path of the server, compiled together by setup.py."""


def is_compiled(module: str) -> bool:
    """True when `module` was loaded from a native extension."""
    origin = getattr(importlib.import_module(module), "__file__", None) or ""
    return any(origin.endswith(suffix) for suffix in EXTENSION_SUFFIXES)


def compiled() -> bool:
    """True when every module of the request path runs compiled."""
    return all(is_compiled(m) for m in NATIVE_MODULES)


def stale() -> list[str]:
    """Compiled modules whose source changed after the build (a rebuild is due:
    `make setup`, or `pip install -e .`); their edits do not run until then."""
    out: list[str] = []
    for module in NATIVE_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            continue
        built = Path(spec.origin)
        if built.suffix != ".so":
            continue
        source = built.parent / (module.rsplit(".", 1)[1] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            out.append(module)
    return out
