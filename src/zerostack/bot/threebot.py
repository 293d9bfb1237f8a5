"""The user's agent (3Bot): registers the user's twin, deploys sealed deployments as
contracts, approves, follows status and cancels, through the ledger's LedgerClient."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import orjson

from zerostack.bot.spec import BotError
from zerostack.crypto import (
    CryptoError,
    Identity,
    SignatureRequirement,
    canonical_json,
    seal_to,
)
from zerostack.ledger.client import LedgerClient
from zerostack.ledger.errors import LedgerError, LedgerRejected
from zerostack.ledger.pin import HeaderPin
from zerostack.workloads import Deployment, total_resources

DONE_STATES = ("deployed", "error", "deleted", "expired")

P = ParamSpec("P")
R = TypeVar("R")


def _as_bot_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the ledger client's errors into BotError messages a user can act on."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except LedgerRejected as exc:
            raise BotError(f"ledger refused {fn.__name__}: {exc}") from exc
        except LedgerError as exc:
            bot = args[0]
            assert isinstance(bot, ThreeBot)
            if exc.code == "unreachable":
                raise BotError(f"ledger at {bot.url} is unreachable ({type(exc.__cause__).__name__}); "
                               "check --ledger / ZEROSTACK_LEDGER") from exc
            raise BotError(f"ledger at {bot.url}: {exc}") from exc
    return wrapper


class ThreeBot:
    """One identity acting on one ledger. Every method raises BotError on failure."""

    def __init__(self, ledger_url: str, identity: Identity, timeout: float = 30.0,
                 pin: HeaderPin | None = None) -> None:
        self.url = ledger_url.rstrip("/")
        self.identity = identity
        self.ledger = LedgerClient(self.url, timeout=timeout)
        self.pin = pin
        self._twin: int | None = None

    @_as_bot_error
    def check_ledger(self) -> None:
        """Refuse a ledger that does not extend the last header this user saw (a rollback,
        a fork, another operator key); then remember its head. No-op without a pin."""
        if self.pin is not None:
            self.pin.check(self.ledger)

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> ThreeBot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- identity ---------------------------------------------------------------------

    @_as_bot_error
    def twin_id(self, register: bool = True) -> int:
        """This identity's twin id, registering it on first use."""
        if self._twin is None:
            found = self.ledger.twin_by_key(self.identity.public_hex)
            if found is not None:
                self._twin = int(found["id"])
            elif register:
                self._twin = self.ledger.register_twin(self.identity)
            else:
                raise BotError("this identity is not registered on the ledger")
        return self._twin

    # ---- contracts --------------------------------------------------------------------

    @_as_bot_error
    def contract(self, cid: int) -> dict[str, Any]:
        c = self.ledger.contract(cid)
        if c is None:
            raise BotError(f"contract {cid} does not exist")
        return c

    @_as_bot_error
    def contracts(self) -> list[dict[str, Any]]:
        return self.ledger.contracts(owner=self.twin_id(), limit=1000)

    @_as_bot_error
    def choose_node(self, deployment: Deployment) -> int:
        need = total_resources(deployment.workloads)
        nodes = self.ledger.nodes(status="up", free_cru=need.cru, free_mru=need.mru,
                                  free_sru=need.sru, free_hru=need.hru, limit=1)
        if not nodes:
            raise BotError("no node that is up has enough free capacity; pick one with --node")
        return int(nodes[0]["id"])

    @_as_bot_error
    def node_key(self, node: int) -> str:
        info = self.ledger.node(node)
        if info is None:
            raise BotError(f"node {node} does not exist")
        twin = self.ledger.twin(int(info["twin"]))
        if twin is None:
            raise BotError(f"node {node}'s twin {info['twin']} is not registered")
        return str(twin["public_key"])

    def _sealed_for(self, node: int, deployment: Deployment) -> str:
        """The deployment sealed to the node's key, base64 (what a contract carries)."""
        sealed = seal_to(self.node_key(node), canonical_json(deployment.to_dict()))
        return base64.b64encode(sealed).decode()

    @_as_bot_error
    def deploy(self, deployment: Deployment, node: int | None = None,
               deadline: int | None = None) -> int:
        """Seal the deployment to the node, create the contract, approve it as the owner."""
        node = node if node is not None else self.choose_node(deployment)
        delete_req = deployment.delete_requirement
        return self.ledger.create_contract(
            self.identity, node, deployment.hash(), self._sealed_for(node, deployment),
            deployment.signature_requirement.model_dump(),
            delete_requirement=None if delete_req is None else delete_req.model_dump(),
            deadline=deadline,
            capacity=total_resources(deployment.workloads).to_dict(),
            approval=deployment.approve(self.identity, 0, 1, node),
            metadata=deployment.metadata[:1024],
        )

    @_as_bot_error
    def update(self, cid: int, deployment: Deployment) -> dict[str, Any]:
        """Propose a new version of a running contract (approved by the owner at once)."""
        c = self.contract(cid)
        if int(c["owner"]) != self.twin_id():
            raise BotError(f"contract {cid} belongs to twin {c['owner']}, not to you")
        result = self.ledger.update_contract(
            self.identity, cid, deployment.hash(),
            self._sealed_for(int(c["node"]), deployment),
            signature_requirement=deployment.signature_requirement.model_dump(),
            capacity=total_resources(deployment.workloads).to_dict(),
            version=int(c["version"]) + 1,
            node=int(c["node"]),
        )
        return dict(result["receipt"])

    @_as_bot_error
    def approve(self, cid: int, expect_hash: str | None = None) -> dict[str, Any]:
        """Sign the pending version's deployment hash as a stakeholder."""
        c = self.contract(cid)
        h = c["deployment_hash"]
        if expect_hash is not None and expect_hash != h:
            raise BotError(f"contract {cid} carries deployment {h}, not the expected "
                           f"{expect_hash}: refusing to sign")
        return dict(self.ledger.approve(self.identity, cid, h, version=int(c["version"]),
                                        node=int(c["node"]))["receipt"])

    @_as_bot_error
    def cancel(self, cid: int) -> dict[str, Any]:
        return dict(self.ledger.cancel(self.identity, cid)["receipt"])

    @_as_bot_error
    def wait(self, cid: int, until: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the contract (long-polling the ledger's events) until `until(contract)`."""
        deadline = time.monotonic() + timeout
        since = int(self.ledger.head()["height"])
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
            since = int(self.ledger.events(since, contract=cid, timeout=min(left, 5.0))["next"])

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
