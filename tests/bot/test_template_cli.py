"""The template and solution commands against a real ledger: an expert publishes, a user
deploys (a dry run first), stakeholders approve, the nodes run the parts, cancel."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from tests.bot.test_cli import zs
from tests.conftest import REPO, ProcessGroup
from tests.node.harness import Grid
from zerostack.crypto import load_identity
from zerostack.workloads import ZdbWorkload, open_instructions

TEMPLATES = REPO / "examples" / "templates"


def twin_of(grid: Grid, home: Path, name: str) -> int:
    key = load_identity(home / "identities" / f"{name}.key").public_hex
    return int(grid.client.twin_by_key(key)["id"])


def test_archive_published_deployed_on_three_real_nodes_and_cancelled(
        procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    nodes = {node: data for _, _, data, node in (grid.ready_node(f"n{i}") for i in range(3))}
    home = tmp_path / "home"
    for name in ("expert", "alice"):
        zs(home, grid.url, "id", "new", name)
    bad = tmp_path / "bad.yaml"
    bad.write_text((TEMPLATES / "archive.yaml").read_text().replace("mode: seq", "mode: odd"))
    out = zs(home, grid.url, "template", "lint", str(bad), ok=False)
    assert out.returncode == 1 and f"{bad}:49:15:" in out.stderr and "mode" in out.stderr
    assert "published archive 1.0" in zs(home, grid.url, "template", "publish",
                                         str(TEMPLATES / "archive.yaml"), "-i", "expert").stdout
    listed = json.loads(zs(home, grid.url, "template", "list", "--json", "-i", "alice").stdout)
    assert [t["name"] for t in listed] == ["archive"]
    shown = zs(home, grid.url, "template", "show", "archive", "-i", "alice").stdout
    assert "total capacity wanted" in shown and "3M..1024T" in shown

    out = zs(home, grid.url, "deploy", "archive", "-p", "size=30M", "--dry-run",
             "-i", "alice").stdout
    assert "dry run: nothing was created" in out and "shard-2" in out
    plan = json.loads(zs(home, grid.url, "deploy", "archive", "-p", "size=30M", "--dry-run",
                         "--json", "-i", "alice").stdout)
    assert sorted(n["node"] for n in plan["nodes"]) == sorted(nodes)
    assert grid.client.contracts() == []
    refused = zs(home, grid.url, "deploy", "archive", "-p", "size=30M", "-p", "shards=4",
                 "-i", "alice", ok=False)
    assert refused.returncode == 1 and "no 4 nodes in BE" in refused.stderr
    refused = zs(home, grid.url, "deploy", "archive", "-p", "sise=30M", "-i", "alice", ok=False)
    assert "unknown parameter 'sise'" in refused.stderr
    assert grid.client.contracts() == []

    st = json.loads(zs(home, grid.url, "deploy", "archive", "-p", "size=30M", "--json",
                       "-i", "alice").stdout)
    assert [p["state"] for p in st["parts"]] == ["deployed"] * 3
    found = {w["name"]: (p["node"], w) for p in st["parts"] for w in p["workloads"]}
    assert sorted(found) == sorted([f"archive-{i}" for i in range(3)]
                                   + [f"archive-{i}-replica" for i in range(3)])
    for i in range(3):
        pnode, primary = found[f"archive-{i}"]
        rnode, replica = found[f"archive-{i}-replica"]
        assert pnode != rnode, "a replica shares its primary's node"
        assert replica["data"]["replica_of"] == {"node": pnode, "workload": f"archive-{i}"}
        # written on the primary's own server...
        d = primary["data"]
        r = redis.Redis(host=d["host"], port=int(d["port"]), socket_timeout=5)
        r.set_response_callback("SET", lambda resp, **_: resp)  # seq mode: SET gives the key
        try:
            assert r.execute_command("SELECT", d["namespace"]) in (b"OK", "OK", True)
            key = r.execute_command("SET", "", f"archived bytes {i}".encode())
            assert r.execute_command("GET", key) == f"archived bytes {i}".encode()
        finally:
            r.close()
        # ...and read from the replica on another node once it caught up
        d = replica["data"]
        assert d["namespace"] == f"archive-{i}" and d["read_only"] is True
        r = redis.Redis(host=d["host"], port=int(d["port"]), socket_timeout=5,
                        single_connection_client=True)
        value = None
        deadline = time.monotonic() + 20
        try:
            while value is None:
                try:
                    r.execute_command("SELECT", d["namespace"])
                    value = r.execute_command("GET", key)
                except redis.ResponseError:
                    value = None  # not copied yet
                if value is None:
                    assert time.monotonic() < deadline, f"replica of archive-{i} lags"
                    time.sleep(0.1)
            assert value == f"archived bytes {i}".encode()
            with pytest.raises(redis.ResponseError, match="read-only"):
                r.execute_command("SET", "", b"refused")
        finally:
            r.close()
    # the replication password is in the sealed deployments only: never on the ledger
    alice = load_identity(home / "identities" / "alice.key")
    passwords = set()
    for p in st["parts"]:
        c = grid.client.contract(p["contract"])
        for w in open_instructions(alice, c["instructions"]).deployment.workloads:
            if isinstance(w, ZdbWorkload) and w.replication is not None:
                passwords.add(w.replication.password)
        assert not any(pw in json.dumps(c) for pw in passwords)
    assert len(passwords) == 3
    out = zs(home, grid.url, "solution", "status", str(st["id"]), "-i", "alice").stdout
    assert out.count("deployed") >= 3 and "redis-cli" in out
    assert not any(pw in out for pw in passwords)
    assert "(read-only replica of archive-0 on node" in out
    zs(home, grid.url, "solution", "cancel", str(st["id"]), "-i", "alice")
    for p in st["parts"]:
        assert grid.wait_contract(p["contract"], {"deleted"})["state"] == "deleted"
    # cancel removed every namespace's server and files, primaries and replicas alike
    for data in nodes.values():
        assert list((data / "pools" / "hdd" / "zdb" / "replicated").iterdir()) == []
    for i in range(3):
        for w in (found[f"archive-{i}"][1], found[f"archive-{i}-replica"][1]):
            with pytest.raises(redis.ConnectionError):
                redis.Redis(port=int(w["data"]["port"]), socket_timeout=2).ping()


def test_crm_needs_legal_and_budget_before_any_node_acts(procs: ProcessGroup,
                                                         tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    grid.ready_node("n0", "--dry")
    home = tmp_path / "home"
    for name in ("expert", "alice", "lea", "bob"):
        zs(home, grid.url, "id", "new", name)
        zs(home, grid.url, "status", "-i", name, "--json")  # registers the twin
    lea, bob = twin_of(grid, home, "lea"), twin_of(grid, home, "bob")
    zs(home, grid.url, "template", "publish", str(TEMPLATES / "crm.yaml"), "-i", "expert")
    refused = zs(home, grid.url, "deploy", "crm", "-p", "users=200", "-i", "alice",
                 "--stakeholder", f"legal={lea}", ok=False)
    assert "role 'budget' must approve" in refused.stderr
    out = zs(home, grid.url, "deploy", "crm", "-p", "users=200", "-i", "alice",
             "--stakeholder", f"legal={lea}", "--stakeholder", f"budget={bob}").stdout
    assert "zerostack solution approve" in out
    sid = int(out.split("solution ")[1].split(":")[0])
    shown = zs(home, grid.url, "solution", "approve", str(sid), "-i", "lea", ok=False)
    assert shown.returncode == 1 and "--yes" in shown.stderr and "container crm-0" in shown.stdout
    zs(home, grid.url, "solution", "approve", str(sid), "-i", "lea", "--yes")
    st = json.loads(zs(home, grid.url, "solution", "status", str(sid), "--json",
                       "-i", "alice").stdout)
    assert st["waiting_for"] == [bob] and {p["state"] for p in st["parts"]} == {"created"}
    zs(home, grid.url, "solution", "approve", str(sid), "-i", "bob", "--yes")
    for p in st["parts"]:
        c = grid.wait_contract(p["contract"], {"deployed", "error"})
        assert c["state"] == "deployed", c
    env = next(w for p in st["parts"] for w in grid.client.contract(p["contract"])["report"]
               ["workloads"] if w["name"] == "crm-0")
    assert env["state"] == "ok"
