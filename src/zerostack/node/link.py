"""The ledger as the node sees it, on top of AsyncLedgerClient: the node's twin and node
record, its contracts, the events that touch them, and the last ledger header the node saw
(a ledger that does not extend it is refused). Keys of the twins that sign are never taken
from here: the node reads them from the deployments it opens."""

from __future__ import annotations

import logging
from typing import Any

from zerostack.crypto import Identity
from zerostack.ledger.client import AsyncLedgerClient
from zerostack.ledger.errors import LedgerError
from zerostack.ledger.pin import HeaderPin

log = logging.getLogger("zerostack.node.link")

EVENT_WAIT = 20.0
PAGE = 1000


class LedgerLink:
    """Everything the agent asks of the ledger, signed as the node's twin. Raises
    LedgerError when it cannot."""

    def __init__(self, url: str, identity: Identity, pin: HeaderPin | None = None) -> None:
        self.client = AsyncLedgerClient(url)
        self.identity = identity
        self.pin = pin
        self.twin_id = 0

    async def check_ledger(self) -> None:
        """Raise LedgerError unless the ledger's signed head extends the last one the node
        saw (no rollback, no fork, the same operator key); then remember the new head."""
        if self.pin is None:
            return
        try:
            await self.pin.check_async(self.client)
        except LedgerError as exc:
            if exc.code == "untrusted":
                log.error("event=ledger_refused reason=%r", str(exc))
            raise

    async def close(self) -> None:
        await self.client.close()

    # ---- identity ---------------------------------------------------------------------

    async def ensure_twin(self, endpoint: str) -> int:
        """The node's twin id, registering the node's key as a twin the first time."""
        known = self.twin_id
        self.twin_id = await self.client.register_twin(self.identity, endpoint)
        if not known:
            log.info("event=twin_ready twin=%s", self.twin_id)
        return self.twin_id

    async def node_of_twin(self) -> dict[str, Any] | None:
        nodes = await self.client.nodes(twin=self.twin_id)
        return nodes[0] if nodes else None

    # ---- submission -------------------------------------------------------------------

    async def submit(self, ttype: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Sign and submit one transaction as the node's twin; returns its receipt."""
        result = await self.client.send(self.identity, ttype, payload, sender=self.twin_id)
        return dict(result.get("receipt", {}))

    async def submit_many(self, ttype: str, payloads: list[dict[str, Any]]) -> list[str]:
        """Submit a batch in one request; returns the error of each ('' when accepted)."""
        results = await self.client.send_many(self.identity, ttype, payloads,
                                              sender=self.twin_id)
        errors = [str(r.get("error", "")) for r in results]
        for payload, error in zip(payloads, errors, strict=True):
            if error:
                log.warning("event=submit_rejected type=%s contract=%s error=%r",
                            ttype, payload.get("contract"), error)
        return errors

    # ---- contracts and events ---------------------------------------------------------

    async def contract(self, cid: int) -> dict[str, Any] | None:
        return await self.client.contract(cid)

    async def solution(self, sid: int) -> dict[str, Any] | None:
        return await self.client.solution(sid)

    async def node_contracts(self, node: int) -> list[dict[str, Any]]:
        """Every contract the ledger lists for `node`, page after page."""
        out: list[dict[str, Any]] = []
        while True:
            page = await self.client.contracts(node=node, limit=PAGE, offset=len(out))
            out.extend(page)
            if len(page) < PAGE:
                return out

    async def height(self) -> int:
        return int((await self.client.head()).get("height", 0))

    async def node_events(self, node: int, since: int | str) -> tuple[str, set[int]]:
        """Wait for events after cursor `since`; the next cursor, and the contracts on
        `node` other parties touched (the node's own reports and consumption reports are
        left out: they change nothing it has to do)."""
        data = await self.client.events(since, timeout=EVENT_WAIT, node=node)
        contracts = {
            int(e["receipt"]["contract"]) for e in data["events"]
            if "contract" in e.get("receipt", {})
            and e["type"] not in ("contract.report", "contract.consumption")
        }
        # a solution approval settles contracts on several nodes at once
        contracts |= {
            int(p["contract"]) for e in data["events"]
            for p in (e.get("receipt", {}).get("parts") or ())
            if isinstance(p, dict) and p.get("node") == node
        }
        return str(data["next"]), contracts
