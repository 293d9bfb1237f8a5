"""Identities and hashing: ed25519 keys, canonical JSON, blake2b-256, sealed boxes, key files."""

from zerostack.crypto.canonical import (
    MAX_DEPTH,
    MAX_INT,
    CanonicalError,
    canonical_json,
    check_canonical,
    hash_hex,
    hash_obj,
)
from zerostack.crypto.domains import Domain, approval_digest, delete_vote_digest
from zerostack.crypto.identity import (
    CryptoError,
    Identity,
    load_identity,
    open_sealed,
    public_key_from_hex,
    save_identity,
    seal_to,
    verify,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_INT",
    "CanonicalError",
    "CryptoError",
    "Domain",
    "Identity",
    "approval_digest",
    "canonical_json",
    "check_canonical",
    "delete_vote_digest",
    "hash_hex",
    "hash_obj",
    "load_identity",
    "open_sealed",
    "public_key_from_hex",
    "save_identity",
    "seal_to",
    "verify",
]

from zerostack.crypto.multisig import (
    QuorumError,
    SignatureRequest,
    SignatureRequirement,
)

__all__ += ["QuorumError", "SignatureRequest", "SignatureRequirement"]
