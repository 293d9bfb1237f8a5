"""Ledger transactions: the signed wire format, one payload model per type, size limits, signing.

A transaction is `{type, sender, nonce, payload, signature}`. The signature is the sender's
ed25519 signature over the transaction hash: blake2b-256 of the canonical JSON of
`{type, sender, nonce, payload}`. That hash is also the transaction's id.
"""

from __future__ import annotations

import binascii
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from zerostack.crypto import (
    MAX_INT,
    CanonicalError,
    Domain,
    Identity,
    approval_digest,
    check_canonical,
    consumption_digest,
    delete_vote_digest,
    hash_obj,
)
from zerostack.crypto.canonical import hash_bytes
from zerostack.ledger.errors import HTTP_STATUS, LedgerRejected

MAX_TX_BYTES = 128 * 1024
"""Largest accepted transaction, as encoded JSON (sealed instructions are the bulk)."""
MAX_BATCH = 2000
"""Most transactions in one `POST /txs`."""
MAX_INSTRUCTIONS = 96 * 1024
"""Largest sealed instructions (base64 characters)."""

MAX_PAYLOAD_DEPTH = 32
"""Deepest nesting of objects and arrays inside a payload: a block and an event answer
wrap a payload in a few more levels, and all of it stays well inside canonical JSON's
MAX_DEPTH (and the encoder's own limit)."""


def _city(value: str) -> str:
    # refused, not rewritten: the value is signed, and a silent rewrite would change what
    # the signature covers. Letters and marks of any script, in NFC, and a few separators
    # keep "Liège" or "São Paulo" but not zero-width or control characters.
    if not unicodedata.is_normalized("NFC", value):
        raise ValueError("must be in Unicode normalisation form NFC")
    for ch in value:
        if ch not in " -'." and unicodedata.category(ch)[0] not in "LM":
            raise ValueError(f"character U+{ord(ch):04X} is not allowed (letters, marks, "
                             "space, hyphen, apostrophe and full stop only)")
    if value != value.strip() or "  " in value:
        raise ValueError("no leading, trailing or repeated spaces")
    return value


HexHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
HexSignature = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
PublicKeyHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Base64 = Annotated[str, Field(max_length=MAX_INSTRUCTIONS, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
# every integer fits what a JSON client represents exactly (±(2^53 - 1))
Id = Annotated[int, Field(ge=1, le=MAX_INT)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Text = Annotated[str, Field(max_length=1024)]
# Names that identify or locate something use a restricted ASCII alphabet (one spelling
# per name: no look-alike letters from other scripts, no invisible characters).
Name = Annotated[str, Field(pattern=r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")]
"""Farm and template names: lowercase ASCII letters, digits, '.', '_', '-'; 1-64 long,
starting and ending with a letter or digit."""
Country = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
"""An ISO 3166-1 alpha-2 code, upper case (BE, NL...)."""
City = Annotated[str, Field(max_length=64), AfterValidator(_city)]
VersionLabel = Annotated[str, Field(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9.+_-]{0,63})?$")]
WorkloadName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
WorkloadType = Annotated[str, Field(pattern=r"^[a-z0-9_.-]{0,32}$")]
Endpoint = Annotated[str, Field(pattern=r"^[!-~]{0,256}$")]
"""An address (host:port, URL): printable ASCII without spaces."""
PublicIp = Annotated[str, Field(pattern=r"^[0-9A-Fa-f.:/]{1,64}$")]
GatewayName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
Fqdn = Annotated[str, Field(max_length=253,
                            pattern=r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")]
"""A fully qualified domain name: lowercase ASCII labels of 1-63 characters (no leading or
trailing hyphen) separated by dots, ending in a top-level label of letters."""
CidrAddress = Annotated[str, Field(max_length=64, pattern=r"^[0-9A-Fa-f.:]{2,45}/[0-9]{1,3}$")]
"""An interface address with its prefix length (198.18.0.200/24, fd00:5a::200/64)."""
Address = Annotated[str, Field(max_length=45, pattern=r"^[0-9A-Fa-f.:]{2,45}$")]
IpList = Annotated[list[PublicIp], Field(max_length=64)]


class _Model(BaseModel):
    # strict: "5" is not 5 and true is not 1; forbid: an unknown field is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Capacity(_Model):
    """Resource units: cru = CPU cores, mru/sru/hru = bytes of memory, SSD and HDD."""

    cru: Count = 0
    mru: Count = 0
    sru: Count = 0
    hru: Count = 0


class Location(_Model):
    country: Country
    city: City = ""


class SignatureRequestModel(_Model):
    twin: Id
    key: PublicKeyHex
    weight: Annotated[int, Field(ge=0, le=2**31)] = 1
    required: bool = False


class SignatureRequirementModel(_Model):
    """Mirrors `zerostack.crypto.SignatureRequirement` (which does the quorum arithmetic)."""

    requests: Annotated[list[SignatureRequestModel], Field(min_length=1, max_length=64)]
    weight_required: Annotated[int, Field(ge=0, le=2**40)]


# ---- payloads, one per transaction type -------------------------------------------------


class TwinRegister(_Model):
    """Sent with `sender` = the new twin's public key (hex) and nonce 0."""

    endpoint: Endpoint = ""


class FarmCreate(_Model):
    name: Name
    public_ips: IpList = []
    pricing: dict[str, Any] | None = None


class NodeRegister(_Model):
    """The sender twin becomes the node's identity; one node per twin."""

    farm: Id
    capacity: Capacity
    location: Location
    endpoint: Endpoint = ""
    public_ips: IpList = []
    pricing: dict[str, Any] | None = None


class NodeUpdate(NodeRegister):
    """Same fields as node.register; sent by the node's twin to change them."""


class NodeHeartbeat(_Model):
    used: Capacity | None = None
    uptime: Count | None = None


Share = Annotated[int, Field(ge=0, le=10_000)]
"""Basis points: 10,000 is the whole amount."""


class TemplatePublish(_Model):
    """Content-addressed: the template's id is the hash of this payload. `author_share`
    is what the author asks of every charge of a contract made from it (capped by the
    grid's policy)."""

    name: Name
    version: VersionLabel = ""
    description: Text = ""
    body: dict[str, Any]
    author_share: Share = 0


class ContractCreate(_Model):
    """`deployment_hash` must equal the hash derived from `body_hash` and the two
    requirements (see `zerostack.crypto.deployment_hash`): the ledger enforces exactly
    the requirements the stakeholders sign."""

    node: Id
    deployment_hash: HexHash
    body_hash: HexHash
    instructions: Base64
    signature_requirement: SignatureRequirementModel
    delete_requirement: SignatureRequirementModel | None = None
    deadline: Count | None = None
    capacity: Capacity | None = None
    approval: HexSignature | None = None
    metadata: Text = ""
    template: HexHash | None = None
    ipv4: Count = 0
    names: Count = 0
    ipv6: Count = 0
    """Public IPv6 addresses to take from the node's farm pool (IPv4: `ipv4`, which is
    also what the contract is billed for): allocated by this transaction, one contract
    per address, released when the contract ends."""


class ContractApprove(_Model):
    contract: Id
    deployment_hash: HexHash
    signature: HexSignature


class ContractUpdate(_Model):
    contract: Id
    deployment_hash: HexHash
    body_hash: HexHash
    instructions: Base64
    signature_requirement: SignatureRequirementModel | None = None
    deadline: Count | None = None
    capacity: Capacity | None = None
    approval: HexSignature | None = None
    metadata: Text | None = None


class ContractCancel(_Model):
    """A cancel vote: `signature` is the sender's `delete-vote` signature over
    (contract, node), which the node checks itself before removing anything."""

    contract: Id
    signature: HexSignature


WorkloadState = Literal["init", "ok", "error", "deleted", "paused"]


class WorkloadResult(_Model):
    name: WorkloadName
    type: WorkloadType = ""
    state: WorkloadState
    message: Text = ""
    data: dict[str, Any] = {}
    sealed: Annotated[str, Field(max_length=16 * 1024, pattern=r"^[A-Za-z0-9+/]*={0,2}$")] = ""


class ContractReport(_Model):
    contract: Id
    version: Id
    error: Text = ""
    workloads: Annotated[list[WorkloadResult], Field(max_length=256)] = []


class Usage(_Model):
    """What a contract reserved during a period, as its node counted it."""

    cru: Count = 0
    mru: Count = 0
    sru: Count = 0
    hru: Count = 0
    ipv4: Count = 0
    names: Count = 0


class ContractConsumption(_Model):
    """A node's signed consumption report for one billing period of one contract it runs:
    period `period` covers ledger time [period * P, (period + 1) * P) for the policy's P."""

    contract: Id
    period: Count
    reserved: Usage
    traffic_in: Count = 0
    traffic_out: Count = 0
    # the node twin's `consumption` signature over the figures (see `sign_consumption`):
    # the report stands on its own, apart from the transaction that carried it
    signature: HexSignature


class PricesModel(_Model):
    """Base units per resource-hour (traffic: per GiB)."""

    cru: Count = 0
    mru: Count = 0
    sru: Count = 0
    hru: Count = 0
    ipv4: Count = 0
    names: Count = 0
    traffic: Count = 0


class GridPolicy(_Model):
    """The grid's pricing policy. Sent by the governing key (the ledger's operator key,
    as `sender`, with the governor's nonce); `effective` schedules it for later (never
    earlier than the block: a price change is not retroactive)."""

    prices: PricesModel
    min: PricesModel = PricesModel()
    max: PricesModel
    period: Annotated[int, Field(ge=1, le=31 * 24 * 3600)] = 3600
    grace: Annotated[int, Field(ge=0, le=365 * 24 * 3600)] = 24 * 3600
    treasury_share: Share = 0
    max_author_share: Share = 0
    max_traffic: Count = 0
    dev_faucet: bool = False
    effective: Count | None = None


class FarmPrices(_Model):
    """A farm's own prices, within the policy's bounds; `effective` as for the policy."""

    farm: Id
    prices: PricesModel
    effective: Count | None = None


Amount = Annotated[int, Field(ge=1, le=MAX_INT)]


class BalanceTransfer(_Model):
    to: Id
    amount: Amount


class BalanceFaucet(_Model):
    """Mint `amount` to the sender: only on a grid whose genesis policy enables it."""

    amount: Amount


MAX_SOLUTION_PARTS = 64


class SolutionCreate(_Model):
    """Group the sender's new contracts (created without approvals, one per node) into a
    solution that stakeholders approve as one."""

    contracts: Annotated[list[Id], Field(min_length=1, max_length=MAX_SOLUTION_PARTS)]
    metadata: Text = ""


class SolutionApprove(_Model):
    """The sender's `solution-approval` signature over every part of the solution; with
    `max_cost`, the most the sender agrees the solution costs per month (730 h, base
    units): refused when its price is over it, and kept as a cap on later versions."""

    solution: Id
    signature: HexSignature
    max_cost: Amount | None = None


class NameRegister(_Model):
    name: GatewayName


class NameRelease(_Model):
    name: GatewayName


class ValidatorApproval(_Model):
    key: PublicKeyHex
    signature: HexSignature


class ValidatorSet(_Model):
    """Replace the validator set by `validators` as epoch `epoch` (the current one + 1),
    with the approvals (`validator-set` domain) of more than two thirds of the current set;
    see ledger/validators.py. Any twin may carry it: the approvals authorise it."""

    validators: list[PublicKeyHex] = Field(min_length=1, max_length=64)
    epoch: Annotated[int, Field(ge=1, le=MAX_INT)]
    approvals: list[ValidatorApproval] = Field(min_length=1, max_length=64)


class NodeGateway(_Model):
    """Sent by the farmer (the owner of the node's farm): the node becomes a gateway
    serving `NAME.<domain>`, on its public addresses `ipv4` and/or `ipv6` (with prefix
    length) of the WAN. An empty `domain` makes it an ordinary node again."""

    node: Id
    domain: Fqdn | Literal[""]
    ipv4: CidrAddress | Literal[""] = ""
    ipv6: CidrAddress | Literal[""] = ""


class PoolAddress(_Model):
    """One public address of a farm: the address with its prefix length, and the
    gateway (router) its users route through."""

    ip: CidrAddress
    gateway: Address


class FarmPublicIps(_Model):
    """Sent by the farmer: add addresses to the farm's public pool, or remove free ones
    (an address a contract holds is removed only once the contract ends)."""

    farm: Id
    add: Annotated[list[PoolAddress], Field(max_length=256)] = []
    remove: Annotated[list[CidrAddress], Field(max_length=256)] = []


PAYLOADS: dict[str, type[_Model]] = {
    "twin.register": TwinRegister,
    "farm.create": FarmCreate,
    "node.register": NodeRegister,
    "node.update": NodeUpdate,
    "node.heartbeat": NodeHeartbeat,
    "template.publish": TemplatePublish,
    "contract.create": ContractCreate,
    "contract.approve": ContractApprove,
    "contract.update": ContractUpdate,
    "contract.cancel": ContractCancel,
    "contract.report": ContractReport,
    "contract.consumption": ContractConsumption,
    "grid.policy": GridPolicy,
    "farm.prices": FarmPrices,
    "balance.transfer": BalanceTransfer,
    "balance.faucet": BalanceFaucet,
    "solution.create": SolutionCreate,
    "solution.approve": SolutionApprove,
    "name.register": NameRegister,
    "name.release": NameRelease,
    "validator.set": ValidatorSet,
    "node.gateway": NodeGateway,
    "farm.public_ips": FarmPublicIps,
}
"""Every transaction type and the model its payload must match."""

TX_TYPES = frozenset(PAYLOADS)


class SignedTxModel(BaseModel):
    """A transaction on the wire (for the OpenAPI spec and for clients that want a model)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str
    sender: Id | PublicKeyHex
    nonce: Count
    payload: dict[str, Any]
    signature: HexSignature


# ---- parsed transactions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tx:
    """A well-formed transaction; its signature is checked by the state machine, not here."""

    type: str
    sender: int | str
    nonce: int
    payload: Any  # the type's payload model instance
    raw_payload: dict[str, Any]
    signature: bytes
    hash: bytes

    @property
    def hash_hex(self) -> str:
        return self.hash.hex()

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "sender": self.sender,
            "nonce": self.nonce,
            "payload": self.raw_payload,
            "signature": self.signature.hex(),
        }


_ENVELOPE = frozenset({"type", "sender", "nonce", "payload", "signature"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


def _reject(code: str, reason: str) -> LedgerRejected:
    return LedgerRejected(reason, code=code, status=HTTP_STATUS[code])


def _first_error(exc: ValidationError, prefix: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{prefix}unknown field {where!r}"
    return f"{prefix}{where or 'value'}: {err['msg']}"


def parse_tx(data: Any, *, canonical_checked: bool = False) -> Tx:
    """Check a decoded JSON transaction's shape and payload; raise `LedgerRejected` if wrong.

    This is the hot path of submission, so the envelope is checked by hand (a pydantic
    model would cost more than the rest of the work) and the payload by its model.
    `canonical_checked` says the caller already checked that `data` has a canonical JSON
    form (replay checks whole blocks at once), so only the hash is left to take.
    """
    if not isinstance(data, dict):
        raise _reject("malformed", "a transaction is a JSON object")
    keys = data.keys()
    if keys != _ENVELOPE:
        unknown = sorted(set(keys) - _ENVELOPE)
        if unknown:
            raise _reject("invalid", f"unknown field {unknown[0]!r} in transaction")
        missing = sorted(_ENVELOPE - set(keys))
        raise _reject("malformed", f"transaction is missing {', '.join(missing)}")
    ttype, sender, nonce = data["type"], data["sender"], data["nonce"]
    payload, signature = data["payload"], data["signature"]
    model = PAYLOADS.get(ttype) if isinstance(ttype, str) else None
    if model is None:
        raise _reject("invalid", f"unknown transaction type {str(ttype)[:40]!r}")
    if type(sender) is int:
        if not 1 <= sender <= MAX_INT:
            raise _reject("invalid", "sender must be a twin id (1 to 2^53 - 1) or a public key")
    elif not (isinstance(sender, str) and _HEX64.fullmatch(sender)):
        raise _reject("invalid", "sender must be a twin id or a lowercase hex public key")
    if type(nonce) is not int or not 0 <= nonce <= MAX_INT:
        raise _reject("invalid", "nonce must be an integer from 0 to 2^53 - 1")
    if not isinstance(payload, dict):
        raise _reject("invalid", "payload must be an object")
    if not (isinstance(signature, str) and _HEX128.fullmatch(signature)):
        raise _reject("invalid", "signature must be 64 bytes as lowercase hex")
    if not canonical_checked:
        # before the model: bounds nesting (and recursion) before anything walks the payload
        try:
            check_canonical(payload, max_depth=MAX_PAYLOAD_DEPTH)
        except CanonicalError as exc:
            raise _reject("invalid", f"{ttype} payload: {exc}") from None
    elif _too_deep(payload, MAX_PAYLOAD_DEPTH):
        raise _reject("invalid", f"{ttype} payload: nested deeper than {MAX_PAYLOAD_DEPTH} levels")
    try:
        parsed = model.model_validate(payload)
    except ValidationError as exc:
        raise _reject("invalid", _first_error(exc, f"{ttype} payload: ")) from None
    # the envelope's fields were checked above and the payload has a canonical form, so
    # sorting the keys is all canonical_json would add
    body = {"type": ttype, "sender": sender, "nonce": nonce, "payload": payload}
    digest = hash_bytes(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return Tx(ttype, sender, nonce, parsed, payload, binascii.unhexlify(signature), digest)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests objects and arrays more than `limit` levels (no recursion)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for v in level:
            below.extend(c for c in (v.values() if isinstance(v, dict) else v)
                         if isinstance(c, (dict, list)))
        level = below
    return False


def tx_body(ttype: str, sender: int | str, nonce: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": ttype, "sender": sender, "nonce": nonce, "payload": payload}


def tx_hash(tx: dict[str, Any]) -> str:
    """The id of a wire transaction (hex): the hash its signature signs."""
    return hash_obj(tx_body(tx["type"], tx["sender"], tx["nonce"], tx["payload"])).hex()


def sign_tx(
    identity: Identity, ttype: str, sender: int | str, nonce: int, payload: dict[str, Any]
) -> dict[str, Any]:
    """Build a wire transaction signed by `identity` (the sender's key)."""
    body = tx_body(ttype, sender, nonce, payload)
    body["signature"] = identity.sign(Domain.TRANSACTION, hash_obj(body)).hex()
    return body


def sign_approval(identity: Identity, contract: int, version: int, node: int,
                  deployment_hash: str) -> str:
    """A stakeholder's approval (hex): consent to run `deployment_hash` as `version` of
    `contract` on `node` (contract 0: the contract this `contract.create` makes)."""
    digest = approval_digest(contract, version, node, deployment_hash)
    return identity.sign(Domain.APPROVAL, digest).hex()


def sign_cancel_vote(identity: Identity, contract: int, node: int) -> str:
    """A cancel vote (hex): remove `contract` from `node`."""
    return identity.sign(Domain.DELETE_VOTE, delete_vote_digest(contract, node)).hex()


def sign_consumption(identity: Identity, contract: int, node: int, period: int,
                     reserved: dict[str, int], traffic_in: int = 0,
                     traffic_out: int = 0) -> str:
    """A node's signature (hex) over its consumption figures for one period of `contract`."""
    digest = consumption_digest(contract, node, period, reserved, traffic_in, traffic_out)
    return identity.sign(Domain.CONSUMPTION, digest).hex()
