"""`zerostack up --gateways 2`: two gateway nodes (gw1.grid.test, gw2.grid.test) made by
the farmer, the `webapp` template deployed by a user with its name on both, and its page
fetched through each gateway over HTTPS from a client host on the WAN, resolving the
name to that gateway's address; a namespace replicated from one host to another; then
everything removed."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO, free_port, require_root, require_tool
from tests.gateway.client import Answer, fetch
from tests.grid.test_up import grid_processes, run

MIRRORED = """
name: mirrored
version: "1"
parts:
  - name: main
    workloads:
      - type: zdb
        name: notes
        size: 16M
  - name: copy
    workloads:
      - type: zdb
        name: notes-copy
        size: 16M
        replica_of: {workload: notes}
"""


def redis_cli(namespace: str, data: dict[str, object], *commands: str) -> list[str]:
    """Run `commands` on one connection to a Zero-DB from the host `namespace`."""
    out = subprocess.run(["ip", "netns", "exec", namespace, "redis-cli", "-h",
                          str(data["host"]), "-p", str(data["port"])],
                         input="\n".join(commands) + "\n", stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=30)
    return out.stdout.splitlines()


def test_up_with_gateways_serves_webapp_through_both(tmp_path: Path) -> None:
    require_root()
    for tool in ("runc", "busybox", "wireguard-go", "wg", "nft", "caddy", "dnsmasq",
                 "redis-cli"):
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

        # a namespace and its replica on two hosts: replication between their WAN addresses
        mirrored = tmp_path / "mirrored.yaml"
        mirrored.write_text(MIRRORED)
        st = json.loads(run(home, url, "deploy", str(mirrored), "-i", "alice",
                            "--json").stdout)
        found = {w["name"]: (p["node"], w["data"]) for p in st["parts"]
                 for w in p["workloads"]}
        (pnode, primary), (rnode, replica) = found["notes"], found["notes-copy"]
        assert pnode != rnode and primary["host"] != replica["host"]
        assert redis_cli(client, primary, "SELECT notes", "SET k kept-on-two-hosts") == \
            ["OK", "k"]
        got: list[str] = []
        deadline = time.monotonic() + 30
        while got[-1:] != ["kept-on-two-hosts"] and time.monotonic() < deadline:
            got = redis_cli(client, replica, "SELECT notes", "GET k")
            time.sleep(0.2)
        assert got == ["OK", "kept-on-two-hosts"], got
        assert "read-only" in " ".join(redis_cli(client, replica, "SELECT notes", "SET k no"))
        run(home, url, "solution", "cancel", str(st["id"]), "-i", "alice")
        for d in (primary, replica):
            deadline = time.monotonic() + 60
            while redis_cli(client, d, "PING") == ["PONG"]:
                assert time.monotonic() < deadline, f"{d} still answers after the cancel"
                time.sleep(0.5)
    finally:
        if folder.exists():
            run(None, None, "down", "--dir", str(folder), ok=False)
    assert not folder.exists()
    assert grid_processes(folder) == []
