"""A namespace spread over many data files: written, restarted, read back in full, with
older files read from maps made once (no file opened per request)."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from tests.conftest import ProcessGroup
from tests.zdb.conftest import start_zdb

FILES = 50


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_restart_and_read_back_fifty_data_files(tmp_path: Path, procs: ProcessGroup) -> None:
    rnd = random.Random(12)
    extra = ["--datasize", "16K"]
    server = start_zdb(procs, tmp_path, *extra)
    r = server.client()
    expected: dict[bytes, bytes] = {}
    history: dict[bytes, list[bytes]] = {}
    i = 0
    while len(list((server.data / "default").glob("d*"))) < FILES + 2:
        key = b"key-%05d" % i
        value = rnd.randbytes(rnd.randint(1, 900))
        assert r.execute_command("SET", key, value) == key
        expected[key] = value
        history[key] = [value]
        i += 1
        if i % 7 == 0:  # overwrite an older key: its versions now span several files
            old = b"key-%05d" % rnd.randrange(i)
            if old in expected:
                value = rnd.randbytes(rnd.randint(1, 900))
                assert r.execute_command("SET", old, value) == old
                expected[old] = value
                history[old].insert(0, value)
        if i % 11 == 0:  # and delete some
            gone = b"key-%05d" % rnd.randrange(i)
            if gone in expected:
                assert r.execute_command("DEL", gone) == b"OK"
                del expected[gone]
    deleted = set(history) - set(expected)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0

    server = start_zdb(procs, tmp_path, *extra, data=server.data, index=server.index)
    files = len(list((server.data / "default").glob("d*")))
    assert files > FILES
    r = server.client()
    assert r.execute_command("DBSIZE") == len(expected)
    keys = sorted(history)
    rnd.shuffle(keys)
    for rounds in range(2):
        fds = open_files(server.proc.pid)
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("GET", key)
        got = pipe.execute()
        for key, value in zip(keys, got, strict=True):
            assert value == expected.get(key), key
        # the first pass maps each older file once; the second opens nothing at all
        if rounds == 1:
            assert open_files(server.proc.pid) == fds
    mapped = {Path(line.split()[-1]).name for line in
              Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines()
              if str(server.data) in line}
    # (the newest file or two may hold no live value, and then was never read)
    assert len({f"d{n}" for n in range(files)} & mapped) >= files - 2, sorted(mapped)
    assert open_files(server.proc.pid) <= 2 * files + 32
    # MGET across all files, and every version of a rewritten key, oldest in d0
    sample = keys[:300]
    assert r.execute_command("MGET", *sample) == [expected.get(k) for k in sample]
    for key in [k for k, v in history.items() if len(v) > 2 and k not in deleted][:20]:
        versions: list[bytes] = []
        cursor: bytes | None = None
        while True:
            reply = r.execute_command("HISTORY", key, *([cursor] if cursor else []))
            versions.append(reply[2])
            cursor = reply[0]
            if not cursor:
                break
        assert versions == history[key]
