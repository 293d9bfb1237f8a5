"""The Deployment: versioned set of named workloads with its owner, its stakeholders (by
twin and public key), canonical hash, owner signature, multi-signature check and version
diff. A node decides on a deployment with nothing but what is inside it."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from zerostack.crypto import (
    CanonicalError,
    Domain,
    Identity,
    QuorumError,
    SignatureRequest,
    SignatureRequirement,
    approval_digest,
    check_canonical,
    delete_vote_digest,
    deployment_hash,
    hash_hex,
    solution_digest,
    verify,
)
from zerostack.workloads.types import (
    FIRST_CONTAINER_HOST,
    GATEWAY_TYPES,
    LAST_HOST,
    ContainerWorkload,
    NetworkWorkload,
    Spec,
    Workload,
    ZdbWorkload,
)


class WorkloadError(ValueError):
    """A deployment or workload that is malformed, unauthorised or an invalid change."""


class SignatureRequestSpec(Spec):
    twin: int = Field(ge=1, le=2**53)
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    weight: int = Field(default=1, ge=0, le=2**31)
    required: bool = False


class SignatureRequirementSpec(Spec):
    """Who must sign (twin and public key), with which weight, and the weight that makes a
    quorum."""

    requests: list[SignatureRequestSpec] = Field(min_length=1, max_length=64)
    weight_required: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> SignatureRequirementSpec:
        try:
            SignatureRequirement.from_dict(self.model_dump())
        except QuorumError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def to_requirement(self) -> SignatureRequirement:
        return SignatureRequirement.from_dict(self.model_dump())


def workload_hash(workload: Workload) -> str:
    """Content hash of one workload: tells the node whether a new version changed it."""
    return hash_hex(workload.model_dump(mode="json"))


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, with the path a YAML author can find: `workloads.0.zdb.sise: ...`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(lines)


class Deployment(Spec):
    """What a contract asks one node to run. Its hash is what stakeholders sign."""

    version: int = Field(default=0, ge=0)
    twin_id: int = Field(ge=0)
    contract_id: int = Field(default=0, ge=0)
    metadata: str = ""
    description: str = ""
    nonce: str = Field(default="", max_length=64)
    """Makes two otherwise equal deployments differ: a node runs a signed deployment under
    one contract only (the bot sets a random one)."""
    signature_requirement: SignatureRequirementSpec
    delete_requirement: SignatureRequirementSpec | None = None
    workloads: list[Workload] = Field(default_factory=list)

    @field_validator("workloads")
    @classmethod
    def _unique_names(cls, v: list[Workload]) -> list[Workload]:
        seen: set[str] = set()
        for w in v:
            if w.name in seen:
                raise ValueError(f"workload name {w.name!r} is used twice")
            seen.add(w.name)
        return v

    @model_validator(mode="after")
    def _owner_signs(self) -> Deployment:
        # the owner is a required signer of both requirements, listed with its key, so the
        # hash covers exactly who must sign and the node needs no outside list of keys
        for what, spec in (("signature_requirement", self.signature_requirement),
                           ("delete_requirement", self.delete_requirement)):
            if spec is None:
                continue
            try:
                SignatureRequirement.from_dict(spec.model_dump(), owner=self.twin_id)
            except QuorumError as exc:
                raise ValueError(f"{what}: {exc}") from exc
        keys = self.signature_requirement.to_requirement().keys()
        if self.delete_requirement is not None:
            for twin, key in self.delete_requirement.to_requirement().keys().items():
                if keys.setdefault(twin, key) != key:
                    raise ValueError(f"twin {twin} is listed with two different keys")
        return self

    @model_validator(mode="after")
    def _references_resolve(self) -> Deployment:
        # A container may only mount volumes and join networks of its own deployment.
        kinds = {w.name: w.type for w in self.workloads}
        for w in self.workloads:
            if isinstance(w, ZdbWorkload) and w.replica_of is not None \
                    and w.replica_of.workload in kinds:
                raise ValueError(f"zdb {w.name!r} is a replica of {w.replica_of.workload!r} "
                                 "on the same node: a replica must be on another node than "
                                 "its primary")
            via = getattr(w, "network", None)
            if w.type in GATEWAY_TYPES and via is not None and kinds.get(via) != "network":
                raise ValueError(f"{w.type} {w.name!r} reaches its backends through {via!r}, "
                                 "not a network here")
            if not isinstance(w, ContainerWorkload):
                continue
            for m in w.mounts:
                if kinds.get(m.volume) != "volume":
                    raise ValueError(f"container {w.name!r} mounts {m.volume!r}, not a volume here")
            if w.network is not None and kinds.get(w.network.network) != "network":
                raise ValueError(
                    f"container {w.name!r} joins {w.network.network!r}, not a network here"
                )
            if w.network is not None and w.network.public_ip is not None \
                    and kinds.get(w.network.public_ip) != "public_ip":
                raise ValueError(f"container {w.name!r} asks for public address "
                                 f"{w.network.public_ip!r}, not a public_ip here")
        self._gateway_address_free()
        return self

    def replication_problem(self, node: int) -> str | None:
        """Why the node `node` cannot run this deployment's replicated namespaces as they
        are written, or None. A template leaves a replica's primary node and port to
        `zerostack deploy`; a node refuses one that still lacks them, or whose primary is
        on this very node."""
        ports: dict[int, str] = {}
        for w in self.workloads:
            if not isinstance(w, ZdbWorkload):
                continue
            r = w.replica_of
            if r is not None and (not r.node or not r.port or w.replication is None):
                return (f"zdb {w.name!r} is a replica of {r.workload!r} but names no primary "
                        "node, port and replication password: deploy it with "
                        "`zerostack deploy`, which fills them in")
            if r is not None and r.node == node:
                return (f"zdb {w.name!r} is a replica of {r.workload!r} on this same node "
                        f"{node}: a replica must be on another node than its primary")
            if w.replication is not None:
                other = ports.setdefault(w.replication.port, w.name)
                if other != w.name:
                    return (f"zdb {w.name!r} and {other!r} both ask for port "
                            f"{w.replication.port}")
        return None

    def _gateway_address_free(self) -> None:
        """A node that reaches a network for a gateway workload (or a public address)
        joins it at the last host of its /24 (.254): no container may ask for that one."""
        joined = {getattr(w, "network", None) for w in self.workloads
                  if w.type in GATEWAY_TYPES}
        joined |= {w.network.network for w in self.workloads
                   if isinstance(w, ContainerWorkload) and w.network is not None
                   and w.network.public_ip is not None}
        for w in self.workloads:
            if not (isinstance(w, ContainerWorkload) and w.network is not None
                    and w.network.ip and w.network.network in joined):
                continue
            net = self.workload(w.network.network)
            if isinstance(net, NetworkWorkload):
                gateway = ipaddress.IPv4Network(net.subnet).network_address + LAST_HOST
                if w.network.ip == str(gateway):
                    raise ValueError(f"container {w.name!r}: {gateway} is the node's own "
                                     f"address on network {net.name!r} (its gateway "
                                     "workloads reach the network from there)")

    @model_validator(mode="after")
    def _addresses(self) -> Deployment:
        # Checked here, on the user's side and on every node alike, so a clash is refused
        # before anything is created anywhere.
        # Two networks of one deployment may overlap: each lives in its own namespaces.
        nets = {w.name: w for w in self.workloads if isinstance(w, NetworkWorkload)}
        taken: dict[str, str] = {}
        for w in self.workloads:
            if not isinstance(w, ContainerWorkload) or w.network is None or w.network.ip is None:
                continue
            net = nets.get(w.network.network)
            if net is None:
                continue
            try:
                ip = ipaddress.IPv4Address(w.network.ip)
            except ValueError as exc:
                raise ValueError(f"container {w.name!r}: ip {w.network.ip[:50]!r} is not an IPv4 "
                                 "address") from exc
            subnet = ipaddress.IPv4Network(net.subnet)
            if ip not in subnet:
                raise ValueError(f"container {w.name!r}: ip {ip} is outside the subnet "
                                 f"{subnet} of network {net.name!r} on this node")
            if not FIRST_CONTAINER_HOST <= int(ip) - int(subnet.network_address) <= LAST_HOST:
                raise ValueError(f"container {w.name!r}: ip {ip} is reserved in {subnet} (the "
                                 f"network address, the node's bridge .1 and the broadcast)")
            if str(ip) in taken:
                raise ValueError(f"containers {taken[str(ip)]!r} and {w.name!r} both ask for "
                                 f"ip {ip}")
            taken[str(ip)] = w.name
        return self

    @classmethod
    def parse(cls, data: Any) -> Deployment:
        """Validate user or wire data, turning pydantic's error into a WorkloadError."""
        try:
            dep = cls.model_validate(data)
        except ValidationError as exc:
            raise WorkloadError(f"invalid deployment: {describe_validation_error(exc)}") from exc
        try:  # a deployment that has no hash (a size past 2^53 - 1...) cannot be signed
            check_canonical(dep.body())
        except CanonicalError as exc:
            raise WorkloadError(f"invalid deployment: {exc}") from exc
        return dep

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def body(self) -> dict[str, Any]:
        """The signed content but the requirements. The contract id is excluded: it is
        known only after the contract that carries this hash is created."""
        return self.model_dump(mode="json", exclude={"contract_id", "signature_requirement",
                                                     "delete_requirement"})

    def body_hash(self) -> str:
        return hash_hex(self.body())

    def hash(self) -> str:
        """What stakeholders approve: the body's hash bound to both requirements (the
        ledger recomputes it from the requirements it enforces)."""
        return deployment_hash(self.body_hash(), self.requirement(), self._delete())

    def hash_bytes(self) -> bytes:
        return bytes.fromhex(self.hash())

    def workload(self, name: str) -> Workload | None:
        for w in self.workloads:
            if w.name == name:
                return w
        return None

    def requirement(self) -> SignatureRequirement:
        """Who must approve this deployment (the owner always among them)."""
        return self.signature_requirement.to_requirement()

    def _delete(self) -> SignatureRequirement | None:
        return None if self.delete_requirement is None else self.delete_requirement.to_requirement()

    def delete_quorum(self) -> SignatureRequirement:
        """Whose cancel votes remove this deployment: its delete requirement, or else the
        owner alone."""
        return self._delete() or SignatureRequirement(
            (SignatureRequest(self.twin_id, self.owner_key, 1, True),), 1)

    @property
    def owner_key(self) -> str:
        """The owner's public key, as the deployment itself names it."""
        return self.requirement().keys()[self.twin_id]

    def keys(self) -> dict[int, str]:
        """Every stakeholder's public key named in this deployment."""
        keys = self.requirement().keys()
        keys.update(self.delete_quorum().keys())
        return keys

    def sign_owner(self, identity: Identity) -> str:
        """The owner's signature (hex) over this deployment: it wrote these instructions."""
        return identity.sign(Domain.DEPLOYMENT, self.hash_bytes()).hex()

    def owner_signed(self, signature: str) -> bool:
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            return False
        return verify(Domain.DEPLOYMENT, self.owner_key, self.hash_bytes(), sig)

    def cancel_votes(self, votes: Mapping[int, str], *, contract: int, node: int) -> set[int]:
        """The twins whose cancel vote for `contract` on `node` verifies against the keys
        this deployment names; raises WorkloadError unless they make its delete quorum."""
        quorum = self.delete_quorum()
        keys = quorum.keys()
        digest = delete_vote_digest(contract, node)
        valid = set()
        for twin, sig_hex in votes.items():
            key = keys.get(twin)
            try:
                sig = bytes.fromhex(sig_hex)
            except ValueError:
                sig = b""
            if key is None or not verify(Domain.DELETE_VOTE, key, digest, sig):
                raise WorkloadError(f"cancel vote of twin {twin} does not verify for contract "
                                    f"{contract} on node {node}")
            valid.add(twin)
        why = quorum.missing(valid)
        if why is not None:
            raise WorkloadError(f"delete quorum does not hold: {why}")
        return valid

    def approve(self, identity: Identity, contract: int, version: int, node: int) -> str:
        """A stakeholder's approval (hex) of this deployment as `version` of `contract` on
        `node`; contract 0 is the owner's approval inside `contract.create`."""
        digest = approval_digest(contract, version, node, self.hash())
        return identity.sign(Domain.APPROVAL, digest).hex()

    def verify_signatures(
        self,
        signatures: Mapping[int, str],
        twin_keys: Mapping[int, str] | None = None,
        *,
        contract: int,
        version: int,
        node: int,
        requirement: SignatureRequirement | None = None,
    ) -> set[int]:
        """Check every approval against the twin's key and the quorum itself.

        An approval counts only for this deployment as `version` of `contract` on `node`
        (the owner's approval of version 1 may name contract 0: it was signed before the
        contract had an id). Returns the twins whose approvals verify. Raises WorkloadError
        when any signature is forged or the quorum does not hold: a node acts on neither.
        """
        req = requirement or self.requirement()
        twin_keys = self.keys() if twin_keys is None else twin_keys
        h = self.hash()
        digest = approval_digest(contract, version, node, h)
        owner_digest = approval_digest(0, 1, node, h) if version == 1 else None
        valid: set[int] = set()
        for twin, sig_hex in sorted(signatures.items()):
            key = twin_keys.get(twin)
            if key is None:
                raise WorkloadError(f"twin {twin} signed but its key is unknown")
            try:
                sig = bytes.fromhex(sig_hex)
            except ValueError as exc:
                raise WorkloadError(f"signature of twin {twin} is not hex") from exc
            ok = verify(Domain.APPROVAL, key, digest, sig) or (
                twin == self.twin_id and owner_digest is not None
                and verify(Domain.APPROVAL, key, owner_digest, sig))
            if not ok:
                raise WorkloadError(
                    f"approval of twin {twin} does not verify for deployment {h[:16]}… as "
                    f"version {version} of contract {contract} on node {node}: forged, or "
                    "signed for another deployment, contract, version or node"
                )
            valid.add(twin)
        why = req.missing(valid)
        if why is not None:
            raise WorkloadError(f"approval quorum does not hold: {why}")
        return valid

    def verify_solution_signatures(
        self,
        signatures: Mapping[int, str],
        *,
        solution: int,
        parts: list[tuple[int, int, int, str]],
        contract: int,
        version: int,
        node: int,
    ) -> set[int]:
        """Check solution approvals: this deployment must be one of `parts` as `version` of
        `contract` on `node`, and each signature a solution approval of exactly `parts` by
        a key this deployment names. Raises WorkloadError as verify_signatures does."""
        h = self.hash()
        if (contract, version, node, h) not in parts:
            raise WorkloadError(f"solution {solution} does not list deployment {h[:16]}… as "
                                f"version {version} of contract {contract} on node {node}")
        keys = self.keys()
        digest = solution_digest(solution, parts)
        valid: set[int] = set()
        for twin, sig_hex in sorted(signatures.items()):
            key = keys.get(twin)
            if key is None:
                raise WorkloadError(f"twin {twin} approved solution {solution} but this "
                                    "deployment does not name it")
            try:
                sig = bytes.fromhex(sig_hex)
            except ValueError as exc:
                raise WorkloadError(f"signature of twin {twin} is not hex") from exc
            if not verify(Domain.SOLUTION_APPROVAL, key, digest, sig):
                raise WorkloadError(f"approval of twin {twin} does not verify for solution "
                                    f"{solution} and its {len(parts)} parts: forged, or "
                                    "signed for other parts")
            valid.add(twin)
        why = self.requirement().missing(valid)
        if why is not None:
            raise WorkloadError(f"approval quorum does not hold: {why}")
        return valid


