"""Zero-DB server over real sockets: redis-py, redis-cli and raw RESP against `zerostack zdb`."""

from __future__ import annotations

import hashlib
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import hiredis
import pytest
import redis

from tests.conftest import require_tool
from tests.zdb.conftest import ZdbProcess, ZdbStarter
from zerostack.zdb.protocol import encode_request


def err(r: redis.Redis, *args: object) -> str:
    """The error text a command gets (redis-py strips the leading '-')."""
    with pytest.raises(redis.ResponseError) as info:
        r.execute_command(*args)
    return str(info.value)


def raw(port: int, payload: bytes, wait: float = 0.3) -> tuple[bytes, bool]:
    """Send bytes on a fresh connection; (everything received, whether the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(wait)
        got = b""
        closed = False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                got += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
        return got, closed


def test_data_commands_with_redis_py(zdb: ZdbProcess) -> None:
    plain = zdb.client(raw=False)  # redis-py exactly as users run it
    assert plain.ping() is True
    plain.set("plain", "value")
    assert plain.get("plain") == b"value"
    assert plain.exists("plain") == 1
    assert plain.delete("plain")
    r = zdb.client()
    assert r.execute_command("SET", "k1", "v1") == b"k1"
    assert r.execute_command("SET", "k1", "v1") is None  # same value: nothing written
    assert r.get("k1") == b"v1"
    assert r.get("missing") is None
    assert r.execute_command("SET", b"\x00bin\xff", b"\x00" * 1000) == b"\x00bin\xff"
    assert r.mget("k1", "missing", b"\x00bin\xff") == [b"v1", None, b"\x00" * 1000]
    assert r.exists("k1") == 1 and r.exists("missing") == 0
    assert r.execute_command("CHECK", "k1") == 1
    assert r.execute_command("CHECK", "missing") is None
    assert r.execute_command("LENGTH", "k1") == 2
    assert r.execute_command("LENGTH", "missing") is None
    assert abs(r.execute_command("KEYTIME", "k1") - time.time()) < 60
    assert r.dbsize() == 2
    assert r.execute_command("DEL", "k1") == b"OK"
    assert err(r, "DEL", "k1") == "Key not found"
    assert r.dbsize() == 1
    assert err(r, "SET", "x" * 256, "v") == "Key too large"
    assert err(r, "SET", "", "v") == "Invalid argument, key needed"
    assert err(r, "GET") == "Unexpected arguments"
    assert err(r, "CONFIG", "GET", "save") == "Command not supported"
    assert err(r, "NOPE") == "Command not supported"
    sec, usec = r.execute_command("TIME")
    assert abs(int(sec) - time.time()) < 60 and 0 <= int(usec) < 1_000_000
    info = r.execute_command("INFO")
    assert b"server_name: 0-db (zdb)" in info
    big = b"b" * (4 * 1024 * 1024)
    assert r.execute_command("SET", "big", big) == b"big"
    assert r.get("big") == big
    assert r.execute_command("set", "lower", "case") == b"lower"


def test_redis_cli_works_unchanged(zdb: ZdbProcess) -> None:
    cli = require_tool("redis-cli")

    def run(*args: str) -> str:
        out = subprocess.run([cli, "-p", str(zdb.port), *args], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()

    assert run("PING") == "PONG"
    assert run("SET", "hello", "world") == "hello"
    assert run("GET", "hello") == "world"
    assert run("NSNEW", "photos") == "OK"
    assert "photos" in run("NSLIST")
    assert "name: photos" in run("NSINFO", "photos")
    assert run("DBSIZE") == "1"
    assert run("DEL", "nope").endswith("Key not found")
    assert run("EXISTS", "hello") == "1"
    assert run("SET", "hello", "again") == "hello"
    history = run("HISTORY", "hello").splitlines()
    assert history[-1] == "again"
    scan = run("SCAN").splitlines()
    assert "hello" in scan
    assert "server_name: 0-db (zdb)" in run("INFO")
    assert len(run("TIME").splitlines()) == 2
    assert run("NSSET", "photos", "password", "pw") == "OK"
    assert run("NSSET", "photos", "public", "0") == "OK"
    assert run("SELECT", "photos").endswith("Namespace protected and private")
    assert run("AUTH", "x").endswith("Authentication disabled")
    assert run("NSDEL", "photos") == "OK"
    assert run("CONFIG", "GET", "save").endswith("Command not supported")


def test_scan_rscan_keycur_and_history(zdb: ZdbProcess) -> None:
    r = zdb.client()
    assert err(r, "SCAN") == "No more data"
    keys = [b"key%03d" % i for i in range(250)]
    for k in keys:
        r.execute_command("SET", k, b"value-" + k)
    r.execute_command("DEL", keys[10])
    r.execute_command("SET", keys[20], b"new")  # overwritten: now the newest entry

    def walk(command: str) -> list[bytes]:
        seen: list[bytes] = []
        reply = r.execute_command(command)
        while True:
            cursor, entries = reply
            for key, length, stamp in entries:
                assert isinstance(length, int) and isinstance(stamp, int)
                seen.append(key)
            try:
                reply = r.execute_command(command, cursor)
            except redis.ResponseError as exc:
                assert str(exc) == "No more data"
                return seen

    expected = [k for k in keys if k not in (keys[10], keys[20])] + [keys[20]]
    assert walk("SCAN") == expected
    assert walk("RSCAN") == expected[::-1]
    cursor = r.execute_command("KEYCUR", keys[100])
    assert isinstance(cursor, bytes) and len(cursor) == 17
    _, entries = r.execute_command("SCAN", cursor)
    assert entries[0][0] == keys[101]
    assert err(r, "KEYCUR", "missing") == "Key not found"
    assert err(r, "SCAN", "garbage") != ""

    for v in (b"v2", b"v3"):
        r.execute_command("SET", keys[0], v)
    versions = []
    reply = r.execute_command("HISTORY", keys[0])
    while True:
        older, stamp, value = reply
        assert int(stamp) > 0
        versions.append(value)
        if older is None:
            break
        reply = r.execute_command("HISTORY", keys[0], older)
    assert versions == [b"v3", b"v2", b"value-" + keys[0]]
    assert err(r, "HISTORY", "missing") == "Key not found"


def test_sequential_namespace(zdb: ZdbProcess) -> None:
    r = zdb.client()
    assert r.execute_command("NSNEW", "log") == b"OK"
    assert r.execute_command("NSSET", "log", "mode", "seq") == b"OK"
    assert r.execute_command("SELECT", "log") == b"OK"
    k0 = r.execute_command("SET", "", "first")
    k1 = r.execute_command("SET", "", "second")
    assert (k0, k1) == ((0).to_bytes(8, "little"), (1).to_bytes(8, "little"))
    assert r.execute_command("SET", k0, "updated") == k0
    assert r.get(k0) == b"updated"
    assert err(r, "SET", (99).to_bytes(8, "little"), "x") == "Invalid key, only update authorized"
    assert b"mode: sequential" in r.execute_command("NSINFO", "log")
    r.execute_command("SELECT", "default")
    r.execute_command("SET", "user-key", "v")
    assert err(r, "NSSET", "log", "mode", "user") == "Cannot change mode of used namespace"


def test_admin_namespaces_and_permissions(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--admin", "adminpw")
    r = server.client()
    for command in (("NSNEW", "a"), ("NSDEL", "a"), ("NSSET", "a", "public", "0"), ("NSJUMP",),
                    ("DATA", "RAW", "0", "28"), ("SET", "k", "v", "12345"), ("STOP",),
                    ("HOOKS",), ("INDEX", "DIRTY"), ("RELOAD", "default")):
        assert err(r, *command) == "Permission denied", command
    assert err(r, "AUTH", "wrong") == "Access denied"
    assert r.execute_command("AUTH", "adminpw") == b"OK"
    # redis-py's own password option authenticates as admin (HELLO 3 AUTH, or AUTH on RESP2)
    for protocol in (2, 3):
        logged_in = redis.Redis(port=server.port, password="adminpw", protocol=protocol)
        assert logged_in.execute_command("NSNEW", f"viapy{protocol}") in (b"OK", "OK", True)
    with pytest.raises(redis.RedisError):
        redis.Redis(port=server.port, password="wrong").ping()
    assert r.execute_command("NSNEW", "private") == b"OK"
    for bad in (".", "..", "a/b", "default", "x" * 129):
        assert err(r, "NSNEW", bad) != ""
    assert err(r, "NSNEW", "private") != ""
    r.execute_command("NSSET", "private", "password", "s3cret")
    r.execute_command("NSSET", "private", "public", "0")
    assert err(r, "NSSET", "private", "color", "blue") == "Invalid property"
    assert err(r, "NSSET", "default", "public", "0") == "Cannot update default namespace"
    assert err(r, "NSSET", "nothere", "public", "0") == "Namespace not found"

    other = server.client()
    assert err(other, "SELECT", "private") == "Namespace protected and private"
    assert err(other, "SELECT", "private", "nope") == "Access denied"
    assert err(other, "SELECT", "nothere") == "Namespace not found"
    assert other.execute_command("SELECT", "private", "s3cret") == b"OK"
    assert other.execute_command("SET", "k", "v") == b"k"
    assert err(other, "SET", "k", "v2", "1000") == "Permission denied"
    info = r.execute_command("NSINFO", "private").decode()
    fields = dict(line.split(": ", 1) for line in info.splitlines()[1:])
    assert fields["name"] == "private" and fields["entries"] == "1"
    assert fields["public"] == "no" and fields["password"] == "yes"
    assert fields["mode"] == "userkey"
    for key in ("worm", "locked", "data_size_bytes", "data_limits_bytes", "index_size_bytes",
                "data_current_id", "data_current_offset"):
        assert key in fields

    # public + password: readable by anyone, writable only with the password
    r.execute_command("NSSET", "private", "public", "1")
    reader = server.client()
    assert reader.execute_command("SELECT", "private") == b"OK"
    assert reader.get("k") == b"v"
    assert err(reader, "SET", "k", "x") == "Namespace is in read-only mode"
    assert err(reader, "FLUSH") == "Flushing public namespace denied"

    # SECURE: sha1("<challenge>:<password>")
    secure = server.client()
    challenge = secure.execute_command("AUTH", "SECURE", "CHALLENGE")
    challenge = challenge.decode() if isinstance(challenge, bytes) else challenge
    assert len(challenge) == 16
    digest = hashlib.sha1(f"{challenge}:s3cret".encode()).hexdigest()
    assert secure.execute_command("SELECT", "private", "SECURE", digest) == b"OK"
    assert secure.execute_command("SET", "k2", "v2") == b"k2"
    admin2 = server.client()
    challenge = admin2.execute_command("AUTH", "SECURE", "CHALLENGE")
    challenge = challenge.decode() if isinstance(challenge, bytes) else challenge
    wrong = hashlib.sha1(f"{challenge}:bad".encode()).hexdigest()
    assert err(admin2, "AUTH", "SECURE", wrong) == "Access denied"
    assert err(admin2, "AUTH", "SECURE", wrong) != "OK"  # the challenge is spent
    challenge = admin2.execute_command("AUTH", "SECURE", "CHALLENGE")
    challenge = challenge.decode() if isinstance(challenge, bytes) else challenge
    digest = hashlib.sha1(f"{challenge}:adminpw".encode()).hexdigest()
    assert admin2.execute_command("AUTH", "SECURE", digest) == b"OK"
    assert admin2.execute_command("NSNEW", "fromsecure") == b"OK"

    # FLUSH a private password-protected namespace
    r.execute_command("NSSET", "private", "public", "0")
    assert other.execute_command("FLUSH") == b"OK"
    assert other.dbsize() == 0

    # admin-only timestamp, DATA RAW, NSJUMP
    r.execute_command("SELECT", "fromsecure")
    assert r.execute_command("SET", "stamped", "v", "1234567") == b"stamped"
    assert r.execute_command("KEYTIME", "stamped") == 1234567
    entry = r.execute_command("DATA", "RAW", "0", "28")
    assert entry[0] == b"stamped" and entry[5] == b"v" and entry[4] == 1234567
    assert entry[2].startswith(b"0x") and len(entry[2]) == 10
    assert err(r, "DATA", "RAW", "0", "999999") == "EOF"
    assert r.execute_command("NSJUMP") == b"OK"
    assert b"data_current_id: 1" in r.execute_command("NSINFO", "fromsecure")
    assert r.get("stamped") == b"v"

    # NSDEL rules
    assert err(r, "NSDEL", "default") == "Cannot remove default namespace"
    assert err(r, "NSDEL", "fromsecure") == "Cannot remove namespace you're currently using."
    assert err(r, "NSDEL", "nothere") == "This namespace doesn't exists"
    r.execute_command("SELECT", "default")
    assert r.execute_command("NSDEL", "private") == b"OK"
    assert b"private" not in r.execute_command("NSLIST")
    # the client still inside the removed namespace is told and disconnected
    with pytest.raises((redis.ResponseError, redis.ConnectionError)) as info:
        other.get("k")
    assert "not available anymore" in str(info.value) or isinstance(info.value,
                                                                     redis.ConnectionError)


def test_worm_lock_freeze_and_maxsize(zdb: ZdbProcess) -> None:
    r = zdb.client()
    r.execute_command("NSNEW", "w")
    r.execute_command("NSSET", "w", "worm", "1")
    r.execute_command("SELECT", "w")
    assert r.execute_command("SET", "k", "v") == b"k"
    assert err(r, "SET", "k", "other") == "Namespace is protected by worm mode"
    assert err(r, "DEL", "k") == "Cannot delete a key when namespace is in worm mode"
    r.execute_command("NSSET", "w", "worm", "0")
    r.execute_command("NSSET", "w", "lock", "1")
    assert err(r, "SET", "k2", "v") == "Namespace is temporarily locked (read-only)"
    assert r.get("k") == b"v"
    r.execute_command("NSSET", "w", "lock", "0")
    r.execute_command("NSSET", "w", "freeze", "1")
    assert "frozen" in err(r, "GET", "k")
    assert "frozen" in err(r, "SET", "k", "x")
    r.execute_command("NSSET", "w", "freeze", "0")
    r.execute_command("NSSET", "w", "maxsize", "100")
    assert r.execute_command("SET", "a", b"x" * 90) == b"a"
    assert err(r, "SET", "b", b"x" * 20) == "No space left on this namespace"
    assert r.execute_command("SET", "a", b"y" * 95) == b"a"  # replacing is judged by the net size


def test_protect_guards_default_with_the_admin_password(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--admin", "Secr3tAdm1n", "--protect")
    r = server.client()
    assert err(r, "SET", "k", "v") == "Namespace is in read-only mode"
    assert r.execute_command("SELECT", "default", "Secr3tAdm1n") == b"OK"
    assert r.execute_command("SET", "k", "v") == b"k"
    other = server.client()
    assert other.get("k") == b"v"
    assert err(other, "SELECT", "default", "bad") == "Access denied"
    assert b"password: yes" in other.execute_command("NSINFO", "default")
    server.proc.terminate()
    assert server.proc.wait(timeout=15) == 0
    log = server.log.read_text()
    assert "event=zdb.ready" in log and "event=zdb.stopped" in log
    assert all(line.startswith("ts=") for line in log.splitlines() if line.strip())
    assert "Secr3tAdm1n" not in log  # no password in any event


def test_synctime_server_serves_and_stops_cleanly(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--synctime", "1")
    r = server.client()
    assert r.execute_command("SET", "k", "v") == b"k"
    time.sleep(1.5)  # at least one periodic sync pass
    assert r.get("k") == b"v"
    server.proc.terminate()
    assert server.proc.wait(timeout=15) == 0


def test_protocol_errors_close_or_answer(zdb: ZdbProcess) -> None:
    got, closed = raw(zdb.port, b"PING\r\n")
    assert got == b"-Malformed request, array expected\r\n" and closed
    got, closed = raw(zdb.port, b"*0\r\n*1\r\n$4\r\nPING\r\n")
    assert got == b"-Missing arguments\r\n+PONG\r\n" and not closed
    many = b"*1025\r\n" + b"$1\r\nx\r\n" * 1025
    got, closed = raw(zdb.port, many)
    assert got == b"-Too many arguments\r\n" and closed
    got, closed = raw(zdb.port, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$9000000\r\nxx")
    assert got == b"-Payload too big\r\n" and closed
    got, closed = raw(zdb.port, b"*1\r\n$4\r\nPING\r\n*2\r\n:1\r\n:2\r\n")
    assert got.startswith(b"+PONG\r\n-") and closed
    r = zdb.client()  # the server is still fine
    assert r.ping() == b"PONG"


def test_wait_answers_when_another_client_runs_the_command(zdb: ZdbProcess) -> None:
    waiter, writer = zdb.client(), zdb.client()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(
        waiter.execute_command("WAIT", "SET", "5000")))
    thread.start()
    time.sleep(0.3)
    writer.execute_command("GET", "x")
    writer.execute_command("SET", "x", "1")
    thread.join(10)
    assert result == [b"SET"]
    assert err(waiter, "WAIT", "SET", "100") == "Timeout"
    assert err(waiter, "WAIT", "NOPE") == "Unknown command to watch"
    assert err(waiter, "WAIT", "SET", "10") == "Invalid timeout"
    thread = threading.Thread(target=lambda: result.append(waiter.execute_command("WAIT", "*")))
    thread.start()
    time.sleep(0.3)
    writer.execute_command("PING")
    thread.join(10)
    assert result[-1] == b"PING"


def test_many_clients_pipelining(zdb: ZdbProcess) -> None:
    errors: list[BaseException] = []
    idle = [socket.create_connection(("127.0.0.1", zdb.port), timeout=10) for _ in range(200)]

    def worker(n: int) -> None:
        try:
            r = zdb.client()
            pipe = r.pipeline(transaction=False)
            for i in range(300):
                pipe.execute_command("SET", f"c{n}-{i}", f"value-{n}-{i}" * 3)
            assert pipe.execute() == [f"c{n}-{i}".encode() for i in range(300)]
            pipe = r.pipeline(transaction=False)
            for i in range(300):
                pipe.get(f"c{n}-{i}")
            assert pipe.execute() == [(f"value-{n}-{i}" * 3).encode() for i in range(300)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert zdb.client().dbsize() == 40 * 300
    for s in idle:  # the 200 idle connections are still served
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert all(s.recv(16) == b"+PONG\r\n" for s in idle)
    for s in idle:
        s.close()

    # one big pipelined write of raw RESP, replies arrive complete and in order
    payload = b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(k), k)
                       for k in (f"c0-{i}".encode() for i in range(300)))
    with socket.create_connection(("127.0.0.1", zdb.port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        want = sum(len(b"$%d\r\n%b\r\n" % (len(v), v)) for v in
                   ((f"value-0-{i}" * 3).encode() for i in range(300)))
        while len(got) < want:
            got += s.recv(65536)
        assert got.startswith(b"$" + str(len("value-0-0" * 3)).encode())


def test_unix_socket(zdb_start: ZdbStarter, tmp_path: Path) -> None:
    path = tmp_path / "zdb.sock"
    zdb_start("--socket", str(path))
    r = redis.Redis(unix_socket_path=str(path), socket_timeout=10)
    r.response_callbacks.clear()
    assert r.execute_command("SET", "k", "v") == b"k"
    assert r.get("k") == b"v"


def test_stop_ends_the_server(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--admin", "pw")
    r = server.client()
    r.execute_command("AUTH", "pw")
    r.execute_command("SET", "k", "v")
    try:
        r.execute_command("STOP")
    except redis.ConnectionError:
        pass
    assert server.proc.wait(timeout=15) == 0


def test_garbage_on_the_wire_never_touches_stored_data(zdb: ZdbProcess) -> None:
    r = zdb.client()
    stored = {b"k%d" % i: b"v%d" % i * 50 for i in range(50)}
    for k, v in stored.items():
        r.execute_command("SET", k, v)
    rnd = random.Random(5)
    samples = [b"*", b"$", b"\r\n", b"*3\r\n", b"$3\r\nSET\r\n", b"*-1\r\n", b"$-7\r\n",
               b"*99999999999\r\n", b"$9999999999\r\n", b"DEL k1\r\n", b":1\r\n", b"*1\r\n*1\r\n"]
    for _ in range(60):
        payload = b"".join(rnd.choice(samples) if rnd.random() < 0.7 else rnd.randbytes(
            rnd.randint(1, 30)) for _ in range(rnd.randint(1, 12)))
        raw(zdb.port, payload, wait=0.05)
    assert zdb.proc.poll() is None
    for k, v in stored.items():
        assert r.get(k) == v
    assert r.execute_command("DBSIZE") == len(stored)


def test_requests_pipelined_behind_wait_keep_their_order(zdb: ZdbProcess) -> None:
    with socket.create_connection(("127.0.0.1", zdb.port), timeout=10) as s:
        s.sendall(b"*3\r\n$4\r\nWAIT\r\n$3\r\nDEL\r\n$4\r\n2000\r\n*1\r\n$4\r\nPING\r\n")
        time.sleep(0.3)
        other = zdb.client()
        other.execute_command("SET", "k", "v")
        assert err(other, "DEL", "nothere") == "Key not found"
        got = b""
        while len(got) < len(b"+DEL\r\n+PONG\r\n"):
            got += s.recv(64)
        assert got == b"+DEL\r\n+PONG\r\n"


def test_hello_handshake(zdb: ZdbProcess) -> None:
    got, closed = raw(zdb.port, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n*2\r\n$5\r\nHELLO\r\n$1\r\n9\r\n")
    assert got.startswith(b"%5\r\n") and b"$5\r\nproto\r\n:3\r\n" in got
    assert got.endswith(b"-NOPROTO unsupported protocol version\r\n") and not closed


def test_server_wide_modes(zdb_start: ZdbStarter) -> None:
    seq = zdb_start("--mode", "seq").client()
    assert seq.execute_command("SET", "", "first") == (0).to_bytes(8, "little")
    assert err(seq, "SET", "mykey", "v") == "Invalid key, only update authorized"
    seq.execute_command("NSNEW", "other")
    assert err(seq, "NSSET", "other", "mode", "user") == (
        "This server instance is configured to use a single runtime mode")
    user = zdb_start("--mode", "user").client()
    assert user.execute_command("SET", "mykey", "v") == b"mykey"
    assert err(user, "SET", "", "v") == "Invalid argument, key needed"


def test_pipelined_get_runs_answer_as_single_requests_do(zdb_start: ZdbStarter) -> None:
    # Runs of GETs in a pipeline are served together (their key lookups made at once):
    # every reply must still be the one the request gets on its own, in order, across
    # runs cut by other commands, malformed GETs and the run length.
    rnd = random.Random(7)
    setup = [encode_request("SET", b"k%d" % i, b"v" * rnd.randint(0, 3000)) for i in range(40)]
    one, pipelined = zdb_start(), zdb_start()  # the same state in both to begin with
    raw(one.port, b"".join(setup))
    raw(pipelined.port, b"".join(setup))
    requests: list[bytes] = []
    for _ in range(300):
        pick = rnd.random()
        if pick < 0.7:
            requests.append(encode_request(rnd.choice(["GET", "get"]), b"k%d" % rnd.randrange(60)))
        elif pick < 0.75:
            requests.append(encode_request("GET", b""))
        elif pick < 0.8:
            requests.append(encode_request("GET", b"x" * 256))
        elif pick < 0.85:
            requests.append(encode_request("GET", "a", "b"))
        elif pick < 0.9:
            requests.append(encode_request("GeT", b"k1"))
        else:
            requests.append(encode_request("SET", b"k%d" % rnd.randrange(60), b"n" * rnd.randint(1, 99)))
    alone = []
    with socket.create_connection(("127.0.0.1", one.port), timeout=10) as s:
        reader = s.makefile("rb")
        for request in requests:
            s.sendall(request)
            alone.append(read_reply(reader))
    with socket.create_connection(("127.0.0.1", pipelined.port), timeout=10) as s:
        s.sendall(b"".join(requests))
        reader = s.makefile("rb")
        together = [read_reply(reader) for _ in requests]
    assert together == alone
    assert sum(r.startswith(b"$") and r != b"$-1\r\n" for r in together) > 100


def read_reply(reader: object) -> bytes:
    """One RESP2 reply (status, error, integer or bulk) as its raw bytes."""
    line: bytes = reader.readline()  # type: ignore[attr-defined]
    if line[:1] == b"$" and line[1:3] != b"-1":
        return line + reader.read(int(line[1:-2]) + 2)  # type: ignore[attr-defined]
    return line


def test_pipelined_large_values_in_odd_sized_writes_are_stored_exactly(
        zdb_start: ZdbStarter) -> None:
    # Large values are received straight into their own buffers: values cut anywhere
    # (inside a header, the payload, its CRLF), pipelined with small requests, must come
    # back byte for byte, and the data file must hold valid 0-db entries for them.
    from zerostack.zdb.engine.files import iter_data_entries

    z = zdb_start()
    rng = random.Random(12)
    values = {b"big%d" % i: rng.randbytes(rng.choice([64 * 1024, 300_001, 1 << 20]))
              for i in range(12)}
    stream = b"".join(encode_request("SET" if i % 2 else "setx", key, value)
                      + encode_request("GET", "small")
                      for i, (key, value) in enumerate(values.items()))
    stream = encode_request("SET", "small", "s") + stream
    with socket.create_connection(("127.0.0.1", z.port), timeout=10) as s:
        pos = 0
        while pos < len(stream):
            n = rng.choice([1, 2, 3, 5, 4093, 65_535, 65_537, 200_000])
            s.sendall(stream[pos : pos + n])
            pos += n
            if rng.random() < 0.05:
                time.sleep(0.01)  # let the server read what is there so far
        reader = hiredis.Reader()
        replies: list[object] = []
        while len(replies) < 1 + 2 * len(values):
            chunk = s.recv(65536)
            assert chunk, replies
            reader.feed(chunk)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
    assert replies == [b"small"] + [x for key in values for x in (key, b"s")]
    r = z.client()
    for key, value in values.items():
        assert r.get(key) == value
    # A value whose CRLF is wrong is refused and the connection closed; nothing stored.
    bad = encode_request("SET", "broken", b"x" * 100_000)[:-2] + b"XY"
    got, closed = raw(z.port, bad, wait=1.0)
    assert got == b"-Malformed query string\r\n" and closed
    assert r.get("broken") is None
    r.close()
    z.proc.terminate()
    z.proc.wait(timeout=30)
    files = list((z.data / "default").glob("d*"))
    assert len(files) == 1
    data = files[0].read_bytes()
    lengths = [ln for _off, _kl, ln, *_rest in iter_data_entries(data)]
    assert sorted(lengths) == sorted([1, *(len(v) for v in values.values())])
