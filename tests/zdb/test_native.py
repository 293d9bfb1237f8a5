"""The native build of the request path: in effect where it was built, and the plain
Python sources serving the same protocol without it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import REPO, free_port, wait_for_port
from zerostack.zdb import native


def test_request_path_runs_compiled() -> None:
    # `make setup` builds it (setup.py); ZEROSTACK_COMPILE=0 asks for a pure-Python install.
    expected = os.environ.get("ZEROSTACK_COMPILE", "1") != "0"
    assert native.compiled() is expected, {m: native.is_compiled(m) for m in native.NATIVE_MODULES}
    assert native.stale() == []


def test_info_and_the_ready_line_say_which_build_runs(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerostack.cli.main", "zdb", "--listen", "127.0.0.1", "--port",
         str(port), "--data", str(tmp_path / "data"), "--index", str(tmp_path / "index")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"*1\r\n$4\r\nINFO\r\n")
            info = b""
            while not info.endswith(b"\r\n") or len(info) < 64:
                info += sock.recv(65536)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    word = "yes" if native.compiled() else "no"
    assert f"native_build: {word}" in info.decode()
    assert f"native={word}" in err.decode()


def test_pure_python_sources_serve_the_same_protocol(tmp_path: Path) -> None:
    # A copy of the sources without any extension module: what runs where nothing was built.
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "zerostack", src / "zerostack",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(src)}
    check = subprocess.run(
        [sys.executable, "-c", "from zerostack.zdb import native; print(native.compiled(), "
         "native.is_compiled('zerostack.zdb.protocol'))"],
        env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert check.stdout.split() == ["False", "False"]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerostack.cli.main", "zdb", "--listen", "127.0.0.1", "--port",
         str(port), "--data", str(tmp_path / "data"), "--index", str(tmp_path / "index")],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        client = redis.Redis(port=port)
        assert client.set("k", b"v" * 1000) is not None
        assert client.get("k") == b"v" * 1000
        pipe = client.pipeline(transaction=False)
        for i in range(100):
            pipe.set(f"key{i}", i)
        pipe.execute()
        assert client.get("key99") == b"99"
        client.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
