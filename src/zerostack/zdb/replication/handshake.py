"""REPLAUTH: the mutual challenge-response replicas, peers and operators authenticate
replication links with; the password never crosses the wire and each side proves it knows it.

    client -> REPLAUTH CHALLENGE <client nonce, hex> <address the client dialed>
    server <- [<server nonce, hex>, <primary proof, hex> ...]  (one proof per password it has)
    client -> REPLAUTH PROOF <client proof, hex>                (only once a proof checked out)
    server <- OK                                               (the link may replicate now)

Proofs are HMAC-SHA256 under a key derived from the password (PBKDF2), over a label that
tells the two directions apart, both nonces and the address the client dialed. A server
answers only a challenge naming one of its own addresses, so a party that relays a client
to the real server (pointing it there through a lying directory) gets a proof the client
refuses. A server keeps one challenge per connection and forgets it at the first proof.

This module holds no I/O but `call`, a blocking client for operators' tools and tests.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import socket
import struct

import hiredis

from zerostack.zdb.protocol import encode_request

NONCE_BYTES = 32
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 16, 64
MAX_ADDRESS = 300
PROOF_BYTES = 32
KDF_SALT = b"zerostack-zdb-repl key v1"
KDF_ROUNDS = 100_000
PRIMARY_LABEL = b"zerostack-zdb-repl primary"
REPLICA_LABEL = b"zerostack-zdb-repl replica"
PLAIN_REFUSED = ("REPLAUTH with a password in clear is refused: authenticate with the "
                 "REPLAUTH CHALLENGE / REPLAUTH PROOF handshake (docs/zdb-replication.md)")
CALL_TIMEOUT = 10.0
MAX_REPLY = 1 << 20


class Unproven(Exception):
    """The server did not prove it knows the password, or answered out of protocol."""


@functools.lru_cache(maxsize=16)
def key_of(password: str) -> bytes:
    """The HMAC key a password stands for (slow to derive: guessing offline costs)."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), KDF_SALT, KDF_ROUNDS)


def _message(label: bytes, client_nonce: bytes, server_nonce: bytes, address: str) -> bytes:
    parts = [client_nonce, server_nonce, address.encode()]
    return label + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def primary_proof(key: bytes, client_nonce: bytes, server_nonce: bytes, address: str) -> bytes:
    return hmac.new(key, _message(PRIMARY_LABEL, client_nonce, server_nonce, address),
                    hashlib.sha256).digest()


def replica_proof(key: bytes, client_nonce: bytes, server_nonce: bytes, address: str) -> bytes:
    return hmac.new(key, _message(REPLICA_LABEL, client_nonce, server_nonce, address),
                    hashlib.sha256).digest()


def address_text(sockaddr: object) -> str:
    """A socket address as both ends write it: `1.2.3.4:5`, `[fd00::1]:5`, `unix:PATH`
    (an IPv4 address seen through an IPv6 socket is written as IPv4)."""
    if isinstance(sockaddr, str | bytes):
        path = sockaddr.decode("utf-8", "replace") if isinstance(sockaddr, bytes) else sockaddr
        return f"unix:{path}"
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = str(sockaddr[0]), int(sockaddr[1])
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return f"{host}:{port}"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return ""