@dataclass(frozen=True)
class DeploymentDiff:
    """What changes between two versions of a deployment, by workload name."""

    added: tuple[Workload, ...]
    updated: tuple[tuple[Workload, Workload], ...]
    removed: tuple[Workload, ...]
    unchanged: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.updated or self.removed)


def diff(old: Deployment, new: Deployment) -> DeploymentDiff:
    """Compare versions. A workload keeps its type for life: changing it is refused."""
    if new.twin_id != old.twin_id:
        raise WorkloadError(f"the owner cannot change (twin {old.twin_id} -> {new.twin_id})")
    if new.owner_key != old.owner_key:
        raise WorkloadError(f"the owner's key cannot change (twin {old.twin_id})")
    for twin, key in new.keys().items():
        if old.keys().get(twin, key) != key:
            raise WorkloadError(f"twin {twin}'s key cannot change between versions")
    if new.version <= old.version:
        raise WorkloadError(
            f"new version {new.version} must be greater than the current {old.version}"
        )
    old_by = {w.name: w for w in old.workloads}
    new_by = {w.name: w for w in new.workloads}
    added, updated, unchanged = [], [], []
    for name, w in new_by.items():
        prev = old_by.get(name)
        if prev is None:
            added.append(w)
        elif prev.type != w.type:
            raise WorkloadError(
                f"workload {name!r} cannot change type from {prev.type} to {w.type}; "
                "remove it and add a new one under another name"
            )
        elif workload_hash(prev) != workload_hash(w):
            updated.append((prev, w))
        else:
            unchanged.append(name)
    removed = [w for name, w in old_by.items() if name not in new_by]
    return DeploymentDiff(tuple(added), tuple(updated), tuple(removed), tuple(unchanged))
