"""TLS passthrough with real processes: Caddy and the TLS front (HAProxy) run by the
gateway provisioners in a gateway namespace on a grid's WAN, a backend holding its own
self-signed certificate on another host, and a client on a third. The client sees the
backend's certificate for a passthrough name and Caddy's for the others; a name owned
by another twin is refused and loses its route when it changes hands; garbage and a
hello without a name are closed without touching other connections; a reload drops no
open connection; a killed front comes back; cancel removes the route and, with the last
passthrough name, the front."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root, require_tool
from zerostack.bot.spec import build_deployment
from zerostack.crypto import Identity
from zerostack.grid import LocalGrid, inside
from zerostack.grid.topology import Host
from zerostack.node.provisioners import NodeContext, ProvisionError, WorkloadID
from zerostack.node.provisioners.gateway import GatewayService, NameProxyProvisioner

DOMAIN = "gw1.grid.test"
OWNER = 7
PORT = 8443


def self_signed(where: Path, name: str) -> tuple[Path, Path]:
    key, cert = where / f"{name}.key", where / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)
    return key, cert


class TlsBackend:
    """A TLS server with its own certificate: answers one HTTP request per connection
    with `body`."""

    def __init__(self, ns: str, address: str, key: Path, cert: Path, body: bytes) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.body = body
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, PORT))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 8192:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                            b"\r\n\r\n%s" % (len(self.body), self.body))
        except OSError:
            pass  # health checks connect and leave; clients may go away
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


@dataclass
class Env:
    gw: Host
    backend: Host
    client: Host
    ctx: NodeContext
    cert: Path
    root: Path
    restarted: NodeContext | None = None  # the context of an agent started again

    def connect(self, sni: str | None, cafile: Path | None = None) -> ssl.SSLSocket:
        """A TLS connection from the client to the gateway's :443 (handshake done)."""
        with inside(self.client.namespace):
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(8)
        raw.connect((self.gw.address, 443))
        ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else \
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if cafile is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx.wrap_socket(raw, server_hostname=sni)

    def caddy_root(self) -> Path:
        return self.ctx.data_dir / "gateway" / "caddy" / "pki" / "authorities" / "local" / \
            "root.crt"


def get(tls: ssl.SSLSocket, host: str) -> bytes:
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while len(data) < 1 << 16:
        try:
            chunk = tls.recv(65536)
        except ssl.SSLZeroReturnError:
            break
        if not chunk:
            break
        data += chunk
    tls.close()
    return data


def deploy(**kw: Any) -> Any:
    key = Identity.generate().public_hex
    return build_deployment({"workloads": [{"type": "gateway_name_proxy", **kw}]}, OWNER, [],
                            None, key_of=lambda t: key)


def until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    require_root()
    for tool in ("caddy", "haproxy", "openssl"):
        require_tool(tool)
    grid = LocalGrid(tmp_path / "grid", netns=True, ledger_port=0)
    grid.root.mkdir(parents=True)
    backend_server: TlsBackend | None = None
    service: GatewayService | None = None
    e: Env | None = None
    try:
        for s in grid._make_wan():
            s.close()
        gw = grid._add_host("gw", 0, False)
        backend = grid._add_host("backend", 0, False)
        client = grid._add_host("client", 0, False)
        key, cert = self_signed(tmp_path, f"secure.{DOMAIN}")
        backend_server = TlsBackend(backend.namespace, backend.address, key, cert,
                                    b"hello-from-the-tls-backend")
        ctx = NodeContext(tmp_path / "node", Identity.generate(), extra={
            "gateway": {"domain": DOMAIN, "ipv4": f"{gw.address}/24"},
            "name_owners": {"secure": OWNER, "shop": OWNER, "vault": OWNER}})
        service = GatewayService.of(ctx)
        e = Env(gw, backend, client, ctx, cert, tmp_path)
        yield e
    finally:
        if service is not None:
            service.close()
        if e is not None and e.restarted is not None:
            GatewayService.of(e.restarted).close()
        if backend_server is not None:
            backend_server.stop()
        grid.stop()


def provision_with(prov: NameProxyProvisioner, wid: WorkloadID, spec: Any) -> None:
    dep = build_deployment({"workloads": [spec.model_dump()]}, OWNER, [], None,
                           key_of=lambda t: Identity.generate().public_hex)
    prov.provision(wid, dep.workloads[0], dep)


def provision(env: Env, wid: WorkloadID, **kw: Any) -> None:
    dep = deploy(**kw)
    prov = NameProxyProvisioner(env.ctx)
    with inside(env.gw.namespace):  # where the agent runs: the node's own namespace
        prov.provision(wid, dep.workloads[0], dep)


