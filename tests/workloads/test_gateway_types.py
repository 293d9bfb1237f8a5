"""Gateway workload specs: backends, names and fqdns are checked where they are written."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from zerostack.workloads import Workload
from zerostack.workloads.types import parse_backend

W: TypeAdapter[Any] = TypeAdapter(Workload)


def proxy(**kw: Any) -> dict[str, Any]:
    return {"type": "gateway_name_proxy", "name": "web", "domain_name": "shop",
            "backends": ["http://10.20.1.10:8080"], **kw}


def test_a_name_proxy_with_its_defaults() -> None:
    w = W.validate_python(proxy())
    assert (w.https_redirect, w.tls_passthrough, w.network, w.health_path) == (
        True, False, None, "/")
    assert parse_backend("https://[fd00:5a::20]:443") == ("https", "fd00:5a::20", 443)
    # checked (against this node's and private addresses too) as the IPv4 it is dialled as
    assert parse_backend("http://[::ffff:10.20.1.10]:80") == ("http", "10.20.1.10", 80)


@pytest.mark.parametrize("backend,words", [
    ("10.20.1.10:8080", "not a URL"),
    ("http://web:8080", "not a URL"),
    ("ftp://10.20.1.10:21", "not a URL"),
    ("http://10.20.1.10:8080/admin", "not a URL"),
    ("http://10.20.1.10:99999", "not a URL"),
    ("http://127.0.0.1:2019", "loopback"),
    ("http://[::1]:80", "loopback"),
    ("https://[::ffff:127.0.0.1]:2019", "loopback"),  # IPv4 in IPv6 form is dialled as IPv4
    ("http://0.0.0.0:80", "unspecified"),
    ("http://169.254.1.1:80", "link-local"),
    ("unix//run/caddy/admin.sock", "not a URL"),
])
def test_bad_backends_are_refused(backend: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        W.validate_python(proxy(backends=[backend]))


def test_bad_names_and_fqdns() -> None:
    for name in ("Shop", "-shop", "shop-", "sh.op", "", "a" * 64):
        with pytest.raises(ValidationError):
            W.validate_python(proxy(domain_name=name))
    fq = {"type": "gateway_fqdn_proxy", "name": "web", "backends": ["http://10.20.1.10:80"]}
    assert W.validate_python({**fq, "fqdn": "www.example.org"}).fqdn == "www.example.org"
    for fqdn in ("example", "www..example.org", "-a.example.org", "a_b.example.org",
                 "www.example.org.", ("a" * 63 + ".") * 4 + "org"):
        with pytest.raises(ValidationError):
            W.validate_python({**fq, "fqdn": fqdn})
    with pytest.raises(ValidationError, match="listed twice"):
        W.validate_python(proxy(backends=["http://10.20.1.10:80"] * 2))


def test_port_forward() -> None:
    pf = {"type": "port_forward", "name": "ssh", "port": 2222, "network": "net",
          "target": "10.20.1.10:22"}
    assert W.validate_python(pf).protocol == "tcp"
    for bad in ({"target": "[fd00::1]:22"}, {"port": 0}, {"protocol": "sctp"},
                {"target": "web:22"}):
        with pytest.raises(ValidationError):
            W.validate_python({**pf, **bad})


def test_a_container_cannot_take_the_gateways_address_on_its_network() -> None:
    from zerostack.bot.spec import build_deployment
    from zerostack.crypto import Identity

    key = Identity.generate().public_hex
    net = {"type": "network", "name": "net", "ip_range": "10.20.0.0/16",
           "subnet": "10.20.1.0/24"}

    def dep(ip: str) -> Any:
        return build_deployment({"workloads": [
            net, {"type": "container", "name": "c", "flist": "hub/x",
                  "network": {"network": "net", "ip": ip}},
            proxy(network="net", backends=["http://10.20.1.10:80"])]}, 1, [], None,
            key_of=lambda t: key)

    assert dep("10.20.1.253").workloads
    with pytest.raises(Exception, match="node's own address"):
        dep("10.20.1.254")
