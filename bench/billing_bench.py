"""Billing benchmark: one billing period for 20,000 live contracts, against applying the
same number of plain transfers, on the ledger's chain over a SQLite file.

    .venv/bin/python -m bench.billing_bench [--contracts 20000] [--json]

The ledger's chain (state machine, block cutting, operator signatures, SQLite log) runs
in this process with a clock the benchmark moves, so a billing boundary falls where it
is wanted. Setup: a priced development grid, one node per 2,000 contracts, 1,000 funded
owners and `--contracts` approved contracts. Measured, in the same run:

- billing: the clock passes a boundary and one empty block is cut and committed; its
  tick charges every contract (a charge row each, payouts to the farmer, the treasury);
- transfers: as many signed `balance.transfer`s, each checked (signature, nonce,
  balance) and applied, in blocks of 2,000, committed the same way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from zerostack.crypto import Identity, SignatureRequirement, deployment_hash, hash_hex
from zerostack.ledger import Chain, Rejected, SqliteLog, parse_tx, sign_approval, sign_tx
from zerostack.ledger.pricing import DEV_POLICY

GiB = 1 << 30
OWNERS = 1000
PER_NODE = 2000
BLOCK = 2000
START = 1_800_000_000  # a whole hour: the first boundary is START + 3600


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return float(self.now)


def seal_all(chain: Chain, txs: list[Any]) -> None:
    """Apply `txs` in blocks of BLOCK and commit each block."""
    for i in range(0, len(txs), BLOCK):
        for tx in txs[i:i + BLOCK]:
            result = chain.add(tx)
            if isinstance(result, Rejected):
                raise SystemExit(f"setup transaction refused: {result.reason}")
        chain.seal()


def setup(chain: Chain, operator: Identity, contracts: int) -> list[tuple[Identity, int]]:
    """A priced grid with `contracts` approved contracts; returns the owners (key, twin)."""
    seal_all(chain, [parse_tx(sign_tx(operator, "grid.policy", operator.public_hex, 0,
                                      {**DEV_POLICY, "dev_faucet": True}))])
    farmer = Identity.generate()
    owners = [Identity.generate() for _ in range(OWNERS)]
    nodes_idents = [Identity.generate() for _ in range((contracts + PER_NODE - 1) // PER_NODE)]
    everyone = [farmer, *owners, *nodes_idents]
    seal_all(chain, [parse_tx(sign_tx(i, "twin.register", i.public_hex, 0, {}))
                     for i in everyone])
    twin = {i.public_hex: chain.state.twin_by_key[i.public_hex] for i in everyone}
    nonce = dict.fromkeys(twin.values(), 1)

    def tx(ident: Identity, ttype: str, payload: dict[str, Any]) -> Any:
        t = twin[ident.public_hex]
        signed = parse_tx(sign_tx(ident, ttype, t, nonce[t], payload))
        nonce[t] += 1
        return signed

    seal_all(chain, [tx(farmer, "farm.create", {"name": "bench"})])
    farm = chain.state.farm_by_name["bench"]
    cap = {"cru": 10**6, "mru": 10**6 * GiB, "sru": 10**6 * GiB, "hru": 10**6 * GiB}
    seal_all(chain, [tx(n, "node.register", {"farm": farm, "capacity": cap,
                                             "location": {"country": "BE"}})
                     for n in nodes_idents])
    node_ids = [chain.state.node_by_twin[twin[n.public_hex]] for n in nodes_idents]
    seal_all(chain, [tx(o, "balance.faucet", {"amount": 10**12}) for o in owners])
    creates = []
    for k in range(contracts):
        owner = owners[k % OWNERS]
        t = twin[owner.public_hex]
        node = node_ids[k // PER_NODE]
        req = {"requests": [{"twin": t, "key": owner.public_hex, "weight": 1,
                             "required": True}], "weight_required": 1}
        body = hash_hex({"bench": k})
        dh = deployment_hash(body, SignatureRequirement.from_dict(req), None)
        creates.append(tx(owner, "contract.create", {
            "node": node, "deployment_hash": dh, "body_hash": body,
            "instructions": "aW5zdHJ1Y3Rpb25z", "signature_requirement": req,
            "capacity": {"cru": 1, "mru": 2 * GiB, "sru": 10 * GiB},
            "approval": sign_approval(owner, 0, 1, node, dh)}))
    seal_all(chain, creates)
    return [(o, twin[o.public_hex]) for o in owners]


def run(contracts: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="zs-billing-bench-"))
    clock = Clock()
    operator = Identity.generate()
    log = SqliteLog(tmp / "ledger.db")
    chain = Chain(log, operator, clock)
    t0 = time.perf_counter()
    owners = setup(chain, operator, contracts)
    setup_s = time.perf_counter() - t0
    billable = len(chain.state.billable)
    assert billable == contracts, (billable, contracts)

    # one billing period: the clock passes the boundary, an empty block bills everything
    clock.now = chain.state.next_bill + 1
    t0 = time.perf_counter()
    cut = chain.cut(allow_empty=True)
    assert cut is not None
    chain.commit(*cut)
    billing_s = time.perf_counter() - t0
    charged = sum(1 for rows in chain.state.charges.values()
                  if rows and rows[-1].time == clock.now and rows[-1].status == "paid")
    assert charged == contracts, (charged, contracts)

    # the same number of plain transfers, signed before the clock starts
    farmer_twin = 1
    txs = []
    nonces = {t: chain.state.twins[t].nonce for _, t in owners}
    for k in range(contracts):
        ident, t = owners[k % OWNERS]
        txs.append(parse_tx(sign_tx(ident, "balance.transfer", t, nonces[t],
                                    {"to": farmer_twin + 1 + (k % 7), "amount": 1})))
        nonces[t] += 1
    clock.now += 1
    t0 = time.perf_counter()
    seal_all(chain, txs)
    transfers_s = time.perf_counter() - t0
    log.close()
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return {
        "contracts": contracts,
        "setup_s": round(setup_s, 1),
        "billing_s": round(billing_s, 3),
        "billing_per_s": round(contracts / billing_s),
        "transfers_s": round(transfers_s, 3),
        "transfers_per_s": round(contracts / transfers_s),
        "billing_to_transfers": round(billing_s / transfers_s, 3),
        "target_s": 10,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contracts", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run(args.contracts)
    if args.json:
        print(orjson.dumps(r, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"setup ({r['contracts']} approved contracts)   {r['setup_s']:9.1f} s")
    print(f"billing one period                   {r['billing_s']:9.3f} s  "
          f"{r['billing_per_s']:9d} contracts/s  (target <= {r['target_s']} s)")
    print(f"{r['contracts']} plain transfers              {r['transfers_s']:9.3f} s  "
          f"{r['transfers_per_s']:9d} tx/s")
    print(f"billing / transfers                  {r['billing_to_transfers']:9.3f}")
    print(f"load average                         {r['load_average']}")


if __name__ == "__main__":
    main()
