"""The node's ledger link against a real ledger: a rejected transaction in a batch does
not take the ones after it down with it (they are re-signed with fresh nonces)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import ProcessGroup
from tests.node.harness import Grid
from zerostack.crypto import Identity
from zerostack.node.link import LedgerLink


def test_batch_survives_a_rejection(procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)

    async def go() -> list[str]:
        link = LedgerLink(grid.url, Identity.generate())
        try:
            await link.ensure_twin("")
            names = [{"name": n} for n in ("a1", "a1", "a2", "a3")]
            errors = await link.submit_many("name.register", names)
            # and the nonce bookkeeping is right afterwards
            await link.submit("name.register", {"name": "a4"})
            return errors
        finally:
            await link.close()

    errors = asyncio.run(go())
    assert errors[0] == "" and "taken" in errors[1] and errors[2:] == ["", ""]
    assert {n["name"] for n in grid.client.names()} == {"a1", "a2", "a3", "a4"}
