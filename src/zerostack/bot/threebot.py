"""The user's agent (3Bot): registers the user's twin, deploys sealed deployments as
contracts, approves, follows status and cancels, through the ledger's LedgerClient."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import orjson

from zerostack.bot.spec import BotError, build_deployment
from zerostack.crypto import (
    CryptoError,
    Identity,
    KeyChanged,
    KeyPins,
    SignatureRequirement,
)
from zerostack.ledger.client import LedgerClient
from zerostack.ledger.errors import LedgerError, LedgerRejected
from zerostack.ledger.pin import HeaderPin
from zerostack.ledger.pricing import Offer, rank_nodes
from zerostack.workloads import (
    Deployment,
    PublicIPWorkload,
    WorkloadError,
    open_instructions,
    priced_units,
    reserved_units,
    seal_instructions,
    summarize,
    total_resources,
)

DONE_STATES = ("deployed", "error", "deleted", "expired")

P = ParamSpec("P")
R = TypeVar("R")

CANDIDATES = 50
"""Nodes with room compared by price when a deployment names no node."""


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


@dataclass(frozen=True)
class Review:
    """A pending contract version as a stakeholder sees it before signing: the deployment
    it opened and checked itself, and where the approval will count."""

    contract: int
    version: int
    node: int
    deployment: Deployment
    signed: frozenset[int]  # twins whose approval the ledger lists already

    @property
    def hash(self) -> str:
        return self.deployment.hash()

    def summary(self) -> dict[str, Any]:
        return {"contract": self.contract, "version": self.version, "node": self.node,
                "approved_by": sorted(self.signed), **summarize(self.deployment)}


class ThreeBot:
    """One identity acting on one ledger. Every method raises BotError on failure.

    `pins` remembers the key of every twin and node seen (on disk, when the CLI gives a
    path): a ledger that later serves another key for them is refused, not believed.
    `pin` remembers the last signed ledger header seen: a ledger that rolled back or
    forked is refused (`check_ledger`)."""

    def __init__(self, ledger_url: str, identity: Identity, timeout: float = 30.0,
                 pins: KeyPins | None = None, pin: HeaderPin | None = None) -> None:
        self.url = ledger_url.rstrip("/")
        self.identity = identity
        self.ledger = LedgerClient(self.url, timeout=timeout)
        self.pins = pins if pins is not None else KeyPins()
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
    def offers(self, reserved: dict[str, int], max_cost: int | None = None,
               candidates: int = CANDIDATES) -> list[Offer]:
        """Nodes that are up with room for `reserved`, cheapest first at the prices a
        contract made on each now gets (at most `max_cost` per month when set)."""
        nodes = self.ledger.nodes(status="up", free_cru=reserved.get("cru", 0),
                                  free_mru=reserved.get("mru", 0),
                                  free_sru=reserved.get("sru", 0),
                                  free_hru=reserved.get("hru", 0), limit=candidates)
        prices: dict[int, dict[str, int] | None] = {}
        for n in nodes:
            got = self.ledger.node_prices(int(n["id"]))
            if got is not None:
                prices[int(n["id"])] = got["prices"]
        return rank_nodes(nodes, reserved, prices, max_cost)

    def choose_node(self, deployment: Deployment, max_cost: int | None = None) -> int:
        """The cheapest node that is up with room for the deployment (within `max_cost`
        per month when set)."""
        found = self.offers(reserved_units(deployment.workloads), max_cost)
        if not found:
            within = "" if max_cost is None else f" within {max_cost} per month"
            raise BotError(f"no node that is up has enough free capacity{within}; pick one "
                           "with --node")
        return found[0].node

    def _pin(self, kind: str, ident: int, key: str) -> str:
        try:
            self.pins.pin(kind, ident, key)
        except KeyChanged as exc:
            raise BotError(f"ledger at {self.url} serves another key than before: {exc}") \
                from exc
        return key

    @_as_bot_error
    def twin_key(self, twin: int) -> str:
        """A twin's public key: the ledger's answer, checked against the pinned one."""
        if self._twin is not None and twin == self._twin:
            return self.identity.public_hex
        info = self.ledger.twin(twin)
        if info is None:
            raise BotError(f"twin {twin} is not registered")
        return self._pin("twin", twin, str(info["public_key"]))

    @_as_bot_error
    def node_key(self, node: int) -> str:
        """A node's public key (what its instructions are sealed to), pinned like twins'."""
        info = self.ledger.node(node)
        if info is None:
            raise BotError(f"node {node} does not exist")
        twin = self.ledger.twin(int(info["twin"]))
        if twin is None:
            raise BotError(f"node {node}'s twin {info['twin']} is not registered")
        return self._pin("node", node, str(twin["public_key"]))

    def build(self, data: dict[str, Any], stakeholders: list[str],
              weight_required: int | None, version: int = 1) -> Deployment:
        """A deployment owned by this identity, every signer named by its (pinned) key."""
        return build_deployment(data, self.twin_id(), stakeholders, weight_required, version,
                                key_of=self.twin_key)

    def _check_keys(self, deployment: Deployment) -> None:
        """Every key the deployment names is the one this side knows for that twin."""
        for twin, key in deployment.keys().items():
            known = self.twin_key(twin)
            if known != key:
                raise BotError(f"the deployment names key {key[:16]}… for twin {twin}, whose "
                               f"key is {known[:16]}…: refusing it")

    @_as_bot_error
    def deploy(self, deployment: Deployment, node: int | None = None,
               deadline: int | None = None, max_cost: int | None = None) -> int:
        """Sign the deployment, seal it to the node (by default the cheapest with room,
        within `max_cost` per month) and every stakeholder, create the contract and
        approve it as the owner."""
        self._check_keys(deployment)
        node = node if node is not None else self.choose_node(deployment, max_cost)
        delete_req = deployment.delete_requirement
        units = priced_units(deployment.workloads)
        return self.ledger.create_contract(
            self.identity, node, deployment.hash(),
            self._seal(deployment, node), deployment.requirement().to_dict(),
            body_hash=deployment.body_hash(),
            delete_requirement=None if delete_req is None else delete_req.to_requirement().to_dict(),
            deadline=deadline,
            capacity=total_resources(deployment.workloads).to_dict(),
            approval=deployment.approve(self.identity, 0, 1, node),
            metadata=deployment.metadata[:1024],
            ipv4=units["ipv4"],
            names=units["names"],
            ipv6=sum(1 for w in deployment.workloads
                     if isinstance(w, PublicIPWorkload) and w.v6),
        )

    def _seal(self, deployment: Deployment, node: int, also: list[str] | None = None) -> str:
        try:
            return seal_instructions(deployment, self.identity, self.node_key(node), also or ())
        except WorkloadError as exc:
            raise BotError(str(exc)) from exc

    @_as_bot_error
    def update(self, cid: int, deployment: Deployment) -> dict[str, Any]:
        """Propose a new version of a running contract (approved by the owner at once).
        It is sealed to the current version's stakeholders too: they must consent."""
        c = self.contract(cid)
        if int(c["owner"]) != self.twin_id():
            raise BotError(f"contract {cid} belongs to twin {c['owner']}, not to you")
        self._check_keys(deployment)
        current = SignatureRequirement.from_dict((c.get("active") or c)["signature_requirement"])
        for twin, key in current.keys().items():
            if self.twin_key(twin) != key:
                raise BotError(f"contract {cid} names key {key[:16]}… for twin {twin}, "
                               "which is not its key: refusing it")
        result = self.ledger.update_contract(
            self.identity, cid, deployment.hash(),
            self._seal(deployment, int(c["node"]), list(current.keys().values())),
            body_hash=deployment.body_hash(),
            signature_requirement=deployment.requirement().to_dict(),
            capacity=total_resources(deployment.workloads).to_dict(),
            version=int(c["version"]) + 1,
            node=int(c["node"]),
        )
        return dict(result["receipt"])

    @_as_bot_error
    def review(self, cid: int) -> Review:
        """Open the pending version's instructions with this identity and check them:
        the hash the ledger shows, the owner's signature and every key it names."""
        c = self.contract(cid)
        if not c.get("pending"):
            raise BotError(f"contract {cid} has no version waiting for approval")
        try:
            opened = open_instructions(self.identity, c["instructions"])
        except WorkloadError as exc:
            raise BotError(f"cannot read what contract {cid} asks you to sign ({exc}); only "
                           "a stakeholder the deployment names can") from exc
        dep = opened.deployment
        if dep.hash() != c["deployment_hash"]:
            raise BotError(f"HASH MISMATCH on contract {cid}: the ledger shows deployment "
                           f"{c['deployment_hash']}, but the instructions sealed to you hash "
                           f"to {dep.hash()}. Refusing to sign.")
        if dep.twin_id != int(c["owner"]):
            raise BotError(f"contract {cid} is owned by twin {c['owner']}, but its deployment "
                           f"names twin {dep.twin_id}: refusing to sign")
        self._check_keys(dep)
        me = self.identity.public_hex
        if me not in dep.keys().values() and me not in SignatureRequirement.from_dict(
                (c.get("active") or c)["signature_requirement"]).keys().values():
            raise BotError(f"you are not a stakeholder of contract {cid}")
        return Review(cid, int(c["version"]), int(c["node"]), dep,
                      frozenset(int(t) for t in c.get("approvals") or {}))

    @_as_bot_error
    def approve(self, cid: int, expect_hash: str | None = None,
                confirm: Callable[[Review], bool] | None = None) -> dict[str, Any]:
        """Review the pending version, then sign what this side recomputed (never the hash
        the ledger shows), bound to the contract, version and node; `confirm` may say no."""
        review = self.review(cid)
        if expect_hash is not None and expect_hash != review.hash:
            raise BotError(f"contract {cid} carries deployment {review.hash}, not the expected "
                           f"{expect_hash}: refusing to sign")
        if confirm is not None and not confirm(review):
            raise BotError(f"contract {cid} not approved")
        return dict(self.ledger.approve(self.identity, cid, review.hash, version=review.version,
                                        node=review.node)["receipt"])

    @_as_bot_error
    def cancel(self, cid: int) -> dict[str, Any]:
        """Vote to cancel: a signed vote the node checks against the delete requirement."""
        c = self.contract(cid)
        return dict(self.ledger.cancel(self.identity, cid, node=int(c["node"]))["receipt"])

    @_as_bot_error
    def wait(self, cid: int, until: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the contract (long-polling the ledger's events) until `until(contract)`."""
        deadline = time.monotonic() + timeout
        since: int | str = int(self.ledger.head()["height"])
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
            since = str(self.ledger.events(since, contract=cid, timeout=min(left, 5.0))["next"])

    def open_secret(self, sealed_b64: str) -> dict[str, Any]:
        """A workload's secret result, sealed by the node to this owner."""
        try:
            return dict(orjson.loads(self.identity.open_sealed(base64.b64decode(sealed_b64))))
        except (CryptoError, ValueError) as exc:
            raise BotError("this sealed result does not open with your identity") from exc


def quorum_progress(c: dict[str, Any]) -> str:
    """'weight 1/2 (missing: twin 3)' for a contract waiting on approvals."""
    req = SignatureRequirement.from_dict(c["signature_requirement"])
    signed = {int(t) for t in c.get("approvals", {})}
    weight = sum(r.weight for r in req.requests if r.twin in signed)
    waiting = [r.twin for r in req.requests if r.twin not in signed]
    return (f"weight {weight}/{req.weight_required}"
            + (f", not yet signed by twin(s) {', '.join(map(str, waiting))}" if waiting else ""))
