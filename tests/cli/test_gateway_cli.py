"""`zerostack gateway name | release | names | set | pool` against a real ledger."""

from __future__ import annotations

from pathlib import Path

from tests.cli.test_billing_cli import new_user, start_ledger, zs, zs_json
from tests.conftest import ProcessGroup
from zerostack.ledger import LedgerClient

GiB = 1 << 30


def test_gateway_commands(procs: ProcessGroup, tmp_path: Path) -> None:
    url, _ = start_ledger(procs, tmp_path)
    home = tmp_path / "home"
    farmer, alice, bob = (new_user(home, url, n) for n in ("farmer", "alice", "bob"))
    client = LedgerClient(url)
    for ident in (farmer, alice, bob):
        client.register_twin(ident)
    farm = client.create_farm(farmer, "f1")
    node = client.register_node(farmer, farm, {"cru": 4, "mru": 8 * GiB, "sru": 0, "hru": 0},
                                "BE")
    assert zs_json(home, url, "gateway", "name", "shop", "--identity", "alice") == {
        "name": "shop"}
    taken = zs(home, url, "gateway", "name", "shop", "--identity", "bob", check=False)
    assert taken.returncode != 0 and "taken by twin" in taken.stdout + taken.stderr
    rows = zs_json(home, url, "gateway", "names", "--identity", "alice")
    assert [(r["name"], r["owner"]) for r in rows] == [("shop", client.twin_id(alice))]
    assert "released" in zs(home, url, "gateway", "release", "shop", "--identity",
                            "alice").stdout
    zs(home, url, "gateway", "name", "shop", "--identity", "bob")

    out = zs(home, url, "gateway", "set", str(node), "--domain", "gw1.grid.test", "--ipv4",
             "198.18.0.10/24", "--identity", "farmer").stdout
    assert "gateway gw1.grid.test" in out
    assert client.node(node)["gateway"]["ipv4"] == "198.18.0.10/24"
    bad = zs(home, url, "gateway", "set", str(node), "--domain", "gw1.grid.test", "--ipv4",
             "198.18.0.10/24", "--identity", "alice", check=False)
    assert bad.returncode != 0 and "farmer" in bad.stdout + bad.stderr
    zs(home, url, "gateway", "pool", str(farm), "--add", "198.18.0.200/24=198.18.0.1",
       "--identity", "farmer")
    nope = zs(home, url, "gateway", "pool", str(farm), "--add", "198.18.0.201/24",
              "--identity", "farmer", check=False)
    assert nope.returncode != 0 and "ADDRESS/PREFIX=GATEWAY" in nope.stdout + nope.stderr
    zs(home, url, "gateway", "pool", str(farm), "--add", "fd00:5a::200/64=fd00:5a::1",
       "--identity", "farmer")
    listed = zs_json(home, url, "gateway", "pool", str(farm), "--identity", "alice")
    assert [(r["ip"], r["gateway"], r["contract"]) for r in listed] == [
        ("198.18.0.200/24", "198.18.0.1", 0), ("fd00:5a::200/64", "fd00:5a::1", 0)]
    assert "fd00:5a::200/64" in zs(home, url, "gateway", "pool", str(farm),
                                   "--identity", "alice").stdout
