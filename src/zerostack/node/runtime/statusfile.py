"""The shim's state file (`status.json`), written atomically, read by the runtime."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_status(directory: Path, **fields: Any) -> None:
    tmp = directory / f".status.{os.getpid()}.tmp"
    body = json.dumps({**fields, "shim_pid": os.getpid(), "updated": time.time()}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    os.replace(tmp, directory / "status.json")


def read_status(directory: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((directory / "status.json").read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}
