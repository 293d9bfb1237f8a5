"""Clients given several ledger URLs: they skip one that cannot be reached, a transaction
sent again is answered as committed instead of being applied twice, and a single ledger
serves its one-validator set."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd
from zerostack.crypto import Identity
from zerostack.ledger import AsyncLedgerClient, LedgerClient, LedgerError, LedgerRejected, sign_tx
from zerostack.ledger.client import ledger_urls


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    group = ProcessGroup()
    try:
        port = free_port()
        db = tmp_path_factory.mktemp("ledger") / "ledger.db"
        proc = group.start([*zerostack_cmd(), "ledger", "serve", "--db", str(db),
                            "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        group.stop_all()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_urls_are_split_and_bounded() -> None:
    assert ledger_urls("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    assert ledger_urls(["http://a:1"]) == ["http://a:1"]
    with pytest.raises(LedgerError):
        ledger_urls(" , ")
    with pytest.raises(LedgerError):
        ledger_urls(",".join(f"http://h:{i}" for i in range(17)))


def test_sync_client_skips_an_unreachable_url_and_resubmits_safely(url: str) -> None:
    me = Identity.generate()
    with LedgerClient([dead_url(), url]) as c:
        twin = c.register_twin(me)
        assert c.url == url  # moved on, and stays there
        tx = sign_tx(me, "name.register", twin, 1, {"name": f"fo{twin}"})
        first = c.submit(tx)
        # the same signed bytes again (a client that lost the first answer): answered
        # as committed, at the same height, not applied twice
        again = c.submit(tx)
        assert again["hash"] == first["hash"] and again["height"] == first["height"]
        assert c.twin(twin)["nonce"] == 2
        # a different transaction with a used nonce is still refused
        other = sign_tx(me, "name.register", twin, 1, {"name": f"fo{twin}b"})
        with pytest.raises(LedgerRejected) as info:
            c.submit(other)
        assert info.value.code == "bad_nonce"
    with LedgerClient([dead_url(), dead_url()]) as c, pytest.raises(LedgerError) as err:
        c.head()
    assert err.value.code == "unreachable"


def test_async_client_fails_over_and_follows_events(url: str) -> None:
    async def run() -> None:
        me = Identity.generate()
        async with AsyncLedgerClient(f"{dead_url()},{url}") as c:
            twin = await c.register_twin(me)
            head = await c.head()
            events = await c.events(head["height"] - 1, timeout=0)
            assert any(e["receipt"].get("twin") == twin for e in events["events"])
            assert c.url == url

    asyncio.run(run())


def test_a_single_ledger_is_a_one_validator_grid(url: str) -> None:
    with LedgerClient(url) as c:
        operator = c._get("/operator")["key"]
        vals = c.validators()
        assert vals == {"epoch": 0, "validators": [operator], "quorum": 1, "changes": []}
        info = c._get("/cluster")
        assert info["mode"] == "single" and info["key"] == operator


def test_pin_of_a_single_ledger_stays_an_operator_pin(url: str, tmp_path: Path) -> None:
    import json

    from zerostack.ledger.pin import HeaderPin

    with LedgerClient(url) as c:
        c.register_twin(Identity.generate())
        HeaderPin(tmp_path / "pin.json").check(c)
    saved = json.loads((tmp_path / "pin.json").read_text())
    assert set(saved) == {"operator_key", "height", "hash"}
