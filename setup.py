"""Build hook: compile Zero-DB's request path with mypyc.

The metadata lives in pyproject.toml; this file only adds the native extensions. The
compiled modules are the same typed Python sources, turned into C by mypyc, so a checkout
runs unchanged without them. Set ZEROSTACK_COMPILE=0 to build a pure-Python package.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from setuptools import Extension, setup


def native_sources() -> list[str]:
    """Source paths of zerostack.zdb.native.NATIVE_MODULES (read without importing it)."""
    tree = ast.parse(Path("src/zerostack/zdb/native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NATIVE_MODULES":
            modules = ast.literal_eval(node.value)
            return ["src/" + m.replace(".", "/") + ".py" for m in modules]
    raise SystemExit("setup.py: NATIVE_MODULES not found in src/zerostack/zdb/native.py")


def native_extensions() -> list[Extension]:
    if os.environ.get("ZEROSTACK_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    # pyproject's [tool.mypy] loads the pydantic plugin, which the isolated build
    # environment does not have: the compiled modules need none of it.
    options = ["--config-file", os.devnull, "--ignore-missing-imports",
               "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}"]
    return mypycify([*options, *native_sources()], opt_level="3",
                    group_name="zerostack_native")


setup(ext_modules=native_extensions())
