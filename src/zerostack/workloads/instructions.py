"""A contract's sealed instructions: the deployment and its owner's signature, sealed to
the node and to every stakeholder, so each party reads and checks exactly what it runs or
approves — and nobody else reads it."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from zerostack.crypto import CryptoError, Identity, canonical_json, open_envelope, seal_envelope
from zerostack.workloads.capacity import total_resources
from zerostack.workloads.deployment import Deployment, WorkloadError
from zerostack.workloads.types import (
    ContainerWorkload,
    NetworkWorkload,
    VolumeWorkload,
    ZdbWorkload,
)

MAX_SEALED = 96 * 1024
"""Largest sealed instructions (base64 characters), as the ledger accepts them: a server
that serves more is refused before anything is decoded."""


@dataclass(frozen=True)
class Instructions:
    """An opened envelope: the deployment and the owner's signature over its hash."""

    deployment: Deployment
    owner_signature: str

    def check(self) -> None:
        """Raise WorkloadError unless the owner named in the deployment signed it."""
        if not self.deployment.owner_signed(self.owner_signature):
            raise WorkloadError(
                f"the deployment is not signed by its owner (twin {self.deployment.twin_id}, "
                f"key {self.deployment.owner_key[:16]}…)")


def seal_instructions(deployment: Deployment, owner: Identity, node_key: str,
                      also: Iterable[str] = ()) -> str:
    """Sign `deployment` as its owner and seal it to the node and every stakeholder it
    names (plus `also`, e.g. the stakeholders of the version it replaces); base64."""
    if owner.public_hex != deployment.owner_key:
        raise WorkloadError("only the owner named in the deployment signs it")
    body = canonical_json({"deployment": deployment.to_dict(),
                           "owner_signature": deployment.sign_owner(owner)})
    recipients = {node_key, *deployment.keys().values(), *also}
    return base64.b64encode(seal_envelope(recipients, body)).decode()


def open_instructions(identity: Identity, sealed_b64: str) -> Instructions:
    """Open, parse and check the owner's signature; WorkloadError says what is wrong."""
    if len(sealed_b64) > MAX_SEALED:
        raise WorkloadError(f"instructions are {len(sealed_b64)} characters, more than the "
                            f"{MAX_SEALED} a ledger accepts")
    try:
        raw = open_envelope(identity, base64.b64decode(sealed_b64, validate=True))
    except (CryptoError, binascii.Error, ValueError) as exc:
        raise WorkloadError(f"instructions do not open with this key: {exc}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WorkloadError("instructions are not JSON") from exc
    if not isinstance(data, dict) or set(data) != {"deployment", "owner_signature"} \
            or not isinstance(data["owner_signature"], str):
        raise WorkloadError("instructions are not {deployment, owner_signature}")
    opened = Instructions(Deployment.parse(data["deployment"]), data["owner_signature"])
    opened.check()
    return opened


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def summarize(deployment: Deployment) -> dict[str, Any]:
    """What a stakeholder is asked to sign, in plain fields (the CLI renders it)."""
    workloads = []
    for w in deployment.workloads:
        line: dict[str, Any] = {"name": w.name, "type": w.type}
        if isinstance(w, ContainerWorkload):
            line.update(image=w.flist, image_hash=w.flist_hash or "(any)",
                        publishers=list(w.publishers) or ["(node's default)"],
                        cpu=w.cpu, memory=_size(w.memory),
                        command=[*w.entrypoint, *w.args],
                        env=sorted(w.env), secret_env=sorted(w.secret_env),
                        mounts=[f"{m.volume}:{m.mountpoint}" for m in w.mounts],
                        network=w.network.network if w.network else None)
        elif isinstance(w, VolumeWorkload | ZdbWorkload):
            line.update(size=_size(w.size))
            if isinstance(w, ZdbWorkload):
                line.update(mode=w.mode, public=w.public, disk=w.disk_type)
                if w.replica_of is not None:  # the replication password is not shown
                    line.update(replica_of=f"{w.replica_of.workload} on node "
                                           f"{w.replica_of.node}")
                elif w.replication is not None:
                    line.update(replicated=True)
        elif isinstance(w, NetworkWorkload):
            line.update(ip_range=w.ip_range, subnet=w.subnet, peers=len(w.peers))
        workloads.append(line)
    need = total_resources(deployment.workloads)
    return {
        "owner": {"twin": deployment.twin_id, "key": deployment.owner_key},
        "version": deployment.version,
        "description": deployment.description,
        "metadata": deployment.metadata,
        "workloads": workloads,
        "resources": {"cpu": need.cru, "memory": _size(need.mru), "ssd": _size(need.sru),
                      "hdd": _size(need.hru)},
        "signers": [{"twin": r.twin, "key": r.key, "weight": r.weight,
                     "required": r.required} for r in deployment.requirement().requests],
        "weight_required": deployment.requirement().weight_required,
        "delete": [{"twin": r.twin, "weight": r.weight, "required": r.required}
                   for r in deployment.delete_quorum().requests],
        "delete_weight_required": deployment.delete_quorum().weight_required,
        "hash": deployment.hash(),
    }
