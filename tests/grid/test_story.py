"""`zerostack story`: the seed's five steps on a real local grid, then a clean stop; on a
grid of hosts, ending with the webapp's page fetched through a gateway."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import free_port, free_ports, require_root, require_tool, zerostack_cmd


def test_story_walks_the_five_steps_and_stops_cleanly(tmp_path: Path) -> None:
    require_root()
    for tool in ("runc", "busybox"):
        require_tool(tool)
    folder = tmp_path / "grid"
    out = subprocess.run(
        [*zerostack_cmd(), "story", "--once", "--loopback", "--dir", str(folder),
         "--ledger-port", str(free_port()), "--zdb-port", str(free_ports(3)),
         "--hub-port", str(free_port())],
        capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    for expected in ("[1] the IT expert wrote crm 1.0", "[2] alice asked her 3Bot",
                     "[3] registered on the ledger as solution 1",
                     "with legal's signature alone every part is created",
                     "[5] each node checked", "crm-0=ok", "verified and running"):
        assert expected in text, expected
    ps = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_story_on_hosts_ends_with_the_page_fetched_through_a_gateway(tmp_path: Path) -> None:
    require_root()
    for tool in ("runc", "busybox", "wireguard-go", "wg", "nft", "caddy", "dnsmasq"):
        require_tool(tool)
    folder = tmp_path / "grid"
    out = subprocess.run(
        [*zerostack_cmd(), "story", "--once", "--netns", "--dir", str(folder),
         "--ledger-port", str(free_port()), "--zdb-port", str(free_port()),
         "--hub-port", str(free_port())],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    for expected in ("[5] each node checked", "verified and running",
                     "asked https://hello.gw1.grid.test/ of gateway gw1.grid.test",
                     "and got: hello from hello",
                     "fetched through gateway gw1.grid.test"):
        assert expected in text, (expected, text)
    ps = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_story_refuses_a_directory_that_is_not_a_grid(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    out = subprocess.run([*zerostack_cmd(), "story", "--once", "--loopback", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "holds no grid" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