def test_tls_passthrough(env: Env) -> None:
    backend = f"https://{env.backend.address}:{PORT}"
    service = GatewayService.of(env.ctx)
    secure, shop = WorkloadID(1, "secure"), WorkloadID(1, "shop")
    # an ordinary name first (Caddy on :443, no front), then a passthrough one
    provision(env, shop, name="shop", domain_name="shop", backends=[backend],
              health_interval=1)
    assert not service.front.running()
    provision(env, secure, name="secure", domain_name="secure", backends=[backend],
              tls_passthrough=True, health_interval=1)
    assert service.front.running()

    # the passthrough name: the client sees the backend's own certificate
    own = ssl.PEM_cert_to_DER_cert(env.cert.read_text())
    until("the passthrough name", lambda: env.connect(f"secure.{DOMAIN}", env.cert)
          .getpeercert(binary_form=True) == own)
    tls = env.connect(f"secure.{DOMAIN}", env.cert)
    assert tls.getpeercert(binary_form=True) == own
    assert get(tls, f"secure.{DOMAIN}").endswith(b"hello-from-the-tls-backend")
    # any other name: Caddy's certificate from its internal CA, proxied as before
    until("shop through caddy behind the front", lambda: get(
        env.connect(f"shop.{DOMAIN}", env.caddy_root()), f"shop.{DOMAIN}")
        .endswith(b"hello-from-the-tls-backend"))
    shop_tls = env.connect(f"shop.{DOMAIN}", env.caddy_root())
    assert shop_tls.getpeercert(binary_form=True) != own
    shop_tls.close()

    # the front's files are private, its control a unix socket only
    front = service.front
    assert stat.S_IMODE(os.stat(front.root).st_mode) == 0o700
    for path in (front.config_file, front.master_socket, front.stats_socket):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    listening = subprocess.run(["ip", "netns", "exec", env.gw.namespace, "ss", "-Hltn"],
                               capture_output=True, text=True, check=True).stdout
    ports = {line.split()[3].rsplit(":", 1)[1] for line in listening.splitlines()}
    assert ports <= {"53", "80", "443", "44300"}, listening  # dns, caddy, front
    assert "127.0.0.1:44300" in listening

    # garbage, no hello at all, and a hello without a name are closed; an open
    # passthrough connection and new clients are untouched
    held = env.connect(f"secure.{DOMAIN}", env.cert)
    with inside(env.client.namespace):
        junk = socket.create_connection((env.gw.address, 443), timeout=8)
    junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    assert junk.recv(100) == b""
    junk.close()
    with pytest.raises((ssl.SSLError, OSError)):
        env.connect(None).close()
    assert get(held, f"secure.{DOMAIN}").endswith(b"hello-from-the-tls-backend")

    # a reload (another passthrough name) drops no open connection
    held = env.connect(f"secure.{DOMAIN}", env.cert)
    vault = WorkloadID(2, "vault")
    provision(env, vault, name="vault", domain_name="vault", backends=[backend],
              tls_passthrough=True)
    assert get(held, f"secure.{DOMAIN}").endswith(b"hello-from-the-tls-backend")
    assert get(env.connect(f"vault.{DOMAIN}"), f"vault.{DOMAIN}").endswith(
        b"hello-from-the-tls-backend")

    # another twin's name: refused, nothing of the others changes
    env.ctx.extra["name_owners"] = {**env.ctx.extra["name_owners"], "vault": 9}
    with pytest.raises(ProvisionError, match="belongs to twin 9"):
        provision(env, vault, name="vault", domain_name="vault", backends=[backend],
                  tls_passthrough=True)
    assert vault.key not in service.routes
    with pytest.raises((ssl.SSLError, OSError)):  # now Caddy's, which has no certificate
        env.connect(f"vault.{DOMAIN}").close()
    assert env.connect(f"secure.{DOMAIN}", env.cert).getpeercert(binary_form=True) == own

    # the front killed: found dead at the next check and started again with the routes
    pid = front._proc.pid if front._proc else 0
    os.kill(pid, signal.SIGKILL)
    front._proc.wait() if front._proc else None
    prov = NameProxyProvisioner(env.ctx)
    with inside(env.gw.namespace):
        assert prov.exists(secure, deploy(name="secure", domain_name="secure",
                                          backends=[backend], tls_passthrough=True)
                           .workloads[0])
    assert front.running() and front._proc is not None and front._proc.pid != pid
    until("the passthrough name after a restart of the front", lambda: env.connect(
        f"secure.{DOMAIN}", env.cert).getpeercert(binary_form=True) == own)

    # the agent killed with -9 and started again: a new agent finds nothing in memory,
    # the old front and Caddy still running; it provisions from the contracts, stopping
    # the old processes first, and serves the same routes
    old_front, old_caddy = front._proc, service.caddy._proc
    assert old_front is not None and old_caddy is not None
    restarted = NodeContext(env.ctx.data_dir, env.ctx.identity, extra={
        k: v for k, v in env.ctx.extra.items() if k != "gateway_service"})
    env.restarted = restarted
    prov = NameProxyProvisioner(restarted)
    spec = deploy(name="secure", domain_name="secure", backends=[backend],
                  tls_passthrough=True).workloads[0]
    shop_spec = deploy(name="shop", domain_name="shop", backends=[backend],
                       health_interval=1).workloads[0]
    with inside(env.gw.namespace):
        assert not prov.exists(secure, spec)
        provision_with(prov, secure, spec)
        provision_with(prov, shop, shop_spec)
        assert prov.exists(secure, spec) and prov.exists(shop, shop_spec)
    assert old_front.wait(10) is not None and old_caddy.wait(10) is not None
    front = GatewayService.of(restarted).front
    assert front.running()
    until("the passthrough name after an agent restart", lambda: env.connect(
        f"secure.{DOMAIN}", env.cert).getpeercert(binary_form=True) == own)

    # cancel: the route goes; with the last passthrough name the front stops and Caddy
    # takes :443 back
    with inside(env.gw.namespace):
        prov.deprovision(secure, spec)
    assert not front.running()
    with pytest.raises((ssl.SSLError, OSError)):
        env.connect(f"secure.{DOMAIN}", env.cert).close()
    assert get(env.connect(f"shop.{DOMAIN}", env.caddy_root()), f"shop.{DOMAIN}").endswith(
        b"hello-from-the-tls-backend")
    assert not subprocess.run(["pgrep", "-f", str(front.config_file)],
                              capture_output=True).stdout
