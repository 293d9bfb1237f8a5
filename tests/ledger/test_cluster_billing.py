"""Billing on a ledger cluster: the first pricing policy (here a development grid's, with
the faucet) is a `grid.policy` transaction the governing key's replica submits through
etcd, so every replica applies it; another replica's key cannot set it."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import require_tool, zerostack_cmd
from zerostack.crypto import Identity, load_identity
from zerostack.ledger import LedgerClient, LedgerError
from zerostack.ledger.cluster import start_cluster
from zerostack.ledger.pricing import DEV_POLICY


def test_a_cluster_starts_priced_with_the_faucet_and_replicates_it(tmp_path: Path) -> None:
    require_tool("etcd")
    name = f"bill{random.randrange(1 << 30)}"
    cluster = start_cluster(tmp_path / "c", replicas=3, etcd_members=1, name=name,
                            policy={**DEV_POLICY, "dev_faucet": True})
    try:
        assert (tmp_path / "c" / "policy.json").stat().st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 60
        policies: list[dict] = []
        while True:
            try:
                policies = []
                for u in cluster.urls:
                    with LedgerClient(u) as c:
                        policies.append(c.policy())
                if all(p["policy"] is not None for p in policies):
                    break
            except LedgerError:
                pass
            assert time.monotonic() < deadline, policies
            time.sleep(0.2)
        assert {p["policy"]["dev_faucet"] for p in policies} == {True}
        assert len({str(p["policy"]) for p in policies}) == 1
        governor = load_identity(cluster.replicas[0].key_file).public_hex
        assert {p["governor"] for p in policies} == {governor}

        user = Identity.generate()
        with LedgerClient(cluster.urls[1]) as c:
            twin = c.register_twin(user)
            assert c.faucet(user, 5000)["final"] is True
        with LedgerClient(cluster.urls[2]) as c:
            assert c.account(twin)["balance"] == 5000
        # only the governing key's replica signs billing notices; the others send a node on
        codes = [httpx.get(f"{u}/contracts/1/notice", timeout=10).status_code
                 for u in cluster.urls]
        assert codes == [404, 503, 503]  # (no contract 1 exists on this grid)

        # another replica's key is not the governing key: its --policy is refused at start
        out = subprocess.run(
            [*zerostack_cmd(), "ledger", "serve", "--etcd", ",".join(cluster.etcd_urls),
             "--cluster", name, "--validator-key", str(cluster.replicas[1].key_file),
             "--db", str(tmp_path / "other.db"), "--listen", "127.0.0.1:1", "--dev-faucet"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "only the replica of the governing key" in out.stderr + out.stdout
    finally:
        cluster.stop()
