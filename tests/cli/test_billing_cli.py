"""`zerostack balance | transfer | faucet | bill | price | payouts` against a real ledger
process started for development, with a short billing period."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd
from zerostack.crypto import (
    Identity,
    SignatureRequirement,
    deployment_hash,
    hash_hex,
    load_identity,
)
from zerostack.ledger import LedgerClient, LedgerRejected

GiB = 1 << 30
PERIOD = 2
# Seconds an unpaid contract waits for a top-up. Long enough never to run out while a test
# runs the CLI (seconds a run on a loaded machine); a test that needs a grace period to end
# shortens it with the governing key first.
GRACE = 600
# per hour: 3,600,000 a core is 1,000 a core-second, so a 2 s period charges whole amounts
PRICES = {"cru": 3_600_000, "mru": 1_800_000, "sru": 0, "hru": 0, "ipv4": 720_000,
          "names": 0, "traffic": 1000}
POLICY = {"prices": PRICES, "max": {k: v * 2 for k, v in PRICES.items()}, "period": PERIOD,
          "grace": GRACE, "treasury_share": 1000, "max_author_share": 2000,
          "max_traffic": 100 * GiB}


def zs(home: Path, url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZEROSTACK_HOME": str(home), "ZEROSTACK_LEDGER": url,
           "COLUMNS": "300"}
    proc = subprocess.run([*zerostack_cmd(), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def zs_json(home: Path, url: str, *args: str) -> Any:
    return json.loads(zs(home, url, *args, "--json").stdout)


def start_ledger(procs: ProcessGroup, tmp: Path, *extra: str) -> tuple[str, Any]:
    port = free_port()
    log = open(tmp / "ledger.log", "ab")  # noqa: SIM115 - closed by the OS
    proc = procs.start([*zerostack_cmd(), "ledger", "serve", "--db", str(tmp / "ledger.db"),
                        "--listen", f"127.0.0.1:{port}", *extra], stdout=log, stderr=log)
    wait_for_port(port, proc=proc)
    return f"http://127.0.0.1:{port}", proc


def new_user(home: Path, url: str, name: str) -> Identity:
    info = json.loads(zs(home, url, "id", "new", name, "--json").stdout)
    return load_identity(Path(info["path"]))


def create_contract(client: LedgerClient, ident: Identity, node: int, n: int,
                    ipv4: int = 0) -> int:
    twin = client.twin_id(ident)
    req = {"requests": [{"twin": twin, "key": ident.public_hex, "weight": 1,
                         "required": True}], "weight_required": 1}
    body = hash_hex({"deployment": n})
    dh = deployment_hash(body, SignatureRequirement.from_dict(req), None)
    return client.create_contract(ident, node, dh, "aW5zdHJ1Y3Rpb25z", req, body_hash=body,
                                  capacity={"cru": 1, "mru": GiB}, ipv4=ipv4)


def wait(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture
def grid(procs: ProcessGroup, tmp_path: Path) -> Any:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    url, proc = start_ledger(procs, tmp_path, "--dev-faucet", "--policy", str(policy))
    client = LedgerClient(url)
    farmer, node_ident = Identity.generate(), Identity.generate()
    farmer_twin = client.register_twin(farmer)
    farm = client.create_farm(farmer, "farm1")
    client.register_twin(node_ident)
    node = client.register_node(node_ident, farm, {"cru": 8, "mru": 16 * GiB, "sru": 64 * GiB},
                                "BE")
    yield {"url": url, "proc": proc, "client": client, "farmer": farmer,
           "farmer_twin": farmer_twin, "node": node, "node_ident": node_ident,
           "home": tmp_path / "home", "tmp": tmp_path, "farm": farm}
    client.close()


def test_balance_transfer_and_refusals(grid: Any) -> None:
    home, url, client = grid["home"], grid["url"], grid["client"]
    alice = new_user(home, url, "alice")
    out = zs(home, url, "faucet", "1000000", "-i", "alice").stdout
    assert "received 1000000" in out
    me = client.twin_id(alice)
    assert zs_json(home, url, "balance", "-i", "alice")["balance"] == 1_000_000
    sent = zs_json(home, url, "transfer", str(grid["farmer_twin"]), "2500", "-i", "alice")
    assert sent["receipt"]["amount"] == 2500
    assert zs_json(home, url, "balance", "--twin", str(grid["farmer_twin"]))["balance"] == 2500
    # above the balance, negative, zero, past 2^53: refused with a reason, nothing moves
    for amount, words in (("9999999", "less than the 9999999"), ("0", "greater than"),
                          (str(2**60), "less than or equal to 9007199254740991"),
                          ("-5", "No such option")):
        proc = zs(home, url, "transfer", str(grid["farmer_twin"]), amount, "-i", "alice",
                  check=False)
        assert proc.returncode != 0, proc.stdout
        assert words in proc.stderr, proc.stderr
    assert client.account(me)["balance"] == 1_000_000 - 2500
    plain = zs(home, url, "balance", "-i", "alice").stdout
    assert f"twin {me}: balance {1_000_000 - 2500}" in plain


def test_price_of_a_deployment_file(grid: Any) -> None:
    home, url = grid["home"], grid["url"]
    new_user(home, url, "alice")
    spec = grid["tmp"] / "web.yaml"
    spec.write_text("workloads:\n"
                    "  - {type: container, name: web, flist: x, cpu: 2, memory: 1G}\n"
                    "  - {type: public_ip, name: ip}\n")
    got = zs_json(home, url, "price", str(spec), "--node", str(grid["node"]), "-i", "alice")
    assert got["units"]["cru"] == 2 and got["units"]["ipv4"] == 1
    hourly = 2 * PRICES["cru"] + PRICES["mru"] + PRICES["ipv4"]
    assert got["total_per_hour"] == hourly
    assert got["total_per_month"] == hourly * 730
    text = zs(home, url, "price", str(spec), "-i", "alice").stdout
    assert f"total: {hourly} per hour" in text
    # a published template's workloads, priced the same way
    author = Identity.generate()
    grid["client"].register_twin(author)
    body = {"workloads": [{"type": "container", "name": "web", "flist": "x", "cpu": 2,
                           "memory": "1G"}, {"type": "public_ip", "name": "ip"}]}
    tpl = grid["client"].publish_template(author, "shop", body, version="1.0")
    got = zs_json(home, url, "price", "--template", tpl, "-i", "alice")
    assert got["total_per_hour"] == hourly and got["template"] == tpl
    text = zs(home, url, "price", "--template", tpl, "-i", "alice").stdout
    assert "price of template shop 1.0" in text and f"total: {hourly} per hour" in text
    for args, words in ((["--template", "ab" * 32], "is not published"),
                        ([str(spec), "--template", tpl], "one of them"), ([], "one of them")):
        bad = zs(home, url, "price", *args, "-i", "alice", check=False)
        assert bad.returncode != 0 and words in bad.stderr, bad.stderr


def test_deploy_dry_run_shows_the_cheapest_node_and_max_cost(grid: Any) -> None:
    home, url, client = grid["home"], grid["url"], grid["client"]
    new_user(home, url, "alice")
    # a second farm whose own prices are half the grid's, with a node just as big
    farmer2, node2_ident = Identity.generate(), Identity.generate()
    client.register_twin(farmer2)
    farm2 = client.create_farm(farmer2, "farm2")
    client.register_twin(node2_ident)
    node2 = client.register_node(node2_ident, farm2,
                                 {"cru": 8, "mru": 16 * GiB, "sru": 64 * GiB}, "BE")
    client.set_farm_prices(farmer2, farm2, {k: v // 2 for k, v in PRICES.items()})
    for ident in (grid["node_ident"], node2_ident):
        client.heartbeat(ident, {"cru": 0, "mru": 0, "sru": 0, "hru": 0}, 1)
    spec = grid["tmp"] / "web.yaml"
    spec.write_text("workloads:\n"
                    "  - {type: container, name: web, flist: x, cpu: 1, memory: 1G}\n"
                    "  - {type: public_ip, name: ip}\n")
    hourly = PRICES["cru"] + PRICES["mru"] + PRICES["ipv4"]
    got = zs_json(home, url, "deploy", str(spec), "--dry-run", "-i", "alice")
    assert got["dry_run"] and got["node"] == node2
    assert got["total_per_hour"] == hourly // 2 and got["total_per_month"] == hourly // 2 * 730
    assert [o["node"] for o in got["alternatives"]] == [node2, grid["node"]]
    assert got["alternatives"][1]["per_month"] == hourly * 730
    # on the grid's prices only when asked for that node
    there = zs_json(home, url, "deploy", str(spec), "--dry-run", "--node", str(grid["node"]),
                    "-i", "alice")
    assert there["node"] == grid["node"] and there["total_per_month"] == hourly * 730
    # a cap between the two leaves the cheap node only; below both: nothing fits
    capped = zs_json(home, url, "deploy", str(spec), "--dry-run", "--max-cost",
                     str(hourly * 730 - 1), "-i", "alice")
    assert [o["node"] for o in capped["alternatives"]] == [node2]
    low = zs(home, url, "deploy", str(spec), "--dry-run", "--max-cost", "10", "-i", "alice",
             check=False)
    assert low.returncode != 0 and "within max_cost 10 per month" in low.stderr
    spec.write_text(spec.read_text() + "max_cost: 10\n")  # the file's own cap
    low = zs(home, url, "deploy", str(spec), "--node", str(grid["node"]), "-i", "alice",
             check=False)
    assert low.returncode != 0 and "above max_cost 10" in low.stderr
    text = zs(home, url, "deploy", str(spec), "--dry-run", "--max-cost", "0", "-i", "alice",
              check=False)
    assert text.returncode != 0
    # nothing was deployed by any of these
    assert client.contracts(limit=10) == []


def test_bill_payouts_consumption_and_grace(grid: Any, procs: ProcessGroup) -> None:
    home, url, client = grid["home"], grid["url"], grid["client"]
    alice = new_user(home, url, "alice")
    zs(home, url, "faucet", "10000000", "-i", "alice")
    cid = create_contract(client, alice, grid["node"], 1)
    bill = wait(lambda: (b := zs_json(home, url, "bill", str(cid), "-i", "alice"))
                ["charges"] and b)
    row = bill["charges"][0]
    assert row["status"] == "paid" and row["total"] == sum(row["amounts"].values())
    assert row["amounts"]["cru"] == 1000 * (row["end"] - row["start"])
    text = zs(home, url, "bill", str(cid), "-i", "alice").stdout
    assert f"contract {cid} (approved)" in text and "paid" in text

    farmer_twin = grid["farmer_twin"]
    paid = zs_json(home, url, "payouts", "--twin", str(farmer_twin), "-i", "alice")
    assert paid["total"] > 0 and paid["payouts"][0]["role"] == "farmer"
    assert "paid" in zs(home, url, "payouts", "--twin", str(farmer_twin), "-i", "alice").stdout

    # the node reports traffic for an ended period; a replay and another twin are refused
    node_ident = grid["node_ident"]
    period = int(client.head()["time"]) // PERIOD - 1
    time.sleep(PERIOD)
    client.report_consumption(node_ident, cid, period, {"cru": 1}, traffic_in=GiB)
    with pytest.raises(LedgerRejected, match="already reported"):
        client.report_consumption(node_ident, cid, period, {"cru": 1})
    with pytest.raises(LedgerRejected, match="only its twin"):
        client.report_consumption(alice, cid, period + 1, {"cru": 1})
    with pytest.raises(LedgerRejected, match="reserves 1"):
        client.report_consumption(node_ident, cid, period + 1, {"cru": 2})
    wait(lambda: client.bill(cid)["billing"]["totals"]["traffic"] == PRICES["traffic"])

    # bob cannot pay: grace; a top-up within the grace period resumes the contract
    bob = new_user(home, url, "bob")
    zs(home, url, "faucet", "1", "-i", "bob")
    bid = create_contract(client, bob, grid["node"], 2)
    wait(lambda: client.contract(bid)["state"] == "grace")
    text = zs(home, url, "bill", str(bid), "-i", "bob").stdout
    assert "in grace until" in text
    out = zs(home, url, "faucet", "1000000", "-i", "bob").stdout
    assert f"contract {bid} left grace" in out
    assert client.contract(bid)["state"] == "approved"
    # the charge bob could not pay is his first, paid late; the boundaries passed since the
    # top-up (none or more by now) charged him on time
    charges = client.bill(bid)["charges"]
    assert charges[0]["status"] == "late", charges
    assert all(c["status"] == "paid" for c in charges[1:]), charges

    # carol never pays: her contract is cancelled when the grace period ends (the governing
    # key shortens it to a few seconds first)
    short = grid["tmp"] / "short-grace.json"
    short.write_text(json.dumps({**POLICY, "grace": 4}))
    zs(home, url, "ledger", "policy", str(short), "--key", str(grid["tmp"] / "ledger.key"))
    assert client.policy()["policy"]["grace"] == 4
    carol = new_user(home, url, "carol")
    zs(home, url, "faucet", "1", "-i", "carol")
    ccid = create_contract(client, carol, grid["node"], 3)
    wait(lambda: client.contract(ccid)["state"] == "cancelled")
    assert client.bill(ccid)["billing"]["unpaid"] > 0

    # a restart replays the chain to the same money
    before = {t: client.account(t)["balance"] for t in (client.twin_id(alice), farmer_twin)}
    treasury = client.policy()["treasury"]
    supply = client.policy()["supply"]
    grid["proc"].terminate()
    grid["proc"].wait(10)
    url2, _ = start_ledger(procs, grid["tmp"], "--dev-faucet")
    with LedgerClient(url2) as again:
        # replayed from the file: the same money in all, the same charges
        assert again.policy()["supply"] == supply
        assert again.policy()["treasury"] >= treasury
        assert again.bill(cid)["charges"][0] == row
        assert again.account(farmer_twin)["balance"] >= before[farmer_twin]
        assert again.bill(cid)["charges"][0] == row


def test_the_governing_key_changes_prices_never_retroactively(grid: Any) -> None:
    home, url, client = grid["home"], grid["url"], grid["client"]
    key = grid["tmp"] / "ledger.key"  # the operator key `ledger serve` created
    new = grid["tmp"] / "new.json"
    new.write_text(json.dumps({**POLICY, "prices": {**PRICES, "cru": 2 * PRICES["cru"]}}))
    now = int(client.head()["time"])
    proc = zs(home, url, "ledger", "policy", str(new), "--key", str(key), "--effective",
              str(now - 60), check=False)
    assert proc.returncode != 0 and "never retroactive" in proc.stderr, proc.stderr
    stranger = json.loads(zs(home, url, "id", "new", "stranger", "--json").stdout)["path"]
    proc = zs(home, url, "ledger", "policy", str(new), "--key", stranger, check=False)
    assert proc.returncode != 0 and "governing key" in proc.stderr, proc.stderr
    assert client.policy()["policy"]["prices"]["cru"] == PRICES["cru"]
    zs(home, url, "ledger", "policy", str(new), "--key", str(key), "--effective",
       str(now + 3600))
    got = client.policy()
    assert got["policy"]["prices"]["cru"] == PRICES["cru"]
    assert got["next"]["prices"]["cru"] == 2 * PRICES["cru"]
    assert got["next"]["effective"] == now + 3600
