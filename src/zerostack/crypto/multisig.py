"""Signature requirements and the approval quorum shared by the ledger and the node.

A requirement is `{requests: [{twin, weight, required}], weight_required}`. The quorum
holds when every required twin has signed and the summed weight of the twins that signed
reaches `weight_required`. Who signed is decided by the caller (it verifies signatures
against twin keys); this module only does the arithmetic, so both sides agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class QuorumError(ValueError):
    """A malformed signature requirement."""


@dataclass(frozen=True)
class SignatureRequest:
    twin: int
    weight: int
    required: bool


@dataclass(frozen=True)
class SignatureRequirement:
    requests: tuple[SignatureRequest, ...]
    weight_required: int

    @classmethod
    def from_dict(cls, data: Any) -> SignatureRequirement:
        if not isinstance(data, dict) or set(data) - {"requests", "weight_required"}:
            raise QuorumError("signature requirement must be {requests, weight_required}")
        raw = data.get("requests")
        wr = data.get("weight_required")
        if not isinstance(raw, list) or not raw:
            raise QuorumError("signature requirement needs at least one request")
        if not isinstance(wr, int) or isinstance(wr, bool) or wr < 0:
            raise QuorumError("weight_required must be a non-negative integer")
        requests = []
        seen: set[int] = set()
        for r in raw:
            if not isinstance(r, dict) or set(r) - {"twin", "weight", "required"}:
                raise QuorumError("each request is {twin, weight, required}")
            twin, weight, required = r.get("twin"), r.get("weight", 1), r.get("required", False)
            if not isinstance(twin, int) or isinstance(twin, bool) or twin < 0:
                raise QuorumError("request twin must be a twin id")
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                raise QuorumError(f"twin {twin}: weight must be a non-negative integer")
            if not isinstance(required, bool):
                raise QuorumError(f"twin {twin}: required must be true or false")
            if twin in seen:
                raise QuorumError(f"twin {twin} is listed twice")
            seen.add(twin)
            requests.append(SignatureRequest(twin, weight, required))
        total = sum(r.weight for r in requests)
        if wr > total:
            raise QuorumError(f"weight_required {wr} exceeds the total weight {total}")
        return cls(tuple(requests), wr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": [
                {"twin": r.twin, "weight": r.weight, "required": r.required} for r in self.requests
            ],
            "weight_required": self.weight_required,
        }

    @property
    def twins(self) -> frozenset[int]:
        return frozenset(r.twin for r in self.requests)

    def with_owner(self, owner: int) -> SignatureRequirement:
        """The owner is always a required signer; add or upgrade its request."""
        reqs = []
        found = False
        for r in self.requests:
            if r.twin == owner:
                reqs.append(SignatureRequest(r.twin, r.weight, True))
                found = True
            else:
                reqs.append(r)
        if not found:
            reqs.insert(0, SignatureRequest(owner, 1, True))
        return SignatureRequirement(tuple(reqs), self.weight_required)

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
