"""What 0-db v2 clients read and operators rely on, against real servers: every NSINFO and
INFO field of the reference with its meaning, STOP and the admin-only commands, MIRROR and
MASTER, and header refusals in both builds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import REPO, ProcessGroup, free_port, require_root, wait_for_port
from tests.zdb.conftest import ZdbProcess, ZdbStarter, start_zdb
from tests.zdb.test_server import err, raw

# The fields 0-db 2.0.7 answers NSINFO with (its README and commands_namespace.c).
NSINFO_REFERENCE = {
    "name", "entries", "public", "worm", "locked", "password", "data_size_bytes",
    "data_size_mb", "data_limits_bytes", "index_size_bytes", "index_size_kb",
    "next_internal_id", "mode", "stats_index_io_errors", "stats_index_io_error_last",
    "stats_index_faults", "stats_data_io_errors", "stats_data_io_error_last",
    "stats_data_faults", "index_disk_freespace_bytes", "index_disk_freespace_mb",
    "data_disk_freespace_bytes", "data_disk_freespace_mb", "data_current_id",
    "data_current_offset",
}
NSINFO_LIMITED = {"space_available"}  # only for a namespace with a size limit
NSINFO_ADMIN = {"data_path", "data_path_active", "index_path", "index_path_active"}
NSINFO_ZEROSTACK = {"frozen"}

# The fields 0-db 2.0.7 answers INFO with (commands_system.c).
INFO_REFERENCE = {
    "server_name", "server_revision", "engine_revision", "instance_id", "boot_time", "uptime",
    "clients_lifetime", "sequential_key_size", "data_version", "index_version",
    "commands_executed", "commands_failed", "commands_unauthorized",
    "index_disk_read_failed", "index_disk_write_failed", "data_disk_read_failed",
    "data_disk_write_failed", "index_disk_read_bytes", "index_disk_read_mb",
    "index_disk_write_bytes", "index_disk_write_mb", "data_disk_read_bytes",
    "data_disk_read_mb", "data_disk_write_bytes", "data_disk_write_mb", "network_rx_bytes",
    "network_rx_mb", "network_tx_bytes", "network_tx_mb",
}
INFO_ZEROSTACK = {"native_build", "clients_connected", "namespaces", "role",
                  "connected_replicas", "min_replicas", "term", "log_term"}

# What the reference's in-memory index spends per key besides the key (64-bit build).
ENTRY_SIZE = 64


def fields(text: bytes) -> dict[str, str]:
    """`key: value` lines of an INFO/NSINFO reply, parsed the way the 0-stor client does."""
    out: dict[str, str] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(": ")
            assert key not in out, f"{key} twice"
            out[key] = value
    return out


def nsinfo(r: redis.Redis, name: str = "default") -> dict[str, str]:
    return fields(r.execute_command("NSINFO", name))


def info(r: redis.Redis) -> dict[str, str]:
    return fields(r.execute_command("INFO"))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bsize * st.f_bavail


def restart(procs: ProcessGroup, server: ZdbProcess) -> ZdbProcess:
    server.proc.terminate()
    assert server.proc.wait(timeout=15) == 0
    return start_zdb(procs, server.log.parent, *server.args[server.args.index(str(server.index)) + 1:],
                     port=server.port, data=server.data, index=server.index)


def test_nsinfo_has_every_reference_field_with_its_meaning(zdb_start: ZdbStarter,
                                                           procs: ProcessGroup) -> None:
    server = zdb_start("--admin", "pw")
    user = server.client()
    ns = nsinfo(user)
    assert set(ns) == NSINFO_REFERENCE | NSINFO_ZEROSTACK
    admin = server.client()
    admin.execute_command("AUTH", "pw")
    ns = nsinfo(admin)
    assert set(ns) == NSINFO_REFERENCE | NSINFO_ADMIN | NSINFO_ZEROSTACK
    # Where the files are: the namespace's directories and the files writes go to.
    assert ns["data_path"] == str(server.data / "default")
    assert ns["index_path"] == str(server.index / "default")
    assert ns["data_path_active"] == str(server.data / "default" / "d0")
    assert ns["index_path_active"] == str(server.index / "default" / "i0")
    # Nothing failed: every counter is there and zero; faults are never counted.
    for key in ("stats_index_io_errors", "stats_index_io_error_last", "stats_index_faults",
                "stats_data_io_errors", "stats_data_io_error_last", "stats_data_faults"):
        assert ns[key] == "0", key
    # Free space is what statvfs says of the namespace's own directories (other processes
    # write on this disk meanwhile: a small difference is theirs).
    for which, root in (("data", server.data), ("index", server.index)):
        reported = int(ns[f"{which}_disk_freespace_bytes"])
        assert abs(reported - free_bytes(root / "default")) < 64 << 20
        assert ns[f"{which}_disk_freespace_mb"] == f"{reported / (1 << 20):.2f}"

    # next_internal_id: the reference's next entry id, printed as its little-endian bytes.
    assert ns["next_internal_id"] == "0x00000000"
    for key in (b"a", b"bb", b"ccc"):
        admin.execute_command("SET", key, b"v" * 10)
    ns = nsinfo(admin)
    assert ns["next_internal_id"] == "0x03000000"
    assert ns["entries"] == "3" and ns["data_size_bytes"] == "30"
    # index_size_bytes is the reference's in-memory index: an entry plus the key, per key.
    assert int(ns["index_size_bytes"]) == 3 * ENTRY_SIZE + 6
    assert ns["index_size_kb"] == f"{(3 * ENTRY_SIZE + 6) / 1024:.2f}"
    admin.execute_command("SET", b"a", b"w" * 10)  # an overwrite is no new entry id
    admin.execute_command("DEL", b"bb")
    ns = nsinfo(admin)
    assert ns["next_internal_id"] == "0x03000000"
    assert int(ns["index_size_bytes"]) == 2 * ENTRY_SIZE + 4
    admin.execute_command("SET", b"dddd", b"v")
    assert nsinfo(admin)["next_internal_id"] == "0x04000000"
    # On restart the reference's loader gives every index entry an id (the overwritten
    # version too): 5 entries were written.
    server = restart(procs, server)
    admin = server.client()
    admin.execute_command("AUTH", "pw")
    ns = nsinfo(admin)
    assert ns["next_internal_id"] == "0x05000000"
    assert ns["data_current_offset"] == str((server.data / "default" / "d0").stat().st_size)

    # Sequential mode: the next slot; an update takes one (the old version's copy).
    admin.execute_command("NSNEW", "seq")
    admin.execute_command("NSSET", "seq", "mode", "seq")
    admin.execute_command("NSSET", "seq", "maxsize", "1000")
    admin.execute_command("SELECT", "seq")
    keys = [admin.execute_command("SET", b"", b"x" * 100) for _ in range(3)]
    ns = nsinfo(admin, "seq")
    assert set(ns) == NSINFO_REFERENCE | NSINFO_LIMITED | NSINFO_ADMIN | NSINFO_ZEROSTACK
    assert ns["next_internal_id"] == "0x03000000" and ns["mode"] == "sequential"
    assert ns["index_size_bytes"] == "0"  # no keys in memory
    assert ns["space_available"] == "700"
    admin.execute_command("SET", keys[1], b"y" * 50)
    ns = nsinfo(admin, "seq")
    assert ns["next_internal_id"] == "0x04000000" and ns["space_available"] == "750"
    for _ in range(253):
        admin.execute_command("SET", b"", b"")
    assert nsinfo(admin, "seq")["next_internal_id"] == "0x01010000"  # 257, little-endian


def test_info_has_every_reference_field_with_its_meaning(zdb_start: ZdbStarter,
                                                         procs: ProcessGroup) -> None:
    server = zdb_start("--admin", "pw")
    r = server.client()
    first = info(r)
    assert set(first) == INFO_REFERENCE | INFO_ZEROSTACK
    assert first["data_version"] == "3" and first["index_version"] == "4"
    assert first["sequential_key_size"] == "8"
    assert 0 <= int(first["instance_id"]) < 1 << 32
    for key in ("index_disk_read_failed", "index_disk_write_failed", "data_disk_read_failed",
                "data_disk_write_failed"):
        assert first[key] == "0", key
    # At start the loader read the index files: just the headers of a new namespace.
    assert first["index_disk_read_bytes"] == str((server.index / "default" / "i0").stat().st_size)

    # Network: every byte sent counts on the way in; replies on the way out.
    request = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$1000\r\n" + b"v" * 1000 + b"\r\n"
    got, _ = raw(server.port, request)
    assert got == b"$3\r\nkey\r\n"
    second = info(r)
    assert int(second["network_rx_bytes"]) - int(first["network_rx_bytes"]) \
        == len(request) + len(b"*1\r\n$4\r\nINFO\r\n")
    # The reply to the first INFO went out after it counted, and the SET's reply.
    assert int(second["network_tx_bytes"]) - int(first["network_tx_bytes"]) >= len(got) + 500
    assert second["network_rx_mb"] == f"{int(second['network_rx_bytes']) / (1 << 20):.2f}"
    # Disk writes: exactly what was appended to the files since the start.
    data_file = server.data / "default" / "d0"
    index_file = server.index / "default" / "i0"
    assert int(second["data_disk_write_bytes"]) == data_file.stat().st_size - 28
    assert int(second["index_disk_write_bytes"]) == index_file.stat().st_size - 29
    assert second["instance_id"] == first["instance_id"]
    assert int(second["commands_executed"]) >= 2

    # After a restart the loader read the whole index file.
    server = restart(procs, server)
    third = info(server.client())
    assert third["index_disk_read_bytes"] == str(index_file.stat().st_size)
    assert third["data_disk_write_bytes"] == "0"


def test_io_errors_are_counted_where_they_happen(tmp_path: Path, procs: ProcessGroup) -> None:
    """A data disk that fills up: the failed writes show in NSINFO and INFO."""
    require_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        root = tmp_path / "zdb"
        root.mkdir()
        server = start_zdb(procs, root, data=mnt / "data")
        r = server.client()
        assert nsinfo(r)["stats_data_io_errors"] == "0"
        started = int(time.time())
        with pytest.raises(redis.RedisError):
            for i in range(20):  # 2 MB into 1 MB
                r.execute_command("SET", b"k%d" % i, os.urandom(100_000))
        # Room again: the buffered writes go out and the server answers everyone.
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        r = server.client()
        assert r.ping()
        ns = nsinfo(r)
        assert int(ns["stats_data_io_errors"]) >= 1
        assert started <= int(ns["stats_data_io_error_last"]) <= time.time()
        assert ns["stats_index_io_errors"] == "0" and ns["stats_index_io_error_last"] == "0"
        # tmpfs changes only through this server: statvfs agrees to the byte.
        assert int(ns["data_disk_freespace_bytes"]) == free_bytes(mnt / "data" / "default")
        stats = info(r)
        assert int(stats["data_disk_write_failed"]) >= 1
        assert stats["index_disk_write_failed"] == "0"
        assert stats["data_disk_read_failed"] == "0"
        server.proc.terminate()
        server.proc.wait(timeout=15)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_stop_is_refused_without_an_admin_password(zdb: ZdbProcess) -> None:
    r = zdb.client()
    assert err(r, "STOP") == "Unauthorized"
    assert r.ping()
    assert zdb.proc.poll() is None
    assert info(r)["commands_unauthorized"] == "1"


def test_stop_needs_the_admin_password(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--admin", "pw")
    r = server.client()
    assert err(r, "STOP") == "Permission denied"
    assert r.ping()
    assert server.proc.poll() is None
    assert err(r, "AUTH", "wrong") == "Access denied"
    assert err(r, "STOP") == "Permission denied"
    r.execute_command("AUTH", "pw")
    try:
        assert r.execute_command("STOP") == b"Stopping"
    except redis.ConnectionError:
        pass
    assert server.proc.wait(timeout=15) == 0


ADMIN_ONLY = [("NSNEW", "x"), ("NSDEL", "x"), ("NSSET", "x", "public", "0"), ("NSJUMP",),
              ("RELOAD", "default"), ("INDEX", "DIRTY"), ("DATA", "RAW", "0", "28"), ("HOOKS",),
              ("STOP",), ("MIRROR",), ("MASTER",), ("SET", "k", "v", "12345"),
              ("DEL", "k", "12345"), ("COMPACT", "default"), ("PROMOTE",), ("REPLINFO",)]


def test_every_admin_only_command_needs_the_password(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--admin", "pw")
    r = server.client()
    for command in ADMIN_ONLY:
        assert err(r, *command) == "Permission denied", command
    assert info(r)["commands_unauthorized"] == str(len(ADMIN_ONLY))
    assert server.proc.poll() is None


def test_mirror_and_master_name_the_replacement(zdb_start: ZdbStarter) -> None:
    server = zdb_start()  # every client is admin: the refusal is the command's own
    r = server.client()
    for command in ("MIRROR", "MASTER", "mirror"):
        text = err(r, command)
        assert "not supported" in text and "--replica-of" in text, text
    # The connection is no mirror nor master: its requests run as usual.
    assert r.execute_command("SET", "k", "v") == b"k"
    assert r.get("k") == b"v"


def pure_python_server(procs: ProcessGroup, tmp_path: Path) -> int:
    """A server run from a copy of the sources without any extension module."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "zerostack", src / "zerostack",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    port = free_port()
    proc = procs.start(
        [sys.executable, "-m", "zerostack.cli.main", "zdb", "--listen", "127.0.0.1", "--port",
         str(port), "--data", str(tmp_path / "data"), "--index", str(tmp_path / "index")],
        env={**os.environ, "PYTHONPATH": str(src)}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    client = redis.Redis(port=port)
    client.response_callbacks.clear()
    assert info(client)["native_build"] == "no"
    client.close()
    return port


@pytest.mark.parametrize("build", ["installed", "pure-python"])
def test_bad_headers_get_the_same_answer_in_both_builds(build: str, zdb: ZdbProcess,
                                                        procs: ProcessGroup,
                                                        tmp_path: Path) -> None:
    # "installed" is the native build where it was built (make setup), as in CI.
    port = zdb.port if build == "installed" else pure_python_server(procs, tmp_path)
    cases = [
        (b"*1025\r\n", b"-Too many arguments\r\n"),
        (b"*1\r\n$4\r\nPING\r\n*1025\r\n", b"+PONG\r\n-Too many arguments\r\n"),
        (b"*1025\r\n$3\r\nGET\r\n", b"-Too many arguments\r\n"),
        (b"*2\r\n$3\r\nGET\r\n$9000000\r\n", b"-Payload too big\r\n"),
        (b"*2\r\n$3\r\nGET\r\n+OK\r\n", b"-Malformed query string\r\n"),
        (b"*01\r\n$4\r\nPING\r\n", b"-Malformed request, array expected\r\n"),
        (b"*1\r\n$4\r\nPINGxx", b"-Malformed query string\r\n"),
        (b"PING\r\n", b"-Malformed request, array expected\r\n"),
    ]
    for payload, answer in cases:
        got, closed = raw(port, payload, wait=3)
        assert (got, closed) == (answer, True), payload
    # Cut anywhere, the header is refused once its line is whole.
    for cut in range(1, 7):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"*1025\r\n"[:cut])
            time.sleep(0.05)
            s.sendall(b"*1025\r\n"[cut:])
            s.settimeout(3)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            assert got == b"-Too many arguments\r\n"
    # A count within the limit just waits for its arguments.
    got, closed = raw(port, b"*1024\r\n", wait=0.5)
    assert (got, closed) == (b"", False)
