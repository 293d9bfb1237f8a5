"""The grid DNS of a farm's gateways: every gateway node runs dnsmasq (Debian) on its
public addresses, answering for the hosts it serves with the addresses of the gateways
of its farm that are alive and serve that host too, with a one-second TTL. A client
that lists the farm's gateways as name servers keeps resolving when one disappears (its
resolver asks the next server) and is given only gateways that answer.

Health: a gateway asks each other gateway of its farm, every second, for
`http://PEER/.well-known/zerostack-gateway` with the host's name (answered by Caddy for
every host it serves). `answers` and `hosts_file` are pure; `Dnsmasq` runs the server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from zerostack.gateway.config import HEALTH_PATH
from zerostack.gateway.errors import GatewayError
from zerostack.gateway.stale import stop_child, stop_stale
from zerostack.node.hostfs import private_dir

log = logging.getLogger("zerostack.gateway.dns")

TTL = 1
PROBE_TIMEOUT = 0.7
INTERVAL = 1.0
MAX_PEERS = 16


@dataclass(frozen=True)
class Peer:
    """Another gateway of the farm: its node id and public addresses (without prefix)."""

    node: int
    ipv4: str = ""
    ipv6: str = ""

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a)


def answers(hosts: Iterable[str], own: Peer, healthy: Mapping[str, Iterable[Peer]]
            ) -> dict[str, list[str]]:
    """What the DNS says for each host: this gateway's addresses, then those of the
    peers found alive serving it (sorted: the same answer on every gateway)."""
    out: dict[str, list[str]] = {}
    for host in sorted(set(hosts)):
        peers = sorted(healthy.get(host, ()), key=lambda p: p.node)
        out[host] = [*own.addresses, *(a for p in peers for a in p.addresses)]
    return out


def hosts_file(table: Mapping[str, list[str]]) -> str:
    """`table` in /etc/hosts form, one address and one host per line."""
    return "".join(f"{address}\t{host}\n" for host in sorted(table)
                   for address in table[host])


def probe(address: str, host: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the gateway at `address` answers 200 for `host`'s health path."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((address, 80))
            s.sendall(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {host}\r\n"
                      "Connection: close\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return False
    return head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))


def _any_reply(server: str) -> bool:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(0.1)
            s.sendto(query_packet("ready.invalid", 1), (server, 53))
            return bool(s.recv(MAX_ANSWER))
    except OSError:
        return False


class Dnsmasq:
    """dnsmasq on the gateway's public addresses, answering from one hosts file only (no
    recursion, no upstream server, no /etc/hosts)."""

    def __init__(self, root: Path, binary: str = "dnsmasq") -> None:
        self.root = root
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._listen: tuple[str, ...] = ()

    @property
    def hosts(self) -> Path:
        return self.root / "dns-hosts"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure_running(self, listen: tuple[str, ...]) -> None:
        if self.running() and listen == self._listen:
            return
        self.stop()
        private_dir(self.root)
        self._stop_stale()
        if not self.hosts.exists():
            self.hosts.write_text("")
        args = [self.binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--no-poll", f"--addn-hosts={self.hosts}",
                f"--local-ttl={TTL}", f"--neg-ttl={TTL}", "--bind-interfaces", "--port=53",
                "--user=root", "--pid-file=", "--log-facility=-",
                *(f"--listen-address={a}" for a in listen)]
        with open(self.root / "dnsmasq.log", "ab") as out:
            try:
                self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=out)
            except OSError as exc:
                raise GatewayError(f"cannot start dnsmasq: {exc}") from None
        self._listen = listen
        (self.root / "dnsmasq.pid").write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + 5
        # ready once it answers (even "refused"): a SIGHUP before that would end it
        while not _any_reply(listen[0]):
            if self._proc.poll() is not None:
                raise GatewayError(f"dnsmasq exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise GatewayError("dnsmasq did not answer in 5s")
            time.sleep(0.05)
        log.info("event=dns_started pid=%s listen=%s", self._proc.pid, ",".join(listen))

    def _stop_stale(self) -> None:
        """A dnsmasq left by an agent killed with -9 still holds its ports: stop it."""
        stop_stale(self.root / "dnsmasq.pid", f"--addn-hosts={self.hosts}")

    def publish(self, table: Mapping[str, list[str]]) -> bool:
        """Serve `table` from now on; True when it changed."""
        text = hosts_file(table)
        try:
            if self.hosts.read_text() == text:
                return False
        except OSError:
            pass
        private_dir(self.root)
        tmp = self.hosts.with_name(".dns-hosts.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.hosts)
        if self.running():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)
        return True

    def stop(self) -> None:
        stop_child(self._proc)
        self._proc = None


class HealthWatch:
    """A thread that probes the farm's other gateways every second and publishes what
    the DNS answers. `state()` gives (hosts served, own addresses, peers) each round."""

    def __init__(self, dns: Dnsmasq,
                 state: Callable[[], tuple[list[str], Peer, list[Peer]]]) -> None:
        self.dns = dns
        self.state = state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gw-probe")

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gateway-dns",
                                            daemon=True)
            self._thread.start()

    def round(self) -> dict[str, list[str]]:
        hosts, own, peers = self.state()
        peers = peers[:MAX_PEERS]
        checks = {(h, p): self._pool.submit(probe, p.ipv4 or p.ipv6, h)
                  for h in hosts for p in peers if p.addresses}
        healthy: dict[str, list[Peer]] = {}
        for (h, p), fut in checks.items():
            if fut.result():
                healthy.setdefault(h, []).append(p)
        table = answers(hosts, own, healthy)
        if own.addresses and hosts:
            self.dns.ensure_running(own.addresses)
        self.dns.publish(table)
        return table

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.round()
            except Exception:  # a round that fails must not end the watch
                log.exception("event=dns_round_failed")
            self._stop.wait(max(0.05, INTERVAL - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False)
        self.dns.stop()


# ---- a stub resolver (clients, tests and benchmarks of the grid DNS) --------------------

MAX_ANSWER = 512


def query_packet(name: str, qid: int, qtype: int = 1) -> bytes:
    """A DNS query for `name` (type A = 1, AAAA = 28), recursion not asked."""
    labels = b"".join(len(p).to_bytes(1, "big") + p.encode("ascii")
                      for p in name.rstrip(".").split("."))
    return (qid.to_bytes(2, "big") + b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
            + labels + b"\x00" + qtype.to_bytes(2, "big") + b"\x00\x01")


def _skip_name(data: bytes, i: int) -> int:
    while i < len(data):
        n = data[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n
    raise ValueError("truncated name")


def _records(data: bytes, qid: int) -> list[tuple[int, bytes]]:
    """The (type, data) of each answer record of DNS answer `data` to query `qid`;
    ValueError if it is not one."""
    if len(data) < 12 or int.from_bytes(data[:2], "big") != qid or not data[2] & 0x80:
        raise ValueError("not an answer to this query")
    if data[3] & 0x0F:
        raise ValueError(f"DNS error code {data[3] & 0x0F}")
    qd, an = int.from_bytes(data[4:6], "big"), int.from_bytes(data[6:8], "big")
    i = 12
    for _ in range(qd):
        i = _skip_name(data, i) + 4
    out: list[tuple[int, bytes]] = []
    for _ in range(an):
        i = _skip_name(data, i)
        rtype, length = int.from_bytes(data[i:i + 2], "big"), int.from_bytes(data[i + 8:i + 10],
                                                                               "big")
        rdata = data[i + 10:i + 10 + length]
        if len(rdata) != length:
            raise ValueError("truncated answer")
        out.append((rtype, rdata))
        i += 10 + length
    return out


def parse_answer(data: bytes, qid: int) -> list[str]:
    """The A and AAAA addresses of a DNS answer to query `qid`; ValueError if it is not
    one."""
    out: list[str] = []
    for rtype, rdata in _records(data, qid):
        if rtype == 1 and len(rdata) == 4:
            out.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28 and len(rdata) == 16:
            out.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return out


TXT = 16


def parse_txt(data: bytes, qid: int) -> list[str]:
    """The TXT records of a DNS answer to query `qid` (each record's strings joined),
    as text (undecodable bytes replaced); ValueError if it is not one."""
    out: list[str] = []
    for rtype, rdata in _records(data, qid):
        if rtype != TXT:
            continue
        parts, i = [], 0
        while i < len(rdata):
            n = rdata[i]
            parts.append(rdata[i + 1:i + 1 + n])
            i += 1 + n
        out.append(b"".join(parts).decode("utf-8", errors="replace"))
    return out


def system_resolvers(path: Path = Path("/etc/resolv.conf"), limit: int = 3) -> list[str]:
    """The name servers of the node's resolv.conf (at most `limit`, as a resolver uses)."""
    try:
        lines = path.read_text()[:65536].splitlines()
    except OSError:
        return []
    out: list[str] = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and len(out) < limit:
            out.append(words[1].split("%")[0])
    return out


def lookup_txt(name: str, servers: Iterable[str], timeout: float = 2.0,
               port: int = 53) -> list[str]:
    """The TXT records of `name` from the first of `servers` that answers (recursion
    asked: these are the node's own resolvers). GatewayError when none does."""
    servers = list(servers)
    for server in servers:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        qid = int.from_bytes(os.urandom(2), "big")
        packet = bytearray(query_packet(name, qid, TXT))
        packet[2] |= 0x01  # recursion desired
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(bytes(packet), (server, port))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    data, _ = s.recvfrom(MAX_TXT_ANSWER)
                    try:
                        return parse_txt(data, qid)
                    except ValueError as exc:
                        if "error code 3" in str(exc):  # NXDOMAIN: no such name
                            return []
                        continue
        except OSError:
            continue
    raise GatewayError(f"no name server of {servers[:3]} answered for {name}")


MAX_TXT_ANSWER = 4096


def resolve(name: str, servers: Iterable[str], timeout: float = 0.5,
            qtype: int = 1) -> list[str]:
    """Ask each server in turn (UDP, `timeout` each) until one answers; its addresses.
    GatewayError when none does."""
    for server in servers:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        qid = int.from_bytes(os.urandom(2), "big")
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(query_packet(name, qid, qtype), (server, 53))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    data, _ = s.recvfrom(MAX_ANSWER)
                    try:
                        return parse_answer(data, qid)
                    except ValueError:
                        continue
        except OSError:
            continue
    raise GatewayError(f"no name server of {list(servers)} answered for {name}")
