"""The REPLAUTH handshake on real servers: a replica pointed at a server that does not know
the password sends it nothing of the password and does not follow it, a relay to the real
primary is refused, a proof works once, a wrong password is refused by both ends, and a
real replica still replicates with the handshake (through a port forward too)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import hiredis
import pytest

from tests.conftest import free_port, zerostack_cmd
from tests.zdb.conftest import ZdbProcess, ZdbStarter
from tests.zdb.replication.helpers import info, wait_identical, wait_until
from zerostack.zdb.protocol import encode_request
from zerostack.zdb.replication.handshake import (
    ClientHandshake,
    Unproven,
    address_text,
    key_of,
    replica_proof,
)

SECRET = "handshake-secret-7f3c9a"
ADMIN = "admin-secret-41d2"


def _requests(data: bytes) -> list[list[bytes]]:
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (got := reader.gets()) is not False:
        out.append(got)
    return out


def _derived(password: str) -> list[bytes]:
    """The password and values derived from it that must not cross the wire."""
    key = key_of(password)
    return [password.encode(), password.encode().hex().encode(), key, key.hex().encode()]


class Listener:
    """A TCP server on loopback in threads; `serve(conn)` handles each connection.
    Everything connections receive is kept, in order, in `received`."""

    def __init__(self, serve: Callable[[socket.socket, Listener], None],
                 port: int = 0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # one entry per connection
        self.lock = threading.Lock()
        self.serve = serve
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
                self.received.append(b"")
            conn.settimeout(30)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def record(self, conn: socket.socket) -> bytes:
        data = conn.recv(65536)
        with self.lock:
            self.received[self.conns.index(conn)] += data
        return data

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    try:
        yield made
    finally:
        for x in made:
            x.close()


def fake_primary(answer: Callable[[list[bytes]], bytes]) -> Callable[[socket.socket, Listener],
                                                                      None]:
    """A server that speaks just enough RESP: `answer` gives the reply to each request."""
    def serve(conn: socket.socket, listener: Listener) -> None:
        reader = hiredis.Reader()
        while data := listener.record(conn):
            reader.feed(data)
            while (request := reader.gets()) is not False:
                conn.sendall(answer(request))
    return serve


def _bulks(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%b\r\n" % (len(i), i) for i in items)


FAKES: dict[str, Callable[[list[bytes]], bytes]] = {
    # answers the challenge with a nonce and a made-up proof
    "made-up proof": lambda req: _bulks(b"ab" * 32, b"cd" * 32) if req[:2] == [
        b"REPLAUTH", b"CHALLENGE"] else b"+OK\r\n",
    # says OK to everything, as a server of the old plain REPLAUTH would
    "says OK": lambda req: b"+OK\r\n",
    # sends back the replica's own nonce as its proof
    "echo": lambda req: _bulks(b"00" * 32, req[2] if len(req) > 2 else b"") if req[:2] == [
        b"REPLAUTH", b"CHALLENGE"] else b"+OK\r\n",
}


@pytest.mark.parametrize("kind", sorted(FAKES))
def test_a_server_that_cannot_prove_the_password_gets_nothing_of_it_and_is_not_followed(
        zdb_start: ZdbStarter, listeners: list[Listener], kind: str) -> None:
    fake = Listener(fake_primary(FAKES[kind]))
    listeners.append(fake)
    replica = zdb_start("--replica-of", f"127.0.0.1:{fake.port}",
                        "--replication-password", SECRET)
    # it keeps trying (a real primary may come back there) but never goes further
    wait_until(lambda: len([r for r in fake.received if r]) >= 3, 30, "three attempts")
    state = info(replica)
    assert state["role"] == "replica" and state["link"] == "connecting", state
    assert "did not prove" in state["link_error"] or "out of protocol" in state[
        "link_error"], state
    assert "event=zdb.replication.primary.unproven" in replica.log.read_text()
    with fake.lock:
        received = list(fake.received)
    everything = b"".join(received)
    for secret in _derived(SECRET):
        assert secret not in everything
    nonces = set()
    for data in filter(None, received):
        requests = _requests(data)
        # a challenge (its nonce and the address dialed) and nothing after it
        assert len(requests) == 1, requests
        verb, step, nonce, address = requests[0]
        assert (verb, step) == (b"REPLAUTH", b"CHALLENGE")
        assert address == f"127.0.0.1:{fake.port}".encode()
        assert len(bytes.fromhex(nonce.decode())) == 32
        nonces.add(nonce)
    assert len(nonces) == len([r for r in received if r])  # a fresh nonce every time
    assert replica.client().execute_command("DBSIZE") == 0


def relay(target: int, rewrite: bytes | None = None) -> Callable[[socket.socket, Listener],
                                                                  None]:
    """Forward a connection to 127.0.0.1:target both ways; with `rewrite`, the address in
    the client's first request (REPLAUTH CHALLENGE) is replaced by it."""
    def serve(conn: socket.socket, listener: Listener) -> None:
        upstream = socket.create_connection(("127.0.0.1", target), timeout=30)

        def back() -> None:
            try:
                while data := upstream.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass
            finally:
                conn.close()
        threading.Thread(target=back, daemon=True).start()
        first = True
        try:
            while data := listener.record(conn):
                if first and rewrite is not None:
                    request = _requests(data)[0]
                    data = encode_request(*request[:3], rewrite)
                first = False
                upstream.sendall(data)
        finally:
            upstream.close()
    return serve


