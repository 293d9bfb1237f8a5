"""The grid DNS's pure parts, and a real dnsmasq answering from the table it is given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from zerostack.gateway import GatewayError
from zerostack.gateway.dns import Dnsmasq, Peer, answers, hosts_file, resolve
from zerostack.grid import inside


def test_answers_put_this_gateway_first_then_live_peers() -> None:
    own = Peer(0, "198.18.0.10", "fd00:5a::10")
    p2, p3 = Peer(2, "198.18.1.11"), Peer(3, "198.18.1.12", "fd00:5a:0:1::12")
    table = answers(["b.farm.test", "a.farm.test"], own,
                    {"a.farm.test": [p3, p2], "c.farm.test": [p2]})
    assert table == {"a.farm.test": ["198.18.0.10", "fd00:5a::10", "198.18.1.11",
                                     "198.18.1.12", "fd00:5a:0:1::12"],
                     "b.farm.test": ["198.18.0.10", "fd00:5a::10"]}
    assert hosts_file({"a.t": ["1.2.3.4", "::5"]}) == "1.2.3.4\ta.t\n::5\ta.t\n"


def test_dnsmasq_answers_from_its_table_only(tmp_path: Path) -> None:
    require_root()
    require_tool("dnsmasq")
    ns = f"zgdns{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    dns = Dnsmasq(tmp_path / "gw")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "198.18.9.10/24", "dev", "lo"],
                       check=True)
        dns.publish({"shop.farm.test": ["198.18.0.10", "198.18.1.11"]})
        with inside(ns):
            dns.ensure_running(("198.18.9.10",))
            assert resolve("shop.farm.test", ["198.18.9.10"]) == ["198.18.0.10",
                                                                  "198.18.1.11"]
            dns.publish({"shop.farm.test": ["198.18.1.11"]})  # a peer died
            for _ in range(50):
                if resolve("shop.farm.test", ["198.18.9.10"]) == ["198.18.1.11"]:
                    break
            assert resolve("shop.farm.test", ["198.18.9.10"]) == ["198.18.1.11"]
            # no recursion, nothing but the table
            with pytest.raises(GatewayError):  # refused: never forwarded anywhere
                resolve("example.org", ["198.18.9.10"], timeout=0.3)
            # the first server is dead: the next one answers
            assert resolve("shop.farm.test", ["198.18.9.99", "198.18.9.10"],
                           timeout=0.3) == ["198.18.1.11"]
            # a new agent finds the old one's dnsmasq still holding port 53: it replaces it
            old = dns._proc
            again = Dnsmasq(tmp_path / "gw")
            again.ensure_running(("198.18.9.10",))
            assert old is not None and old.wait(5) is not None
            assert resolve("shop.farm.test", ["198.18.9.10"]) == ["198.18.1.11"]
            again.stop()
    finally:
        dns.stop()
        subprocess.run(["ip", "netns", "delete", ns], check=False)
