"""The shim's state file (`status.json`), written atomically, read by the runtime."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_status(directory: Path, **fields: Any) -> None:
    tmp = directory / f".status.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**fields, "shim_pid": os.getpid(), "updated": time.time()}))
    os.replace(tmp, directory / "status.json")


def read_status(directory: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((directory / "status.json").read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}
