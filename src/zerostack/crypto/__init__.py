"""Identities and hashing: ed25519 keys, signature domains, canonical JSON, blake2b-256,
sealed boxes and envelopes, key files, pinned keys, signature requirements."""

from zerostack.crypto.canonical import (
    MAX_DEPTH,
    MAX_INT,
    CanonicalError,
    canonical_json,
    check_canonical,
    hash_hex,
    hash_obj,
)
from zerostack.crypto.domains import (
    Domain,
    approval_digest,
    billing_notice_digest,
    consumption_digest,
    delete_vote_digest,
    solution_digest,
)
from zerostack.crypto.envelope import envelope_recipients, open_envelope, seal_envelope
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
from zerostack.crypto.multisig import (
    QuorumError,
    SignatureRequest,
    SignatureRequirement,
    deployment_hash,
)
from zerostack.crypto.pins import KeyChanged, KeyPins

__all__ = [
    "MAX_DEPTH",
    "MAX_INT",
    "CanonicalError",
    "CryptoError",
    "Domain",
    "Identity",
    "KeyChanged",
    "KeyPins",
    "QuorumError",
    "SignatureRequest",
    "SignatureRequirement",
    "approval_digest",
    "billing_notice_digest",
    "canonical_json",
    "check_canonical",
    "consumption_digest",
    "delete_vote_digest",
    "deployment_hash",
    "envelope_recipients",
    "hash_hex",
    "hash_obj",
    "load_identity",
    "open_envelope",
    "open_sealed",
    "public_key_from_hex",
    "save_identity",
    "seal_envelope",
    "seal_to",
    "solution_digest",
    "verify",
]
