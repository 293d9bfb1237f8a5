"""A small driver for the pure state machine: identities, nonces and a clock for tests."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from zerostack.crypto import (
    Identity,
    QuorumError,
    SignatureRequirement,
    deployment_hash,
    hash_hex,
)
from zerostack.ledger.errors import Rejected
from zerostack.ledger.state import Receipt, State, apply_with_receipt, genesis, tick
from zerostack.ledger.tx import (
    Tx,
    parse_tx,
    sign_approval,
    sign_cancel_vote,
    sign_consumption,
    sign_tx,
)

GiB = 1 << 30


class World:
    """Applies signed transactions to a State, one block (same time) per call unless told."""

    def __init__(self, time: int = 1_000_000) -> None:
        # the ledger operator's key, which governs the grid's pricing policy
        self.operator = Identity.from_seed(b"\x99" * 32)
        self.governor_nonce = 0
        self.state: State = genesis(self.operator.public_hex)
        self.time = time
        self.keys: dict[int, Identity] = {}
        self.nonces: dict[int, int] = {}
        self.accepted: list[tuple[int, Tx]] = []
        # every (time, accepted tx or None) in order: what a chain of blocks would hold,
        # including the clock ticks of refused transactions (empty blocks)
        self.timeline: list[tuple[int, Tx | None]] = []

    def tx(self, twin: int, ttype: str, payload: dict[str, Any], nonce: int | None = None,
           identity: Identity | None = None) -> Tx:
        ident = identity or self.keys[twin]
        n = self.nonces[twin] if nonce is None else nonce
        if ttype == "contract.consumption" and "signature" not in payload:
            try:
                payload = self.sign_consumption(ident, payload)
            except (KeyError, TypeError, ValueError, AttributeError):
                pass  # a malformed payload (fuzzing) goes unsigned: the ledger refuses it
        return parse_tx(sign_tx(ident, ttype, twin, n, payload))

    def sign_consumption(self, ident: Identity, payload: dict[str, Any]) -> dict[str, Any]:
        """`payload` signed by `ident` as a consumption report of the contract's node."""
        c = self.state.contracts.get(payload.get("contract", 0))
        node = c.node if c is not None else 0
        return {**payload, "signature": sign_consumption(
            ident, payload["contract"], node, payload["period"], payload.get("reserved", {}),
            payload.get("traffic_in", 0), payload.get("traffic_out", 0))}

    def apply_tx(self, tx: Tx) -> Receipt | Rejected:
        self.state = tick(self.state, self.time)
        result = apply_with_receipt(self.state, tx, time=self.time)
        if isinstance(result, Rejected):
            self.timeline.append((self.time, None))
            return result
        self.state, receipt = result
        self.accepted.append((self.time, tx))
        self.timeline.append((self.time, tx))
        if isinstance(tx.sender, int):
            self.nonces[tx.sender] = tx.nonce + 1
        return receipt

    def govern(self, payload: dict[str, Any], identity: Identity | None = None,
               nonce: int | None = None) -> Receipt | Rejected:
        """A `grid.policy` sent by the governing key (or by `identity` posing as it)."""
        ident = identity or self.operator
        n = self.governor_nonce if nonce is None else nonce
        result = self.apply_tx(parse_tx(sign_tx(ident, "grid.policy", self.operator.public_hex,
                                                n, payload)))
        if not isinstance(result, Rejected):
            self.governor_nonce += 1
        return result

    def send(self, twin: int, ttype: str, payload: dict[str, Any], **kw: Any) -> Receipt | Rejected:
        return self.apply_tx(self.tx(twin, ttype, payload, **kw))

    def ok(self, twin: int, ttype: str, payload: dict[str, Any], **kw: Any) -> Receipt:
        result = self.send(twin, ttype, payload, **kw)
        assert not isinstance(result, Rejected), result
        return result

    def twin(self, ident: Identity | None = None) -> int:
        ident = ident or Identity.generate()
        result = self.apply_tx(parse_tx(sign_tx(ident, "twin.register", ident.public_hex, 0, {})))
        assert not isinstance(result, Rejected), result
        tid = int(result["twin"])
        self.keys[tid] = ident
        self.nonces[tid] = 1
        return tid

    def farm(self, owner: int, name: str = "farm") -> int:
        return int(self.ok(owner, "farm.create", {"name": name})["farm"])

    def node(self, farm: int, country: str = "BE", mru: int = 16 * GiB,
             cru: int = 8) -> tuple[int, int]:
        twin = self.twin()
        receipt = self.ok(twin, "node.register", {
            "farm": farm,
            "capacity": {"cru": cru, "mru": mru, "sru": 100 * GiB, "hru": 1000 * GiB},
            "location": {"country": country, "city": "x"},
        })
        return int(receipt["node"]), twin

    def approval(self, twin: int, deployment_hash: str, *, node: int, contract: int = 0,
                 version: int = 1) -> str:
        """`twin`'s approval of a deployment: contract 0 is the one a create makes."""
        return sign_approval(self.keys[twin], contract, version, node, deployment_hash)

    def approves(self, twin: int, cid: int, deployment_hash: str,
                 signer: int | None = None) -> str:
        """An approval of contract `cid`'s pending version, as the state has it."""
        c = self.state.contracts.get(cid)
        version, node = (c.proposal.version, c.node) if c is not None else (1, 0)
        return self.approval(twin if signer is None else signer, deployment_hash, node=node,
                             contract=cid, version=version)

    def update_approval(self, twin: int, cid: int, deployment_hash: str) -> str:
        """The owner's approval riding on a `contract.update` of `cid`."""
        c = self.state.contracts.get(cid)
        version, node = (c.proposal.version + 1, c.node) if c is not None else (2, 0)
        return self.approval(twin, deployment_hash, node=node, contract=cid, version=version)


