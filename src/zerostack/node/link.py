"""The node's connection to the ledger over its HTTP API: signed submissions with the
node twin's nonces, contract queries, twin keys, and the long-poll event feed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from zerostack.crypto import Identity
from zerostack.ledger.errors import LedgerError, LedgerRejected
from zerostack.ledger.tx import sign_tx

log = logging.getLogger("zerostack.node.link")

EVENT_WAIT = 20.0


class LedgerLink:
    """Everything the agent asks of the ledger. Raises LedgerError when it cannot."""

    def __init__(self, url: str, identity: Identity) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        self.twin_id = 0
        self._nonce = 0
        self._submit_lock = asyncio.Lock()
        self._keys: dict[int, str] = {}
        self._http: httpx.AsyncClient | None = None
        self._events: httpx.AsyncClient | None = None

    async def open(self) -> None:
        limits = httpx.Limits(max_connections=8)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=30.0, limits=limits)
        self._events = httpx.AsyncClient(base_url=self.url, timeout=EVENT_WAIT + 15)

    async def close(self) -> None:
        for client in (self._http, self._events):
            if client is not None:
                await client.aclose()

    async def _get(self, path: str, client: httpx.AsyncClient | None = None,
                   **params: Any) -> Any:
        http = client or self._http
        assert http is not None, "LedgerLink.open() first"
        try:
            resp = await http.get(path, params={k: v for k, v in params.items()
                                                if v is not None})
        except httpx.HTTPError as exc:
            raise LedgerError(f"ledger at {self.url} is unreachable: {exc!r}") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise LedgerError(f"ledger answered {resp.status_code} to GET {path}: "
                              f"{resp.text[:200]}", status=resp.status_code)
        return resp.json()

    # ---- identity ---------------------------------------------------------------------

    async def ensure_twin(self, endpoint: str) -> int:
        """The node's twin id, registering the node's key as a twin the first time."""
        found = await self._get("/twins", key=self.identity.public_hex)
        if not found:
            tx = sign_tx(self.identity, "twin.register", self.identity.public_hex, 0,
                         {"endpoint": endpoint})
            result = await self._post("/tx", tx)
            self.twin_id = int(result["receipt"]["twin"])
            log.info("event=twin_registered twin=%s", self.twin_id)
        else:
            self.twin_id = int(found[0]["id"])
        await self._refresh_nonce()
        return self.twin_id

    async def _refresh_nonce(self) -> None:
        twin = await self._get(f"/twins/{self.twin_id}")
        if twin is None:
            raise LedgerError(f"twin {self.twin_id} vanished from the ledger")
        self._nonce = int(twin["nonce"])

    async def node_of_twin(self) -> dict[str, Any] | None:
        nodes = await self._get("/nodes", twin=self.twin_id)
        return nodes[0] if nodes else None

    async def twin_key(self, twin: int) -> str:
        key = self._keys.get(twin)
        if key is None:
            data = await self._get(f"/twins/{twin}")
            if data is None:
                raise LedgerError(f"twin {twin} is not registered")
            key = self._keys[twin] = str(data["public_key"])
        return key

    # ---- submission -------------------------------------------------------------------

    async def _post(self, path: str, body: Any) -> Any:
        assert self._http is not None
        try:
            resp = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise LedgerError(f"ledger at {self.url} is unreachable: {exc!r}") from exc
        data = resp.json()
        if resp.status_code != 200:
            raise LedgerRejected(str(data.get("error", resp.text[:200])),
                                 code=str(data.get("code", "error")), status=resp.status_code)
        return data

    async def submit(self, ttype: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Sign and submit one transaction as the node's twin; returns its receipt."""
        async with self._submit_lock:
            for attempt in (0, 1):
                tx = sign_tx(self.identity, ttype, self.twin_id, self._nonce, payload)
                try:
                    result = await self._post("/tx", tx)
                except LedgerRejected as exc:
                    if exc.code == "bad_nonce" and not attempt:
                        await self._refresh_nonce()
                        continue
                    raise
                self._nonce += 1
                return dict(result.get("receipt", {}))
            raise AssertionError("unreachable")

    async def submit_many(self, ttype: str, payloads: list[dict[str, Any]]) -> list[str]:
        """Submit a batch in one request; returns the error of each ('' when accepted).

        A rejected transaction leaves a gap in the nonces, so the ones after it fail with
        `bad_nonce`: those are signed again with fresh nonces and resubmitted.
        """
        errors = [""] * len(payloads)
        todo = list(range(len(payloads)))
        async with self._submit_lock:
            for _ in range(3):
                if not todo:
                    break
                txs = [sign_tx(self.identity, ttype, self.twin_id, self._nonce + k, payloads[i])
                       for k, i in enumerate(todo)]
                data = await self._post("/txs", txs)
                retry = []
                for i, r in zip(todo, data["results"], strict=True):
                    errors[i] = str(r.get("error", ""))
                    if r.get("code") == "bad_nonce":
                        retry.append(i)
                    elif errors[i]:
                        log.warning("event=submit_rejected type=%s contract=%s error=%r",
                                    ttype, payloads[i].get("contract"), errors[i])
                if any(errors[i] for i in todo):
                    await self._refresh_nonce()
                else:
                    self._nonce += len(todo)
                todo = retry
        return errors

    # ---- contracts and events ---------------------------------------------------------

    async def contract(self, cid: int) -> dict[str, Any] | None:
        data = await self._get(f"/contracts/{cid}")
        return None if data is None else dict(data)

    async def node_contracts(self, node: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = await self._get("/contracts", node=node, limit=1000, offset=len(out))
            out.extend(page or [])
            if not page or len(page) < 1000:
                return out

    async def height(self) -> int:
        head = await self._get("/head")
        return int(head.get("height", 0)) if head else 0

    async def node_events(self, node: int, since: int) -> tuple[int, set[int]]:
        """Wait for blocks after `since`; the contracts on `node` other parties touched."""
        data = await self._get("/events", client=self._events, since=since, node=node,
                               timeout=EVENT_WAIT)
        if data is None:
            return since, set()
        contracts = {
            int(e["receipt"]["contract"]) for e in data["events"]
            if "contract" in e.get("receipt", {}) and e["type"] != "contract.report"
        }
        return int(data["next"]), contracts
