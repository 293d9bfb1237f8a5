"""Gateway proxies refuse bad input before anything changes (no Caddy is started): a
name owned by another twin or by nobody, a node that is no gateway, an fqdn under the
gateway's domain, a backend that is the node itself or private without a network,
mixed schemes, tls_passthrough with plain backends; an fqdn that is not a test name
without ACME, or whose DNS (a real dnsmasq here) does not name the deployment's owner."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from zerostack.bot.spec import build_deployment
from zerostack.crypto import Identity
from zerostack.gateway import GatewayError
from zerostack.gateway.dns import lookup_txt
from zerostack.node.provisioners import NodeContext, ProvisionError, WorkloadID
from zerostack.node.provisioners.gateway import (
    FqdnProxyProvisioner,
    GatewayService,
    NameProxyProvisioner,
)
from zerostack.node.provisioners.port_forward import PortForwardProvisioner

OWNER = 7
GATEWAY = {"domain": "gw1.grid.test", "ipv4": "198.18.0.10/24", "ipv6": "fd00:5a::10/64"}


def context(tmp_path: Path, **extra: Any) -> NodeContext:
    base: dict[str, Any] = {"gateway": GATEWAY, "name_owners": {"shop": OWNER, "free": None}}
    return NodeContext(tmp_path, Identity.generate(), extra={**base, **extra})


def deploy(*workloads: dict[str, Any]) -> Any:
    key = Identity.generate().public_hex
    return build_deployment({"workloads": list(workloads)}, OWNER, [], None,
                            key_of=lambda t: key)


def proxy(**kw: Any) -> dict[str, Any]:
    return {"type": "gateway_name_proxy", "name": "web", "domain_name": "shop",
            "backends": ["http://198.18.1.50:8080"], **kw}


@pytest.mark.parametrize("change,extra,words", [
    ({"domain_name": "other"}, {}, "cannot check who owns"),
    ({"domain_name": "free"}, {}, "not registered"),
    ({}, {"name_owners": {"shop": 9}}, "belongs to twin 9"),
    ({}, {"gateway": None}, "not a gateway"),
    ({"tls_passthrough": True}, {}, "every backend is https"),
    ({"backends": ["http://198.18.0.10:8080"]}, {}, "this gateway node itself"),
    ({"backends": ["http://[fd00:5a::10]:80"]}, {}, "this gateway node itself"),
    ({"backends": ["http://10.20.1.10:8080"]}, {}, "private"),
    ({"backends": ["http://192.168.1.2:80"]}, {}, "private"),
    ({"backends": ["http://198.18.1.50:80", "https://198.18.1.51:443"]}, {}, "mix"),
])
def test_name_proxy_refusals(tmp_path: Path, change: dict[str, Any], extra: dict[str, Any],
                             words: str) -> None:
    ctx = context(tmp_path, **extra)
    prov = NameProxyProvisioner(ctx)
    dep = deploy(proxy(**change))
    with pytest.raises(ProvisionError, match=words):
        prov.provision(WorkloadID(1, "web"), dep.workloads[0], dep)
    service = GatewayService.of(ctx)
    assert service.routes == {} and not service.caddy.running()
    assert not (tmp_path / "gateway" / "caddy.pid").exists()


@pytest.mark.parametrize("protocol,port,words", [
    ("tcp", 80, "HTTP\\(S\\) proxy"), ("tcp", 443, "HTTP\\(S\\) proxy"),
    ("udp", 53, "grid DNS"), ("tcp", 53, "grid DNS"),
])
def test_the_gateways_own_ports_are_never_forwarded(tmp_path: Path, protocol: str, port: int,
                                                   words: str) -> None:
    prov = PortForwardProvisioner(context(tmp_path))
    dep = deploy({"type": "network", "name": "net", "ip_range": "10.20.0.0/16",
                  "subnet": "10.20.1.0/24"},
                 {"type": "port_forward", "name": "fwd", "protocol": protocol, "port": port,
                  "network": "net", "target": "10.20.1.10:8080"})
    with pytest.raises(ProvisionError, match=words):
        prov.provision(WorkloadID(1, "fwd"), dep.workloads[1], dep)


def test_fqdn_under_the_gateway_domain_is_refused(tmp_path: Path) -> None:
    prov = FqdnProxyProvisioner(context(tmp_path))
    for fqdn in ("gw1.grid.test", "shop.gw1.grid.test"):
        dep = deploy({"type": "gateway_fqdn_proxy", "name": "web", "fqdn": fqdn,
                      "backends": ["http://198.18.1.50:8080"]})
        with pytest.raises(ProvisionError, match="gateway's own domain"):
            prov.provision(WorkloadID(1, "web"), dep.workloads[0], dep)


def test_backends_on_the_network_are_checked_before_the_node_joins_it(
        tmp_path: Path) -> None:
    from zerostack.bot.mesh import keypair
    from zerostack.node.provisioners.network import NetworkProvisioner

    ctx = context(tmp_path)
    NetworkProvisioner(ctx)  # what the node's registry makes: the network side
    prov = NameProxyProvisioner(ctx)
    net = {"type": "network", "name": "net", "ip_range": "10.20.0.0/16",
           "subnet": "10.20.1.0/24", "wireguard_private_key": keypair()[0]}
    for backend, words in (("http://10.20.1.1:80", "itself"),
                           ("http://10.20.1.254:80", "itself"),
                           ("http://10.30.0.5:80", "outside network 'net'")):
        dep = deploy(net, proxy(network="net", backends=[backend]))
        with pytest.raises(ProvisionError, match=words):
            prov.provision(WorkloadID(1, "web"), dep.workloads[1], dep)
    assert GatewayService.of(ctx).routes == {}


@pytest.fixture
def proofs(tmp_path: Path) -> Iterator[str]:
    """A real name server (dnsmasq, loopback only) holding ownership proofs: twin 7's
    for shop.example.org, twin 9's for other.example.org; `IP#PORT`."""
    require_tool("dnsmasq")
    log = tmp_path / "dnsmasq.log"
    # The port is free when picked, but on a busy machine another process may take it
    # before dnsmasq binds it (dnsmasq then exits with 2): another port is tried.
    for _ in range(5):
        port = free_udp_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                 "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                 f"--port={port}", "--user=root", "--pid-file=", "--log-facility=-",
                 "--local=/example.org/",  # its own zone: other names there do not exist
                 f"--txt-record=_zerostack.shop.example.org,zerostack-twin={OWNER}",
                 "--txt-record=_zerostack.other.example.org,zerostack-twin=9",
                 "--txt-record=_zerostack.other.example.org,something else"],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    lookup_txt("_zerostack.shop.example.org", ["127.0.0.1"], timeout=0.2,
                               port=port)
                    break
                except GatewayError:
                    if proc.poll() is not None:
                        break
                    assert time.monotonic() < deadline, "dnsmasq did not answer in 15 s"
            if proc.poll() is None:
                yield f"127.0.0.1#{port}"
                return
            assert proc.returncode == 2 and "in use" in log.read_text(), (
                f"dnsmasq exited with {proc.returncode}: {log.read_text()}")
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(5)
    raise AssertionError(f"dnsmasq found no free port in 5 tries: {log.read_text()}")


