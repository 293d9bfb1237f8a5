"""The node's traffic meter and its check of billing notices, without a grid."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from zerostack.crypto import Domain, Identity, billing_notice_digest
from zerostack.ledger.errors import LedgerError
from zerostack.node.billing import TrafficMeter, check_notice


def test_meter_counts_increases_survives_resets_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "traffic.json"
    m = TrafficMeter(path)
    m.sample(7, {"net/wireguard": (1000, 500)})  # first sight: the baseline
    assert m.pending(7) == (0, 0)
    m.sample(7, {"net/wireguard": (1600, 900), "net/uplink": (10, 10)})
    assert m.pending(7) == (600, 400)
    # the interface was made again: its counters restarted from 0
    m.sample(7, {"net/wireguard": (50, 20), "net/uplink": (110, 30)})
    assert m.pending(7) == (600 + 50 + 100, 400 + 20 + 20)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = TrafficMeter(path)  # an agent restart loses nothing
    assert again.pending(7) == (750, 440)
    again.reported(7, 700, 440)
    assert again.pending(7) == (50, 0)
    again.forget(7)
    assert TrafficMeter(path).pending(7) == (0, 0)


def test_a_damaged_count_file_is_kept_aside_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "traffic.json"
    path.write_text('{"7": {"pending": [5')  # cut short, e.g. by a full disk
    m = TrafficMeter(path)
    assert m.pending(7) == (0, 0) and not path.exists()
    assert (tmp_path / "traffic.json.corrupt").read_text() == '{"7": {"pending": [5'
    m.sample(7, {"net/wireguard": (1, 1)})
    assert (tmp_path / "traffic.json.corrupt").read_text() == '{"7": {"pending": [5'
    assert TrafficMeter(path).pending(7) == (0, 0)


def _notice(op: Identity, **over: object) -> dict[str, object]:
    n: dict[str, object] = {"contract": 3, "node": 2, "owner": 5, "state": "grace",
                            "standing": "grace", "due": 10, "grace_until": 99,
                            "grace_ended": 0, "height": 40, "block": "ab" * 32, "time": 90,
                            **over}
    n["key"] = op.public_hex
    n["signature"] = op.sign(Domain.BILLING_NOTICE, billing_notice_digest(n)).hex()
    return n


def test_check_notice_refuses_all_but_the_operators_fresh_notice_for_this_contract() -> None:
    op, other = Identity.generate(), Identity.generate()
    key = op.public_hex
    assert check_notice(_notice(op), key, 3, 2, 40, "ab" * 32) == "grace"
    assert check_notice(_notice(op, standing="ended"), key, 3, 2, 12, "cd" * 32) == "ended"
    cases = [
        (_notice(other), "not signed"),  # signed by someone else
        ({**_notice(op), "standing": "ended"}, "not signed"),  # changed after signing
        ({**_notice(op), "signature": op.sign(Domain.BLOCK_HEADER, b"x" * 32).hex()},
         "not signed"),
        (_notice(op, contract=4), "about contract 4"),  # another contract
        (_notice(op, node=9), "on node 9"),  # another node's contract
        (_notice(op, height=39), "stale"),  # older than the head this node checked
        (_notice(op, block="ef" * 32), "another block"),  # a fork at the pinned height
        (_notice(op, standing="free"), "unknown standing"),
        ("not a notice", "not an object"),
    ]
    for notice, why in cases:
        with pytest.raises(LedgerError, match=why):
            check_notice(notice, key, 3, 2, 40, "ab" * 32)
    with pytest.raises(LedgerError, match="no ledger operator key"):
        check_notice(_notice(op), None, 3, 2, 40, "ab" * 32)
