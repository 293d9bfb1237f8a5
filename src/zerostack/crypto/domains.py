"""Signature domains: every zerostack signature names the kind of message it signs.

A signature is ed25519 over `zerostack-sig/v1 <domain> NUL <data>`, never over bare data,
so a signature made for one purpose (approving a deployment, say) can never be presented
as another (a transaction, a block header, a manifest). `data` is a 32-byte hash in every
domain here; what the hash covers is defined next to each domain's user.
"""

from __future__ import annotations

import enum

from zerostack.crypto.canonical import hash_obj


class Domain(enum.StrEnum):
    """What a signature authorises. The value is part of the signed bytes: never rename."""

    TRANSACTION = "transaction"
    """A ledger transaction: its hash (the transaction id)."""
    APPROVAL = "approval"
    """A stakeholder's consent to run one deployment version of one contract on one node."""
    DELETE_VOTE = "delete-vote"
    """A stakeholder's vote to cancel one contract (its delete requirement)."""
    DEPLOYMENT = "deployment"
    """The owner's signature over a deployment's hash: the owner wrote these instructions."""
    FLIST_MANIFEST = "flist-manifest"
    """A publisher's signature over an image manifest hash."""
    LOG_REQUEST = "log-request"
    """An owner's request to read a workload's logs."""
    NODE_REPORT = "node-report"
    """A node's signed report on the workloads it runs."""
    BLOCK_HEADER = "block-header"
    """A ledger operator's (or validator's) signature over a block header hash."""
    VALIDATOR_SET = "validator-set"
    """A current validator's consent to replace the ledger's validator set with another
    (the digest of the new set and its epoch)."""
    KEY_CHANGE = "key-change"
    """A twin's old key authorising its new key."""
    SOLUTION_APPROVAL = "solution-approval"
    """A stakeholder's consent to run every part of one solution: the list of (contract,
    version, node, deployment hash) it groups, all at once or not at all."""
    LEDGER_CHECKPOINT = "ledger-checkpoint"
    """A ledger operator's statement that every signature of its log up to one block
    (height and hash) was checked, so a restart may skip checking them again."""
    CONSUMPTION = "consumption"
    """A node's figures for one billing period of one contract it runs."""
    BILLING_NOTICE = "billing-notice"
    """The grid's governing key (the ledger operator's) stating where one contract stands
    with its payments (paying, in grace, ended unpaid) as of one signed block."""


PREFIX = b"zerostack-sig/v1 "


def signed_message(domain: Domain, data: bytes) -> bytes:
    """The exact bytes an ed25519 signature of `domain` covers."""
    if not isinstance(domain, Domain):
        raise TypeError(f"a signature domain is a Domain, not {type(domain).__name__}")
    return PREFIX + domain.value.encode() + b"\x00" + data


def approval_digest(contract: int, version: int, node: int, deployment_hash: str) -> bytes:
    """What an approval signs: this deployment hash, as version `version` of contract
    `contract` on node `node`. Contract 0 is the owner's approval inside the very
    `contract.create` that assigns the id (the owner signs that transaction too)."""
    return hash_obj({"contract": contract, "version": version, "node": node,
                     "deployment_hash": deployment_hash})


def delete_vote_digest(contract: int, node: int) -> bytes:
    """What a cancel vote signs: remove contract `contract` from node `node`."""
    return hash_obj({"contract": contract, "node": node, "action": "cancel"})


RESERVED_UNITS = ("cru", "mru", "sru", "hru", "ipv4", "names")
"""The resources a consumption report states as reserved, in this order."""


def consumption_digest(contract: int, node: int, period: int, reserved: dict[str, int],
                       traffic_in: int, traffic_out: int) -> bytes:
    """What a consumption report signs: node `node`'s figures for billing period `period`
    of contract `contract` (every reserved unit named, 0 when absent)."""
    return hash_obj({"contract": contract, "node": node, "period": period,
                     "reserved": {r: int(reserved.get(r, 0)) for r in RESERVED_UNITS},
                     "traffic_in": traffic_in, "traffic_out": traffic_out})


def billing_notice_digest(notice: dict[str, object]) -> bytes:
    """What a billing notice signs: the whole notice but its `signature` field."""
    return hash_obj({k: v for k, v in notice.items() if k != "signature"})


def solution_digest(solution: int, parts: list[tuple[int, int, int, str]]) -> bytes:
    """What a solution approval signs: solution `solution` made of exactly these parts,
    each (contract, version, node, deployment_hash), in contract order."""
    rows = [{"contract": c, "version": v, "node": n, "deployment_hash": h}
            for c, v, n, h in sorted(parts)]
    return hash_obj({"solution": solution, "parts": rows})
