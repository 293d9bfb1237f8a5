"""A gateway name whose contract is in grace: a real Caddy in a namespace of the test
answers 503 for the name (HTTPS and plain HTTP) without reaching the backend, stays
paused when Caddy is rebuilt or the route provisioned again, and proxies again on
resume."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.gateway.client import Answer, fetch
from zerostack.crypto import Identity
from zerostack.gateway import Route, Upstream, render
from zerostack.gateway.config import PAUSED_BODY
from zerostack.grid.hosts import inside, listen_socket
from zerostack.node.provisioners import WorkloadID
from zerostack.node.provisioners.base import NodeContext
from zerostack.node.provisioners.gateway import GatewayService, NameProxyProvisioner
from zerostack.workloads import GatewayNameProxyWorkload

HOST = "shop.gw1.grid.test"


def test_a_paused_route_renders_a_static_503_on_both_servers() -> None:
    up = (Upstream("http", "10.20.1.10", 8080),)
    cfg = render([Route("c1-site", HOST, up, paused=True)], "/s", "/d")
    servers = cfg["apps"]["http"]["servers"]
    (https,) = servers["https"]["routes"]
    health, http = servers["http"]["routes"]
    for route in (https, http):
        handler = route["handle"][0]
        assert handler["handler"] == "static_response" and handler["status_code"] == 503
        assert "reverse_proxy" not in str(route)
    assert health["handle"][0]["status_code"] == 200  # the gateway itself still serves it
    live = render([Route("c1-site", HOST, up)], "/s", "/d")
    assert live["apps"]["http"]["servers"]["https"]["routes"][0]["handle"][0]["handler"] == \
        "reverse_proxy"


class Backend:
    """An HTTP server in the test's namespace that records the paths it was asked for."""

    def __init__(self, ns: str) -> None:
        self.sock = listen_socket(ns, "127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                    self.paths.append(line.split(" ")[1] if " " in line else line)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
                                 b"Connection: close\r\n\r\nbackend")
                except OSError:
                    continue


@pytest.fixture
def ns() -> Iterator[str]:
    require_root()
    require_tool("caddy")
    name = f"zgpz{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def get(ns: str, service: GatewayService, url: str) -> Answer | None:
    try:
        return fetch(ns, url, "127.0.0.1", service.caddy.root_certificate, timeout=3)
    except OSError:
        return None


def until(ns: str, service: GatewayService, url: str, status: int) -> Answer:
    deadline = time.monotonic() + 30
    while True:
        r = get(ns, service, url)
        if r is not None and r.status == status:
            return r
        assert time.monotonic() < deadline, (url, r)
        time.sleep(0.2)


def test_pause_answers_503_and_resume_proxies_again(ns: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Backend(ns)
    node = NodeContext(tmp_path / "node", Identity.generate(),
                       extra={"gateway": {"domain": "gw1.grid.test", "ipv4": "198.18.0.10/24"}})
    prov = NameProxyProvisioner(node)
    service = prov.service
    monkeypatch.setattr(service.watch, "start", lambda: None)  # no grid DNS here
    wid = WorkloadID(1, "site")
    spec = GatewayNameProxyWorkload.model_validate({
        "type": "gateway_name_proxy", "name": "site", "domain_name": "shop",
        "backends": [f"http://198.18.0.20:{backend.port}"]})
    route = Route(wid.key, HOST, (Upstream("http", "127.0.0.1", backend.port),),
                  health_interval=1)
    try:
        with inside(ns):
            service.put(route)
        assert until(ns, service, f"https://{HOST}/", 200).body == b"backend"

        with inside(ns):
            note = prov.pause(wid, spec)
            assert note is not None and note.startswith("paused")
            assert prov.pause(wid, spec) == note  # idempotent
        for url in (f"https://{HOST}/while-paused", f"http://{HOST}/while-paused"):
            r = get(ns, service, url)
            assert r is not None and r.status == 503, (url, r)
            assert r.body == PAUSED_BODY.encode()
        assert "/while-paused" not in backend.paths

        # the route provisioned again, or a Caddy rebuilt from the routes: still paused
        with inside(ns):
            service.put(route)
            service.caddy.stop()
            assert service.present(wid.key)
        assert until(ns, service, f"https://{HOST}/again", 503).body == PAUSED_BODY.encode()
        assert "/again" not in backend.paths

        with inside(ns):
            prov.resume(wid, spec)
            prov.resume(wid, spec)
        r = get(ns, service, f"https://{HOST}/resumed")
        assert r is not None and r.status == 200 and r.body == b"backend", r
        assert "/resumed" in backend.paths
    finally:
        with inside(ns):
            service.close()
        backend.sock.close()
