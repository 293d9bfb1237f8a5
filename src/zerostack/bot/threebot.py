"""The user's agent (3Bot): registers the user's twin, deploys sealed deployments as
contracts, approves, follows status and cancels; talks to the ledger over HTTP."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from zerostack.bot.spec import BotError
from zerostack.crypto import (
    CryptoError,
    Identity,
    SignatureRequirement,
    canonical_json,
    seal_to,
)
from zerostack.ledger.tx import sign_tx
from zerostack.workloads import Deployment, total_resources

DONE_STATES = ("deployed", "error", "deleted", "expired")


class ThreeBot:
    """One identity acting on one ledger. Every method raises BotError on failure."""

    def __init__(self, ledger_url: str, identity: Identity, timeout: float = 30.0) -> None:
        self.url = ledger_url.rstrip("/")
        self.identity = identity
        self.http = httpx.Client(base_url=self.url, timeout=timeout)
        self._twin: int | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ThreeBot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- HTTP -------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        try:
            resp = self.http.get(path, params={k: v for k, v in params.items()
                                               if v is not None})
        except httpx.HTTPError as exc:
            raise BotError(f"ledger at {self.url} is unreachable ({exc.__class__.__name__}); "
                           "check --ledger / ZEROSTACK_LEDGER") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise BotError(f"ledger answered {resp.status_code}: {resp.text[:200]}")
        return resp.json()

    def _post(self, tx: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self.http.post("/tx", content=orjson.dumps(tx),
                                  headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise BotError(f"ledger at {self.url} is unreachable ({exc.__class__.__name__})")\
                from exc
        data = resp.json()
        if resp.status_code != 200:
            raise BotError(f"ledger refused {tx['type']}: {data.get('error', resp.text[:200])}")
        return dict(data.get("receipt", {}))

    def submit(self, ttype: str, payload: dict[str, Any]) -> dict[str, Any]:
        twin = self.twin_id()
        info = self.get(f"/twins/{twin}")
        return self._post(sign_tx(self.identity, ttype, twin, int(info["nonce"]), payload))

    # ---- identity ---------------------------------------------------------------------

    def twin_id(self, register: bool = True) -> int:
        """This identity's twin id, registering it on first use."""
        if self._twin is None:
            found = self.get("/twins", key=self.identity.public_hex)
            if found:
                self._twin = int(found[0]["id"])
            elif register:
                tx = sign_tx(self.identity, "twin.register", self.identity.public_hex, 0, {})
                self._twin = int(self._post(tx)["twin"])
            else:
                raise BotError("this identity is not registered on the ledger")
        return self._twin

    # ---- contracts --------------------------------------------------------------------

    def contract(self, cid: int) -> dict[str, Any]:
        c = self.get(f"/contracts/{cid}")
        if c is None:
            raise BotError(f"contract {cid} does not exist")
        return dict(c)

    def contracts(self) -> list[dict[str, Any]]:
        return list(self.get("/contracts", owner=self.twin_id(), limit=1000) or [])

    def choose_node(self, deployment: Deployment) -> int:
        need = total_resources(deployment.workloads)
        nodes = self.get("/nodes", status="up", free_cru=need.cru, free_mru=need.mru,
                         free_sru=need.sru, free_hru=need.hru, limit=1)
        if not nodes:
            raise BotError("no node that is up has enough free capacity; pick one with --node")
        return int(nodes[0]["id"])

    def node_key(self, node: int) -> str:
        info = self.get(f"/nodes/{node}")
        if info is None:
            raise BotError(f"node {node} does not exist")
        twin = self.get(f"/twins/{info['twin']}")
        return str(twin["public_key"])

    def deploy(self, deployment: Deployment, node: int | None = None,
               deadline: int | None = None) -> int:
        """Seal the deployment to the node, create the contract, approve it as the owner."""
        node = node if node is not None else self.choose_node(deployment)
        sealed = seal_to(self.node_key(node), canonical_json(deployment.to_dict()))
        payload: dict[str, Any] = {
            "node": node,
            "deployment_hash": deployment.hash(),
            "instructions": base64.b64encode(sealed).decode(),
            "signature_requirement": deployment.signature_requirement.model_dump(),
            "capacity": total_resources(deployment.workloads).to_dict(),
            "approval": deployment.sign(self.identity),
            "metadata": deployment.metadata[:1024],
        }
        if deployment.delete_requirement is not None:
            payload["delete_requirement"] = deployment.delete_requirement.model_dump()
        if deadline is not None:
            payload["deadline"] = deadline
        return int(self.submit("contract.create", payload)["contract"])

    def update(self, cid: int, deployment: Deployment) -> dict[str, Any]:
        """Propose a new version of a running contract (approved by the owner at once)."""
        c = self.contract(cid)
        if int(c["owner"]) != self.twin_id():
            raise BotError(f"contract {cid} belongs to twin {c['owner']}, not to you")
        sealed = seal_to(self.node_key(int(c["node"])), canonical_json(deployment.to_dict()))
        return self.submit("contract.update", {
            "contract": cid,
            "deployment_hash": deployment.hash(),
            "instructions": base64.b64encode(sealed).decode(),
            "signature_requirement": deployment.signature_requirement.model_dump(),
            "capacity": total_resources(deployment.workloads).to_dict(),
            "approval": deployment.sign(self.identity),
        })

    def approve(self, cid: int, expect_hash: str | None = None) -> dict[str, Any]:
        """Sign the pending version's deployment hash as a stakeholder."""
        c = self.contract(cid)
        h = c["deployment_hash"]
        if expect_hash is not None and expect_hash != h:
            raise BotError(f"contract {cid} carries deployment {h}, not the expected "
                           f"{expect_hash}: refusing to sign")
        sig = self.identity.sign(bytes.fromhex(h)).hex()
        return self.submit("contract.approve", {"contract": cid, "deployment_hash": h,
                                                "signature": sig})

    def cancel(self, cid: int) -> dict[str, Any]:
        return self.submit("contract.cancel", {"contract": cid})

    def wait(self, cid: int, until: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the contract (long-polling the ledger's events) until `until(contract)`."""
        deadline = time.monotonic() + timeout
        head = self.get("/head") or {"height": 0}
        since = int(head["height"])
        last: Any = None
        while True:
            c = self.contract(cid)
            key = (c["state"], orjson.dumps(c.get("report")))
            if key != last and on_change is not None:
                on_change(c)
            last = key
            if until(c):
                return c
            left = deadline - time.monotonic()
            if left <= 0:
                raise BotError(f"contract {cid} is still {c['state']} after {timeout:.0f}s")
            ev = self.get("/events", since=since, contract=cid, timeout=min(left, 5.0))
            if ev is not None:
                since = int(ev["next"])

    def open_secret(self, sealed_b64: str) -> dict[str, Any]:
        """A workload's secret result, sealed by the node to this owner."""
        try:
            return dict(orjson.loads(self.identity.open_sealed(base64.b64decode(sealed_b64))))
        except (CryptoError, ValueError) as exc:
            raise BotError("this sealed result does not open with your identity") from exc


def quorum_progress(c: dict[str, Any]) -> str:
    """'weight 1/2 (missing: twin 3)' for a contract waiting on approvals."""
    req = SignatureRequirement.from_dict(c["signature_requirement"]).with_owner(int(c["owner"]))
    signed = {int(t) for t in c.get("approvals", {})}
    weight = sum(r.weight for r in req.requests if r.twin in signed)
    waiting = [r.twin for r in req.requests if r.twin not in signed]
    return (f"weight {weight}/{req.weight_required}"
            + (f", not yet signed by twin(s) {', '.join(map(str, waiting))}" if waiting else ""))
