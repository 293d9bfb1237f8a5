"""Why the ledger refuses something: a `Rejected` value from the pure core, `LedgerError` at the edges."""

from __future__ import annotations

from dataclasses import dataclass

# Rejection codes and the HTTP status the API answers them with.
HTTP_STATUS: dict[str, int] = {
    "malformed": 400,  # not JSON, or not a transaction envelope
    "invalid": 422,  # an unknown type or field, a value out of range
    "too_large": 413,  # a transaction or batch over the size limits
    "bad_signature": 401,  # the signature does not verify against the sender's key
    "unauthorized": 403,  # a valid sender that may not do this
    "bad_nonce": 409,  # replayed or out-of-order nonce
    "conflict": 409,  # already exists / already done
    "state": 409,  # not allowed in the contract's (or node's) current state
    "not_found": 404,  # refers to a twin, farm, node, contract... that does not exist
}


@dataclass(frozen=True, slots=True)
class Rejected:
    """A transaction the state machine refuses; the state is unchanged."""

    code: str
    reason: str

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    def to_dict(self) -> dict[str, str]:
        return {"error": self.reason, "code": self.code}


class LedgerError(Exception):
    """Anything the ledger (server, store or client) cannot do, with a message a user can act on."""

    def __init__(self, message: str, *, code: str = "error", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class LedgerRejected(LedgerError):
    """The ledger refused a transaction (bad signature, nonce, sender, field, state...)."""

    @classmethod
    def from_rejected(cls, rejected: Rejected) -> LedgerRejected:
        return cls(rejected.reason, code=rejected.code, status=rejected.http_status)
