"""Log files rotate and read back in order; only a fresh request signed by the owner is
answered, sealed to the owner."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from zerostack.crypto import Identity, open_sealed
from zerostack.node.runtime import ContainerError, answer_log_request, read_logs, sign_log_request
from zerostack.node.runtime.logs import LOG_NAME, RotatingLog


def test_rotation_keeps_the_newest_lines_in_order(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path, max_bytes=4096, keep=2)
    for i in range(400):
        log.write("stdout" if i % 2 else "stderr", f"line {i:04d}".encode())
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [LOG_NAME, f"{LOG_NAME}.1", f"{LOG_NAME}.2"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in tmp_path.iterdir())
    lines = read_logs(tmp_path, tail=0)
    numbers = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert numbers == sorted(numbers) and numbers[-1] == 399 and numbers[0] > 0
    assert [int(x.rsplit(" ", 1)[1]) for x in read_logs(tmp_path, tail=3)] == [397, 398, 399]
    assert lines[-1].split(" ")[1] == "stdout"


def test_log_requests(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path, 1 << 20, 2)
    log.write("stdout", b"hello owner")
    log.close()
    owner = Identity.generate()
    req = sign_log_request(owner, 3, "web", tail=10)
    sealed = answer_log_request(req, owner.public_hex, tmp_path)["sealed"]
    assert open_sealed(owner, base64.b64decode(sealed)).decode().endswith("stdout hello owner")
    with pytest.raises(ContainerError, match="too old"):
        answer_log_request(req, owner.public_hex, tmp_path, now=time.time() + 3600)
    tampered = type(req)(**{**req.to_dict(), "tail": 100_000})
    with pytest.raises(ContainerError, match="does not verify"):
        answer_log_request(tampered, owner.public_hex, tmp_path)