@pytest.mark.parametrize("rewrite", [False, True], ids=["as-is", "address-rewritten"])
def test_a_relay_to_the_real_primary_gets_no_link(
        zdb_start: ZdbStarter, listeners: list[Listener], rewrite: bool) -> None:
    primary = zdb_start("--replication-password", SECRET)
    primary.client().execute_command("SET", "private", "tenant data")
    mitm = Listener(relay(primary.port, f"127.0.0.1:{primary.port}".encode()
                          if rewrite else None))
    listeners.append(mitm)
    replica = zdb_start("--replica-of", f"127.0.0.1:{mitm.port}",
                        "--replication-password", SECRET)
    # as is: the primary refuses a challenge for another address; rewritten: the
    # primary's proof covers its own address, which the replica did not dial
    why = "did not prove" if rewrite else "is not at"
    wait_until(lambda: why in info(replica).get("link_error", ""), 30, why)
    wait_until(lambda: len([r for r in mitm.received if r]) >= 2, 30, "a retry")
    assert info(primary)["connected_replicas"] == "0"
    assert replica.client().execute_command("DBSIZE") == 0
    everything = b"".join(mitm.received)
    assert b"REPLSYNC" not in everything and b"PROOF" not in everything
    for secret in _derived(SECRET):
        assert secret not in everything
    if not rewrite:
        assert "event=zdb.replication.auth.refused" in primary.log.read_text()


def test_a_port_forward_the_primary_advertises_carries_replication_but_no_password(
        zdb_start: ZdbStarter, listeners: list[Listener]) -> None:
    forward_port = free_port()
    primary = zdb_start("--replication-password", SECRET, "--admin", ADMIN,
                        "--advertise", f"127.0.0.1:{forward_port}")
    forward = Listener(relay(primary.port), port=forward_port)  # on the advertised port
    listeners.append(forward)
    p = primary.client()
    p.execute_command("AUTH", ADMIN)
    for i in range(50):
        p.execute_command("SET", f"k{i}", f"value{i}")
    by_repl = zdb_start("--replica-of", f"127.0.0.1:{forward_port}",
                        "--replication-password", SECRET)
    by_admin = zdb_start("--replica-of", f"127.0.0.1:{forward_port}", "--primary-auth", ADMIN)
    wait_until(lambda: info(primary).get("connected_replicas") == "2", 30, "two replicas")
    p.execute_command("SET", "after", "attached")
    wait_identical(primary, by_repl)
    wait_identical(primary, by_admin)
    assert by_admin.client().execute_command("GET", "after") == b"attached"
    everything = b"".join(forward.received)
    assert b"REPLSYNC" in everything  # the links went through the forward
    for secret in _derived(SECRET) + _derived(ADMIN):
        assert secret not in everything