def free_udp_port() -> int:
    """A port on 127.0.0.1 free for UDP and for TCP alike (a name server binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@pytest.mark.parametrize("fqdn,acme,passthrough,words", [
    ("shop.farm.test", False, False, None),  # a test name: internal CA, first come
    ("shop.example.org", False, False, "internal CA"),  # a real domain needs ACME
    ("shop.example.org", True, False, None),  # ... and its owner's proof
    ("shop.example.org", False, True, None),  # passthrough: no certificate from us
    ("other.example.org", True, False, "not proven to be twin 7's"),  # twin 9's proof
    ("none.example.org", True, True, "found 0 TXT"),  # no proof at all
])
def test_an_fqdn_is_proxied_for_its_proven_owner_only(
        tmp_path: Path, proofs: str, fqdn: str, acme: bool, passthrough: bool,
        words: str | None) -> None:
    ctx = context(tmp_path, gateway_resolvers=[proofs],
                  **({"gateway_acme_email": "ops@example.org"} if acme else {}))
    prov = FqdnProxyProvisioner(ctx)
    dep = deploy({"type": "gateway_fqdn_proxy", "name": "web", "fqdn": fqdn,
                  "tls_passthrough": passthrough, "backends": ["https://198.18.1.50:8443"]})
    if words is None:
        assert prov.host(dep.workloads[0], dep) == (fqdn, OWNER)
        return
    with pytest.raises(ProvisionError, match=words):
        prov.provision(WorkloadID(1, "web"), dep.workloads[0], dep)
    service = GatewayService.of(ctx)
    assert service.routes == {} and not service.caddy.running()


def test_an_fqdn_whose_owner_cannot_be_checked_is_refused(tmp_path: Path) -> None:
    port = free_udp_port()  # nobody answers there
    ctx = context(tmp_path, gateway_resolvers=[f"127.0.0.1#{port}"],
                  gateway_acme_email="ops@example.org")
    dep = deploy({"type": "gateway_fqdn_proxy", "name": "web", "fqdn": "shop.example.org",
                  "backends": ["http://198.18.1.50:8080"]})
    with pytest.raises(ProvisionError, match=r"cannot check who owns shop\.example\.org"):
        FqdnProxyProvisioner(ctx).provision(WorkloadID(1, "web"), dep.workloads[0], dep)
