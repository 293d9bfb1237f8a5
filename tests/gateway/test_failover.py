"""No single point of failure: two gateways of one farm on two sites serve the same
fqdn; the grid DNS on both answers with the live ones. One gateway host is cut (link
down, its processes killed) while a client asks for the URL ten times a second: the
URL answers again within 5 s, and no request hangs. Then the host comes back and its
agent, started again, serves the URL again from the contracts alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.gateway.failover import TwoGateways, interruption


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[TwoGateways]:
    require_root()
    for tool in ("caddy", "dnsmasq", "nft"):
        require_tool(tool)
    two = TwoGateways(tmp_path / "grid")
    try:
        two.start()
        yield two
    finally:
        two.stop()


def test_the_url_survives_the_loss_of_a_gateway_host(gateways: TwoGateways) -> None:
    loop = gateways.loop()
    loop.start()
    try:
        time.sleep(2)
        cut = time.monotonic()
        gateways.cut(0)
        time.sleep(8)
    finally:
        loop.stop()
    gap = interruption(loop.samples, cut)
    print(f"interruption {gap:.2f}s over {len(loop.samples)} requests")
    assert gap <= 5.0, gap
    assert max(s.end - s.start for s in loop.samples) < 5.0  # no request hangs
    late = [s for s in loop.samples if s.start > cut + gap + 0.5]
    assert late and all(s.ok for s in late), [(s.start - cut, s.ok) for s in late]
    survivor = gateways.gateways[1].host
    assert survivor is not None and {s.via for s in late} == {survivor.address}
    # the host comes back: its new agent rebuilds Caddy's routes and the DNS from the
    # contracts alone, and both gateways answer again
    gateways.restore(0)
    gateways.wait_both()
