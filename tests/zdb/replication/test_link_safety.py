"""The replication link against bad or hostile followers, on real servers: replication needs a
password, REPLSYNC positions are validated, one follower's error or lie disconnects only that
follower, and REPLWAIT counts only what was really shipped and confirmed."""

from __future__ import annotations

import os
import signal
import socket

import hiredis
import pytest
import redis

from tests.zdb.conftest import ZdbProcess, ZdbStarter
from tests.zdb.replication.helpers import REPL_AUTH, info, wait_identical, wait_until
from zerostack.zdb.protocol import encode_request
from zerostack.zdb.replication.handshake import ClientHandshake, Unproven, address_text


class RawLink:
    """A hand-driven replication client: sends any command, reads raw replies/frames."""

    def __init__(self, server: ZdbProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        self.reader = hiredis.Reader()

    def send(self, *args: bytes | str | int) -> None:
        self.sock.sendall(encode_request(*args))

    def reply(self) -> object:
        while True:
            got = self.reader.gets()
            if got is not False:
                return got
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("closed")
            self.reader.feed(data)

    def call(self, *args: bytes | str | int) -> object:
        self.send(*args)
        return self.reply()

    def closed(self) -> bool:
        """True once the server closed this connection (frames before that are skipped)."""
        try:
            while True:
                got = self.reader.gets()
                if got is not False:
                    continue
                data = self.sock.recv(1 << 16)
                if not data:
                    return True
                self.reader.feed(data)
        except (TimeoutError, ConnectionResetError):
            return False

    def auth(self, password: str) -> object:
        """The REPLAUTH handshake on this connection; the reply to the proof."""
        handshake = ClientHandshake(password, address_text(self.sock.getpeername()))
        return self.call(*handshake.answer(self.call(*handshake.challenge())))

    def close(self) -> None:
        self.sock.close()


def text(reply: object) -> str:
    return str(reply)


def test_replication_commands_are_refused_without_any_password(zdb_start: ZdbStarter) -> None:
    server = zdb_start()  # every client is admin, but no password protects replication
    r = server.client()
    assert r.execute_command("NSNEW", "private") == b"OK"
    assert r.execute_command("NSSET", "private", "password", "hidden") == b"OK"
    link = RawLink(server)
    try:
        for command in (("REPLINFO", 0), ("REPLHEAD", "private", 0, 28), ("REPLSYNC", "x", 1),
                        ("REPLVOTE", 5, "x:1", 0), ("REPLLEADER", 5, "x:1"), ("PROMOTE",),
                        ("REPLAUTH", "guess")):
            reply = link.call(*command)
            assert isinstance(reply, hiredis.ReplyError), (command, reply)
            assert "Replication is disabled" in text(reply), (command, reply)
        # nothing was streamed: the connection is an ordinary one
        assert link.call("PING") == b"PONG"
    finally:
        link.close()
    assert info(server)["role"] == "primary" and "fenced" not in info(server)


def test_replication_needs_the_replication_or_admin_password(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--admin", "adm", *REPL_AUTH)
    link = RawLink(server)
    try:
        assert "Permission denied" in text(link.call("REPLSYNC", "x", 1))
        assert "in clear is refused" in text(link.call("REPLAUTH", "repl-secret"))
        with pytest.raises(Unproven, match="did not prove"):
            link.auth("wrong")
        assert "Permission denied" in text(link.call("REPLINFO", 1))
        assert link.auth("repl-secret") == b"OK"
        assert link.call("REPLINFO", 1)[2] == 1  # type: ignore[index]
    finally:
        link.close()
    link = RawLink(server)
    try:
        assert link.call("AUTH", "adm") == b"OK"  # the admin password works too
        assert link.call("REPLINFO", 1)[2] == 1  # type: ignore[index]
    finally:
        link.close()
    # a replica with the wrong password never gets a byte
    bad = zdb_start("--replica-of", f"127.0.0.1:{server.port}", "--primary-auth", "nope")
    wait_until(lambda: "did not prove" in info(bad).get("link_error", ""), 20, "refusal")
    assert info(server)["connected_replicas"] == "0"


def test_bad_positions_get_a_clear_error_and_other_replicas_go_on(
        zdb_start: ZdbStarter) -> None:
    primary = zdb_start("--min-replicas", "1", "--datasize", "64K", *REPL_AUTH)
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)
    wait_until(lambda: info(primary).get("connected_replicas") == "1", 20, "replica attached")
    p = primary.client()
    for i in range(50):
        assert p.execute_command("SET", f"k{i}", "v" * 100) == f"k{i}".encode()
    end = int(info(replica)["position_default"].split(":")[1])
    cases = {
        (0, -5): "negative",
        (-1, 28): "negative",
        (0, 10): "inside the file header",
        (0, 31): "not the start of an entry",          # inside the first entry
        (0, end - 50): "not the start of an entry",    # inside the payload of the last one
        (0, end + 1): "past the end",
        (7, 28): "does not exist",
    }
    for (fid, off), why in cases.items():
        link = RawLink(primary)
        try:
            assert link.auth("repl-secret") == b"OK"
            reply = link.call("REPLSYNC", "fake", 1, "default", fid, off)
            assert isinstance(reply, hiredis.ReplyError) and why in text(reply), (fid, off, reply)
            assert "Invalid replication position" in text(reply)
            assert link.call("PING") == b"PONG"  # refused, not turned into a link
        finally:
            link.close()
    # a valid follower that then misbehaves (acknowledges in another term) is dropped alone
    link = RawLink(primary)
    try:
        assert link.auth("repl-secret") == b"OK"
        link.send("REPLSYNC", "liar", 1, "default", 0, end)
        wait_until(lambda: info(primary).get("connected_replicas") == "2", 10, "liar attached")
        link.send("REPLACK", 0, "default", 0, 0, end)  # term 0, generation 0
        assert link.closed()
    finally:
        link.close()
    wait_until(lambda: info(primary).get("connected_replicas") == "1", 10, "liar dropped")
    assert "event=zdb.replication.replica.dropped replica=liar" in primary.log.read_text()
    for i in range(50, 400):  # with --min-replicas 1 every write is still confirmed
        assert p.execute_command("SET", f"k{i}", "w" * 300) == f"k{i}".encode()
    wait_identical(primary, replica)


def test_replwait_counts_only_what_was_shipped_and_confirmed(
        zdb_start: ZdbStarter) -> None:
    primary = zdb_start(*REPL_AUTH)
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}", *REPL_AUTH)
    wait_until(lambda: info(primary).get("connected_replicas") == "1", 20, "replica attached")
    p = primary.client()
    p.execute_command("SET", "a", "1")
    assert p.execute_command("REPLWAIT", 1, 5000) == 1
    # a REPLACK from a connection that is no replication link is refused
    with pytest.raises(redis.ResponseError, match="only sent by replicas"):
        p.execute_command("REPLACK", 1, "default", 9, 999999)
    link = RawLink(primary)
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        assert link.auth("repl-secret") == b"OK"
        end = int(info(primary)["replica0"].split("default@0:")[1].split()[0])
        # claiming more than the primary holds is refused outright
        reply = link.call("REPLSYNC", "fake", 1, "default", 0, end + 10_000_000)
        assert "past the end" in text(reply)
        link.send("REPLSYNC", "fake", 1, "default", 0, end)
        wait_until(lambda: info(primary).get("connected_replicas") == "2", 10, "fake attached")
        for i in range(20):
            p.execute_command("SET", f"b{i}", "x" * 50)
        # the fake follower claims huge positions it was never shipped: not counted
        link.send("REPLACK", 1, "default", 0, 0, 1 << 40, "default", 0, 5, 28)
        assert p.execute_command("REPLWAIT", 1, 300) == 0
        assert p.execute_command("REPLWAIT", 2, 300) == 0
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
        link.close()
    assert p.execute_command("REPLWAIT", 1, 10000) == 1  # the real replica, once resumed
