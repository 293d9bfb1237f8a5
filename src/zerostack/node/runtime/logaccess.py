"""Who reads container logs: only the contract's owner, on a request signed with their key.

The node answers with the lines sealed to the owner's key, so they never travel in clear
and nobody else (not even whoever relays the answer) can read them. The files are opened
beneath the runtime's directory without following links, and read bounded in size.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerostack.crypto import Domain, Identity, canonical_json, seal_to, verify
from zerostack.crypto.canonical import hash_bytes
from zerostack.node.runtime.logs import READ_MAX, read_logs
from zerostack.node.runtime.spec import ContainerError

REQUEST_MAX_AGE = 300
MAX_TAIL = 100_000


@dataclass(frozen=True)
class LogRequest:
    """A request for a workload's logs, signed by the owner: what `zerostack logs` sends."""

    contract: int
    workload: str
    tail: int
    timestamp: int
    requester: str  # public key (hex) of the signer
    signature: str = ""

    def body(self) -> dict[str, Any]:
        return {"contract": self.contract, "workload": self.workload, "tail": self.tail,
                "timestamp": self.timestamp, "requester": self.requester}

    def digest(self) -> bytes:
        return hash_bytes(canonical_json({"logs": self.body()}))

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Any) -> LogRequest:
        try:
            return cls(int(data["contract"]), str(data["workload"]), int(data["tail"]),
                       int(data["timestamp"]), str(data["requester"]), str(data["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ContainerError(f"malformed log request: {exc}") from None


def sign_log_request(identity: Identity, contract: int, workload: str, tail: int = 200) -> LogRequest:
    """Build and sign a log request as `identity`."""
    req = LogRequest(contract, workload, tail, int(time.time()), identity.public_hex)
    return LogRequest(**{**req.body(), "signature": identity.sign(Domain.LOG_REQUEST, req.digest()).hex()})


def check_log_request(request: LogRequest, owner_key: str, now: float | None = None) -> None:
    """Raise ContainerError, saying why, unless the request is fresh and signed by the
    contract's owner (`owner_key`)."""
    if request.requester != owner_key:
        raise ContainerError("only the contract's owner may read its logs")
    try:
        sig = bytes.fromhex(request.signature)
    except ValueError:
        sig = b""
    if not verify(Domain.LOG_REQUEST, owner_key, request.digest(), sig):
        raise ContainerError("log request signature does not verify")
    if abs((now or time.time()) - request.timestamp) > REQUEST_MAX_AGE:
        raise ContainerError("log request is too old (or the clocks disagree): sign a new one")


def answer_log_request(request: LogRequest, owner_key: str, root: Path,
                       beneath: Sequence[str] = (), now: float | None = None,
                       max_bytes: int = READ_MAX) -> dict[str, str]:
    """Check the request (`check_log_request`), then return the last lines of the logs in
    `root/beneath…` (no link followed below `root`, at most `max_bytes` read) sealed to
    the owner (base64). Raises ContainerError otherwise, saying why."""
    check_log_request(request, owner_key, now)
    lines = read_logs(root, min(max(request.tail, 0), MAX_TAIL), max_bytes, beneath)
    text = "\n".join(lines).encode()
    return {"sealed": base64.b64encode(seal_to(owner_key, text)).decode()}


def encode_request(request: LogRequest) -> str:
    """The request as one URL-safe token (`GET /logs?request=<token>` on the node)."""
    return base64.urlsafe_b64encode(canonical_json(request.to_dict())).decode().rstrip("=")


def decode_request(token: str) -> LogRequest:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return LogRequest.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ContainerError(f"malformed log request: {exc}") from None