def escape(text: str | bytes, limit: int = 200) -> str:
    """Text from the other end, safe on one log or terminal line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[:limit].encode("unicode_escape").decode("ascii").replace('"', "'")


def _hex(value: object, size: int | None = None) -> bytes | None:
    """Bytes from a hex bulk string (None when it is not one, or not of `size` bytes)."""
    if not isinstance(value, bytes) or len(value) > 2 * MAX_NONCE_BYTES:
        return None
    try:
        raw = bytes.fromhex(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return raw if size is None or len(raw) == size else None


class ClientHandshake:
    """The client's side: the challenge to send, then from the server's answer the proof
    to send back, or Unproven. Drive it over any connection."""

    def __init__(self, password: str, address: str) -> None:
        self.key = key_of(password)
        self.address = address
        self.nonce = os.urandom(NONCE_BYTES)

    def challenge(self) -> tuple[bytes, ...]:
        return (b"REPLAUTH", b"CHALLENGE", self.nonce.hex().encode(), self.address.encode())

    def answer(self, reply: object) -> tuple[bytes, ...]:
        """The REPLAUTH PROOF request for the server's answer to the challenge."""
        if isinstance(reply, hiredis.ReplyError):
            raise Unproven(f"the server refused the challenge: {escape(str(reply))}")
        if not isinstance(reply, list) or not 2 <= len(reply) <= 3:
            raise Unproven("the server answered the challenge out of protocol")
        server_nonce = _hex(reply[0])
        if server_nonce is None or not MIN_NONCE_BYTES <= len(server_nonce) <= MAX_NONCE_BYTES:
            raise Unproven("the server answered the challenge with a bad nonce")
        expected = primary_proof(self.key, self.nonce, server_nonce, self.address)
        proven = False
        for given in reply[1:]:
            proof = _hex(given, PROOF_BYTES)
            if proof is not None and hmac.compare_digest(proof, expected):
                proven = True
        if not proven:
            raise Unproven(f"the server at {self.address} did not prove it knows the "
                           "password: it is not the expected server (or the passwords "
                           "differ)")
        proof = replica_proof(self.key, self.nonce, server_nonce, self.address)
        return (b"REPLAUTH", b"PROOF", proof.hex().encode())


class ServerChallenge:
    """The server's side of one challenge: parsed from REPLAUTH CHALLENGE, answered, and
    checked against the client's proof once."""

    def __init__(self, client_nonce: bytes, address: str) -> None:
        self.client_nonce = client_nonce
        self.address = address
        self.nonce = os.urandom(NONCE_BYTES)

    @staticmethod
    def parse(args: list[bytes]) -> ServerChallenge | str:
        """From [REPLAUTH, CHALLENGE, nonce, address]; a string says what is wrong."""
        if len(args) != 4:
            return "Invalid arguments: REPLAUTH CHALLENGE <nonce hex> <address you dialed>"
        nonce = _hex(args[2])
        if nonce is None or not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            return (f"Invalid REPLAUTH nonce: {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes "
                    "in hex")
        if not args[3] or len(args[3]) > MAX_ADDRESS:
            return "Invalid REPLAUTH address"
        try:
            address = args[3].decode("ascii")
        except UnicodeDecodeError:
            return "Invalid REPLAUTH address"
        return ServerChallenge(nonce, address)

    def answer(self, keys: list[bytes]) -> list[bytes]:
        """The reply's items: this side's nonce and one proof per key, in hex."""
        return [self.nonce.hex().encode()] + [
            primary_proof(k, self.client_nonce, self.nonce, self.address).hex().encode()
            for k in keys]

    def check(self, keys: list[bytes], given: bytes) -> bool:
        """Whether `given` (hex) is the client's proof under one of `keys`."""
        proof = _hex(given, PROOF_BYTES)
        if proof is None:
            return False
        ok = False
        for k in keys:  # every key compared: the time does not tell which one matched
            if hmac.compare_digest(proof, replica_proof(k, self.client_nonce, self.nonce,
                                                        self.address)):
                ok = True
        return ok


def call(host: str, port: int, password: str, *requests: tuple[bytes | str | int, ...],
         timeout: float = CALL_TIMEOUT) -> list[object]:
    """Authenticate a new connection to host:port with `password` (mutually), send
    `requests` on it and return their replies (error replies included, as
    hiredis.ReplyError). Raises Unproven when the server does not prove the password."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        parser = hiredis.Reader()
        received = 0

        def reply() -> object:
            nonlocal received
            while (got := parser.gets()) is False:
                data = sock.recv(65536)
                if not data:
                    raise Unproven(f"{host}:{port} closed the connection")
                received += len(data)
                if received > MAX_REPLY:
                    raise Unproven(f"{host}:{port} answered more than {MAX_REPLY} bytes")
                parser.feed(data)
            return got

        hs = ClientHandshake(password, address_text(sock.getpeername()))
        sock.sendall(encode_request(*hs.challenge()))
        proof = hs.answer(reply())
        sock.sendall(encode_request(*proof))
        done = reply()
        if done != b"OK":
            raise Unproven(f"{host}:{port} refused the proof: {escape(str(done))}")
        sock.sendall(b"".join(encode_request(*r) for r in requests))
        return [reply() for _ in requests]
