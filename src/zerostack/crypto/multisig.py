"""Signature requirements and the approval quorum shared by the ledger and the node.

A requirement is `{requests: [{twin, key, weight, required}], weight_required}`: every
stakeholder is named by twin id (for people) and public key (for verification), and the
owner is always listed as a required signer. The quorum holds when every required twin
has signed and the summed weight of the twins that signed reaches `weight_required`. Who
signed is decided by the caller (it verifies signatures against the keys listed here);
this module does the arithmetic and the hashing, so every party agrees exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zerostack.crypto.canonical import hash_hex

MAX_REQUESTS = 64
"""Most stakeholders one requirement may list."""
MAX_WEIGHT = 2**31
_KEY = re.compile(r"[0-9a-f]{64}")


class QuorumError(ValueError):
    """A malformed signature requirement."""


@dataclass(frozen=True)
class SignatureRequest:
    twin: int
    key: str  # the twin's ed25519 public key (hex)
    weight: int
    required: bool


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise QuorumError(f"{what} must be an integer from {low} to {high}")
    return value


@dataclass(frozen=True)
class SignatureRequirement:
    requests: tuple[SignatureRequest, ...]
    weight_required: int

    @classmethod
    def from_dict(cls, data: Any, *, owner: int | None = None) -> SignatureRequirement:
        """Parse and check a requirement; with `owner`, also that it lists the owner as a
        required signer (every deployment's requirements must)."""
        if not isinstance(data, dict) or set(data) - {"requests", "weight_required"}:
            raise QuorumError("signature requirement must be {requests, weight_required}")
        raw = data.get("requests")
        if not isinstance(raw, list) or not raw:
            raise QuorumError("signature requirement needs at least one request")
        if len(raw) > MAX_REQUESTS:
            raise QuorumError(f"signature requirement lists more than {MAX_REQUESTS} twins")
        wr = _int(data.get("weight_required"), "weight_required", 0, MAX_WEIGHT * MAX_REQUESTS)
        requests = []
        twins: set[int] = set()
        keys: set[str] = set()
        for r in raw:
            if not isinstance(r, dict) or set(r) - {"twin", "key", "weight", "required"}:
                raise QuorumError("each request is {twin, key, weight, required}")
            twin = _int(r.get("twin"), "request twin", 1, 2**53)
            key = r.get("key")
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise QuorumError(f"twin {twin}: key must be its public key (64 lowercase hex)")
            weight = _int(r.get("weight", 1), f"twin {twin}: weight", 0, MAX_WEIGHT)
            required = r.get("required", False)
            if not isinstance(required, bool):
                raise QuorumError(f"twin {twin}: required must be true or false")
            if twin in twins:
                raise QuorumError(f"twin {twin} is listed twice")
            if key in keys:
                raise QuorumError(f"twin {twin}: its key is listed for another twin too")
            twins.add(twin)
            keys.add(key)
            requests.append(SignatureRequest(twin, key, weight, required))
        total = sum(r.weight for r in requests)
        if wr > total:
            raise QuorumError(f"weight_required {wr} exceeds the total weight {total}")
        req = cls(tuple(requests), wr)
        if owner is not None and not any(r.twin == owner and r.required for r in requests):
            raise QuorumError(f"the owner (twin {owner}) must be listed as a required signer")
        return req

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": [
                {"twin": r.twin, "key": r.key, "weight": r.weight, "required": r.required}
                for r in self.requests
            ],
            "weight_required": self.weight_required,
        }

    @property
    def twins(self) -> frozenset[int]:
        return frozenset(r.twin for r in self.requests)

    def keys(self) -> dict[int, str]:
        """twin -> public key, as this requirement names them."""
        return {r.twin: r.key for r in self.requests}

    def missing(self, signed: Iterable[int]) -> str | None:
        """None when the quorum holds for the twins in `signed`, else why not."""
        have = set(signed) & self.twins
        absent = [r.twin for r in self.requests if r.required and r.twin not in have]
        if absent:
            return f"required signature missing from twin(s) {', '.join(map(str, absent))}"
        weight = sum(r.weight for r in self.requests if r.twin in have)
        if weight < self.weight_required:
            return f"signed weight {weight} is below the required {self.weight_required}"
        return None

    def holds(self, signed: Iterable[int]) -> bool:
        return self.missing(signed) is None


def deployment_hash(body_hash: str, signature_requirement: SignatureRequirement,
                    delete_requirement: SignatureRequirement | None) -> str:
    """A deployment's hash, from the hash of its body (workloads, owner, version...) and its
    two requirements. The ledger recomputes it from a contract's requirements without
    seeing the sealed body, so the requirements it enforces are exactly the signed ones."""
    return hash_hex({
        "body": body_hash,
        "signature_requirement": signature_requirement.to_dict(),
        "delete_requirement": None if delete_requirement is None else delete_requirement.to_dict(),
    })
