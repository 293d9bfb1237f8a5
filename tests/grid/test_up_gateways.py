"""`zerostack up --gateways 2`: two gateway nodes (gw1.grid.test, gw2.grid.test) made by
the farmer, the `webapp` template deployed by a user with its name on both, and its page
fetched through each gateway over HTTPS from a client host on the WAN, resolving the
name to that gateway's address; then everything removed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import REPO, free_port, require_root, require_tool
from tests.gateway.client import Answer, fetch
from tests.grid.test_up import grid_processes, run


def test_up_with_gateways_serves_webapp_through_both(tmp_path: Path) -> None:
    require_root()
    for tool in ("runc", "busybox", "wireguard-go", "wg", "nft", "caddy", "dnsmasq"):
        require_tool(tool)
    folder = tmp_path / "grid"
    try:
        rec = json.loads(run(None, None, "up", "--dir", str(folder), "--nodes", "1",
                             "--gateways", "2", "--netns",
                             "--ledger-port", str(free_port()),
                             "--zdb-port", str(free_port()), "--hub-port", str(free_port()),
                             "--json").stdout)
        home, url = Path(rec["home"]), rec["url"]
        gws = rec["gateways"]
        assert [g["domain"] for g in gws] == ["gw1.grid.test", "gw2.grid.test"]
        client = gws[0]["client_namespace"]
        assert client

        run(home, url, "template", "publish",
            str(REPO / "examples" / "templates" / "webapp.yaml"), "-i", "expert")
        st = json.loads(run(home, url, "deploy", "webapp", "-p", f"image={rec['image']}",
                            "-p", "name=shop", "-i", "alice", "--json").stdout)
        parts = st["parts"]
        assert all(p["state"] == "deployed" for p in parts), parts
        assert sorted(p["node"] for p in parts if any(
            w["name"] == "gw-shop" for w in p["workloads"])) == sorted(g["node"] for g in gws)

        for gw in gws:
            host = f"shop.{gw['domain']}"
            r: Answer | None = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    r = fetch(client, f"https://{host}/", gw["ipv4"], Path(gw["caddy_root"]),
                              timeout=3)
                except OSError:
                    r = None
                if r is not None and r.status == 200:
                    break
                time.sleep(0.5)
            assert r is not None and r.status == 200, (host, r)
            assert r.body.strip() == b"hello from shop", r
        run(home, url, "solution", "cancel", str(st["id"]), "-i", "alice")
    finally:
        if folder.exists():
            run(None, None, "down", "--dir", str(folder), ok=False)
    assert not folder.exists()
    assert grid_processes(folder) == []
