"""Two gateways of one farm on two sites serving the same fqdn, a backend and a client on
the WAN, and a client loop that measures how long the URL stops answering when one
gateway host is cut (its link down, every process of its agent killed). Shared by the
failover test and `bench.gateway_bench`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.gateway.client import fetch
from zerostack.bot import ThreeBot
from zerostack.gateway import Caddy, GatewayError
from zerostack.gateway.dns import resolve
from zerostack.grid import GridNode, LocalGrid
from zerostack.grid.hosts import preexec
from zerostack.grid.topology import Host

FQDN = "shop.farm.test"
REQUEST_EVERY = 0.1
CONNECT_TIMEOUT = 1.0
RESOLVER_TIMEOUT = 0.5


@dataclass
class Sample:
    start: float
    end: float
    ok: bool
    via: str = ""


@dataclass
class Loop:
    """A client asking for the URL every REQUEST_EVERY s: resolve through the farm's
    gateways (each server in turn), then each address given in turn."""

    client: Host
    servers: list[str]
    cafiles: list[Path]
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def once(self) -> Sample:
        start = time.monotonic()
        try:
            with _in(self.client.namespace):
                addresses = resolve(FQDN, self.servers, timeout=RESOLVER_TIMEOUT)
        except GatewayError:
            return Sample(start, time.monotonic(), False)
        for address in addresses:
            try:
                r = fetch(self.client.namespace, f"https://{FQDN}/", address, self.cafile(),
                          timeout=CONNECT_TIMEOUT)
            except OSError:
                continue
            if r.status == 200 and b"backend" in r.body:
                return Sample(start, time.monotonic(), True, address)
        return Sample(start, time.monotonic(), False)

    def cafile(self) -> Path:
        """Both gateways' internal CA roots in one file (each gateway has its own CA)."""
        path = Path(tempfile.gettempdir()) / f"zs-gw-roots-{os.getpid()}.pem"
        if not path.exists():
            path.write_bytes(b"".join(p.read_bytes() for p in self.cafiles))
        return path

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.once())
            self._stop.wait(REQUEST_EVERY)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


@contextlib.contextmanager
def _in(ns: str) -> Iterator[None]:
    from zerostack.grid import inside
    with inside(ns):
        yield


def interruption(samples: list[Sample], cut: float) -> float:
    """Seconds without a successful answer across the cut: from the last success that
    started before it to the first success after it."""
    before = [s.end for s in samples if s.ok and s.start <= cut]
    after = [s.end for s in samples if s.ok and s.start > cut]
    if not after:
        return float("inf")
    return min(after) - (max(before) if before else cut)


class TwoGateways:
    def __init__(self, root: Path) -> None:
        self.grid = LocalGrid(root, ledger_port=free_port(), netns=True,
                              status_port=free_port())
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.gateways: list[GridNode] = []

    def start(self) -> None:
        g = self.grid
        client = g.start_ledger()
        for name, site in (("gw1", 0), ("gw2", 1)):
            self.gateways.append(g.start_node(client, name, site=site))
        self.backend = g._add_host("backend", 0, False)
        self.client = g._add_host("client", 1, False)
        www = g.root / "www"
        www.mkdir()
        (www / "index.html").write_text("hello-from-backend\n")
        self.backend_proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "8080", "--bind", self.backend.address,
             "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=preexec(self.backend.namespace))
        farmer = g.identity("farmer")
        ledger = ThreeBot(g.url, farmer).ledger
        for i, gw in enumerate(self.gateways, start=1):
            assert gw.host is not None
            ledger.send(farmer, "node.gateway", {
                "node": gw.node_id, "domain": f"gw{i}.grid.test",
                "ipv4": f"{gw.host.address}/24", "ipv6": f"{gw.host.address6}/64"})
        alice = g.identity("alice")
        ledger.register_twin(alice)
        proxy = {"type": "gateway_fqdn_proxy", "name": "shop", "fqdn": FQDN,
                 "backends": [f"http://{self.backend.address}:8080"], "health_interval": 1}
        with ThreeBot(g.url, alice) as bot:
            cids = [bot.deploy(bot.build({"workloads": [proxy]}, [], None), gw.node_id)
                    for gw in self.gateways]
            for cid in cids:
                c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                             and bool(c.get("report")), timeout=120)
                assert c["state"] == "deployed", c["report"]
        self.wait_both()

    @property
    def servers(self) -> list[str]:
        return [gw.host.address for gw in self.gateways if gw.host is not None]

    def loop(self) -> Loop:
        return Loop(self.client, self.servers,
                    [Caddy(gw.data / "gateway").root_certificate for gw in self.gateways])

    def wait_both(self, timeout: float = 90.0) -> None:
        """Until every gateway's DNS answers with both gateways and both serve the URL."""
        deadline = time.monotonic() + timeout
        want = set(self.servers)
        loop = self.loop()
        while True:
            got: list[set[str]] = []
            for server in self.servers:
                try:
                    with _in(self.client.namespace):
                        got.append(set(resolve(FQDN, [server], timeout=0.5)))
                except GatewayError:
                    got.append(set())
            if all(g == want for g in got) and loop.once().ok:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"gateways never both healthy: {got}")
            time.sleep(0.5)

    def cut(self, i: int) -> None:
        """The whole gateway host disappears: link down, every process of its node killed."""
        gw = self.gateways[i]
        assert gw.host is not None
        subprocess.run(["ip", "-n", gw.host.namespace, "link", "set", gw.host.uplink, "down"],
                       check=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait()

    def restore(self, i: int) -> None:
        """The host comes back: link up, its agent started again (which rebuilds its Caddy
        and DNS from the contracts)."""
        gw = self.gateways[i]
        assert gw.host is not None
        ns, site = gw.host.namespace, gw.host.site
        subprocess.run(["ip", "-n", ns, "link", "set", gw.host.uplink, "up"], check=True)
        # a link that went down lost its routes (and its IPv6 address): put them back
        for args in (["addr", "replace", f"{gw.host.address}/24", "dev", gw.host.uplink],
                     ["addr", "replace", f"{gw.host.address6}/64", "dev", gw.host.uplink,
                      "nodad"],
                     ["route", "replace", "default", "via", site.router_v4],
                     ["-6", "route", "replace", "default", "via", site.router_v6]):
            subprocess.run(["ip", "-n", ns, *args], check=True)
        log = open(self.grid.root / f"{gw.name}-again.log", "ab")  # noqa: SIM115
        gw.proc = subprocess.Popen(list(gw.proc.args), stdout=log, stderr=log,  # type: ignore[arg-type]
                                   start_new_session=True,
                                   preexec_fn=preexec(gw.host.namespace))
        self.grid._procs.append(gw.proc)

    def stop(self) -> None:
        if self.backend_proc is not None:
            self.backend_proc.kill()
            self.backend_proc.wait()
        self.grid.stop()
