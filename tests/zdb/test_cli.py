"""`zerostack zdb` flag handling and `zerostack zdb demo`, run as real commands."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd
from zerostack.cli.zdb import app, parse_size


def test_sizes() -> None:
    assert parse_size("4096", "--datasize") == 4096
    assert parse_size("1M", "--datasize") == 1 << 20
    assert parse_size("256m", "--datasize") == 256 << 20
    assert parse_size("1G", "--datasize") == 1 << 30
    assert parse_size("64KiB", "--datasize") == 64 << 10


@pytest.mark.parametrize(("flags", "reason"), [
    (["--sync", "--synctime", "5"], "exclude each other"),
    (["--protect"], "--protect needs --admin"),
    (["--datasize", "lots"], "invalid size"),
    (["--mode", "fast"], "expected user, seq or mix"),
])
def test_bad_flags_fail_with_a_reason(tmp_path: Path, flags: list[str], reason: str) -> None:
    result = CliRunner().invoke(app, ["--data", str(tmp_path / "d"), "--index",
                                      str(tmp_path / "i"), *flags])
    assert result.exit_code != 0
    assert reason in " ".join(result.stderr.split())


def test_demo_serves_under_var_zdb(tmp_path: Path, procs: ProcessGroup) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = procs.start([*zerostack_cmd(), "zdb", "demo", "--port", str(port)], cwd=tmp_path,
                           stdout=out, stderr=out)
    wait_for_port(port, proc=proc, timeout=30)
    r = redis.Redis(port=port, socket_timeout=10)
    r.set("k", "v")
    assert r.get("k") == b"v"
    assert (tmp_path / "var" / "zdb" / "data" / "default").is_dir()
    assert (tmp_path / "var" / "zdb" / "index" / "default").is_dir()
    text = log.read_text()
    assert f"redis-cli -p {port}" in text and "redis.Redis" in text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