def deployment(n: int = 0) -> str:
    return hash_hex({"deployment": n})


def sealed(text: str = "instructions") -> str:
    return base64.b64encode(text.encode()).decode()


def key_of(w: World | Mapping[int, str], twin: int) -> str:
    """A twin's key (a made-up one for an id nobody registered)."""
    if isinstance(w, World):
        return w.keys[twin].public_hex if twin in w.keys else f"{twin:064x}"
    return w.get(twin, f"{twin:064x}")


def requirement(w: World | Mapping[int, str], owner: int, *twins: int, weight_required: int | None = None,
                required: tuple[int, ...] = ()) -> dict[str, Any]:
    """`owner` (always required) and `twins`, weight 1 each, named by their keys."""
    listed = [owner, *(t for t in twins if t != owner)]
    return {
        "requests": [{"twin": t, "key": key_of(w, t), "weight": 1,
                      "required": t == owner or t in required} for t in listed],
        "weight_required": len(listed) if weight_required is None else weight_required,
    }


def hashes(n: int, req: dict[str, Any],
           delete: dict[str, Any] | None = None) -> dict[str, str]:
    """`body_hash` and the `deployment_hash` the ledger derives from it and the
    requirements: what a contract.create or contract.update carries."""
    body = deployment(n)
    try:
        derived = deployment_hash(
            body, SignatureRequirement.from_dict(req),
            None if delete is None else SignatureRequirement.from_dict(delete))
    except QuorumError:  # a malformed requirement, for a test of its refusal
        derived = body
    return {"body_hash": body, "deployment_hash": derived}


def cancel_vote(w: World, twin: int, cid: int) -> dict[str, Any]:
    """A contract.cancel payload: `twin`'s signed vote to remove contract `cid`."""
    c = w.state.contracts.get(cid)
    node = c.node if c is not None else 0
    return {"contract": cid, "signature": sign_cancel_vote(w.keys[twin], cid, node)}
