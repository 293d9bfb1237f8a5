"""Two deployments racing for a farm's last public address through a real ledger server:
sent at the same moment from two threads, exactly one contract gets it (IPv4 and IPv6)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_billing_cli import start_ledger
from tests.conftest import ProcessGroup
from zerostack.crypto import Identity, SignatureRequirement, deployment_hash, hash_hex
from zerostack.ledger import LedgerClient, LedgerRejected

GiB = 1 << 30


@pytest.mark.parametrize("version", [4, 6])
def test_racing_deployments_never_share_an_address(procs: ProcessGroup, tmp_path: Path,
                                                   version: int) -> None:
    url, _ = start_ledger(procs, tmp_path)
    client = LedgerClient(url)
    farmer = Identity.generate()
    client.register_twin(farmer)
    farm = client.create_farm(farmer, "f1")
    node = client.register_node(farmer, farm, {"cru": 8, "mru": 8 * GiB, "sru": 0, "hru": 0},
                                "BE")
    taken: list[str] = []
    for round_ in range(4):
        # one more free address each round, and three deployments racing for it
        address = (f"198.18.0.{200 + round_}/24" if version == 4
                   else f"fd00:5a::{200 + round_:x}/64")
        client.send(farmer, "farm.public_ips", {"farm": farm, "add": [
            {"ip": address, "gateway": "198.18.0.1" if version == 4 else "fd00:5a::1"}]})
        users = [Identity.generate() for _ in range(3)]
        for u in users:
            client.register_twin(u)
        start = threading.Barrier(len(users))
        results: list[Any] = [None] * len(users)

        def create(i: int, u: Identity, round_: int = round_,
                   start: threading.Barrier = start, results: list[Any] = results) -> None:
            mine = LedgerClient(url)
            twin = mine.twin_id(u)
            req = {"requests": [{"twin": twin, "key": u.public_hex, "weight": 1,
                                 "required": True}], "weight_required": 1}
            body = hash_hex({"deployment": round_ * 10 + i})
            dh = deployment_hash(body, SignatureRequirement.from_dict(req), None)
            start.wait()
            try:
                results[i] = mine.create_contract(u, node, dh, "aW5zdHJ1Y3Rpb25z", req,
                                                  body_hash=body,
                                                  **{f"ipv{version}": 1})
            except LedgerRejected as exc:
                results[i] = exc

        threads = [threading.Thread(target=create, args=(i, u)) for i, u in enumerate(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, LedgerRejected)]
        assert len(won) == 1 and len(lost) == 2, results
        assert all("exhausted" in str(e) for e in lost), lost
        (ip,) = client.contract(won[0])["public_ips"]
        assert ip == address and ip not in taken
        taken.append(ip)
        pool = {e["ip"]: e["contract"] for e in client.farm_pool(farm)}
        assert pool[ip] == won[0]  # the pool on the ledger names its holder
    # the pool lists every address with the one contract that won it
    assert sorted(e["ip"] for e in client.farm_pool(farm) if e["contract"]) == sorted(taken)