class Link:
    """A hand-driven connection to a server."""

    def __init__(self, server: ZdbProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.reader = hiredis.Reader()
        self.address = address_text(self.sock.getpeername())

    def call(self, *args: bytes | str | int) -> object:
        self.sock.sendall(encode_request(*args))
        while (got := self.reader.gets()) is False:
            data = self.sock.recv(65536)
            assert data, "closed"
            self.reader.feed(data)
        return got

    def close(self) -> None:
        self.sock.close()


def test_a_proof_works_once_and_only_for_its_challenge(zdb_start: ZdbStarter) -> None:
    server = zdb_start("--replication-password", SECRET)
    first = Link(server)
    hs = ClientHandshake(SECRET, first.address)
    answer = first.call(*hs.challenge())
    proof = hs.answer(answer)
    assert first.call(*proof) == b"OK"
    assert isinstance(first.call("REPLINFO", 1), list)
    # the same proof again on the same connection: the challenge is spent
    assert "No REPLAUTH CHALLENGE pending" in str(first.call(*proof))
    first.close()

    second = Link(server)
    try:
        assert "No REPLAUTH CHALLENGE pending" in str(second.call(*proof))
        # the same client nonce again: the server's nonce is new, the old proof is wrong
        replay = second.call(b"REPLAUTH", b"CHALLENGE", hs.challenge()[2],
                             second.address.encode())
        assert isinstance(replay, list) and replay[0] != answer[0]  # type: ignore[index]
        assert "Access denied" in str(second.call(*proof))
        assert "Permission denied" in str(second.call("REPLINFO", 1))
        # a wrong proof spends the challenge: the right one after it is refused too
        hs2 = ClientHandshake(SECRET, second.address)
        right = hs2.answer(second.call(*hs2.challenge()))
        assert "Access denied" in str(second.call(b"REPLAUTH", b"PROOF", b"00" * 32))
        assert "No REPLAUTH CHALLENGE pending" in str(second.call(*right))
        assert "Permission denied" in str(second.call("REPLINFO", 1))
        # the password in clear is refused, naming the handshake
        said = str(second.call("REPLAUTH", SECRET))
        assert "in clear is refused" in said and "REPLAUTH CHALLENGE" in said
        assert "Permission denied" in str(second.call("REPLINFO", 1))
        # bad shapes: a clear error
        assert "Invalid REPLAUTH nonce" in str(second.call("REPLAUTH", "CHALLENGE", "zz",
                                                           second.address))
        assert "Invalid REPLAUTH nonce" in str(second.call("REPLAUTH", "CHALLENGE",
                                                           "ab" * 65, second.address))
        assert "Invalid REPLAUTH address" in str(second.call("REPLAUTH", "CHALLENGE",
                                                             "ab" * 32, "x" * 301))
    finally:
        second.close()
    assert int(info(server)["commands_unauthorized"]) >= 5
    assert "event=zdb.replication.auth.refused" in server.log.read_text()


def test_a_wrong_password_is_refused_by_both_ends(zdb_start: ZdbStarter) -> None:
    primary = zdb_start("--replication-password", SECRET, "--admin", ADMIN)
    # the replica side: the primary cannot prove a password the replica does not share
    replica = zdb_start("--replica-of", f"127.0.0.1:{primary.port}",
                        "--replication-password", "not-the-secret")
    wait_until(lambda: "did not prove" in info(replica).get("link_error", ""), 30, "refusal")
    link = Link(primary)
    try:
        with pytest.raises(Unproven):
            hs = ClientHandshake("not-the-secret", link.address)
            hs.answer(link.call(*hs.challenge()))
        # the primary side: a client that sends a proof under another password anyway
        hs = ClientHandshake("not-the-secret", link.address)
        answer = link.call(*hs.challenge())
        assert isinstance(answer, list) and len(answer) == 3  # replication and admin keys
        forged = replica_proof(key_of("not-the-secret"), hs.nonce,
                               bytes.fromhex(answer[0].decode()), link.address)
        assert "Access denied" in str(link.call(b"REPLAUTH", b"PROOF", forged.hex()))
        assert "Permission denied" in str(link.call("REPLSYNC", "x", 1))
        # the admin password proves itself like the replication password
        hs = ClientHandshake(ADMIN, link.address)
        assert link.call(*hs.answer(link.call(*hs.challenge()))) == b"OK"
        assert isinstance(link.call("REPLINFO", 1), list)
    finally:
        link.close()
    assert info(primary)["connected_replicas"] == "0"
    assert replica.client().execute_command("DBSIZE") == 0
    # the operator's tool: refused before PROMOTE is sent
    done = subprocess.run([*zerostack_cmd(), "zdb", "promote", "--port", str(primary.port),
                           "--password", "not-the-secret"], capture_output=True, text=True,
                          timeout=60)
    said = " ".join(done.stderr.split())
    assert done.returncode != 0 and "did not prove" in said, said
    assert info(primary)["role"] == "primary" and info(primary)["term"] == "1"
