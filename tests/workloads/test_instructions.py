"""Sealed instructions: the owner signs, every stakeholder and the node open, others not."""

from __future__ import annotations

import base64

import pytest

from zerostack.crypto import Identity, envelope_recipients
from zerostack.workloads import Deployment, WorkloadError, open_instructions, seal_instructions
from zerostack.workloads.instructions import MAX_SEALED

OWNER, HOLDER, NODE, STRANGER = (Identity.generate() for _ in range(4))


def deployment() -> Deployment:
    return Deployment.parse({
        "version": 1, "twin_id": 1,
        "signature_requirement": {"requests": [
            {"twin": 1, "key": OWNER.public_hex, "required": True},
            {"twin": 2, "key": HOLDER.public_hex}], "weight_required": 1},
        "workloads": [{"type": "zdb", "name": "db", "size": 1 << 20, "password": "secret"}]})


def test_node_and_stakeholders_open_it_nobody_else_does() -> None:
    dep = deployment()
    sealed = seal_instructions(dep, OWNER, NODE.public_hex)
    assert set(envelope_recipients(base64.b64decode(sealed))) == {
        OWNER.public_hex, HOLDER.public_hex, NODE.public_hex}
    for who in (OWNER, HOLDER, NODE):
        opened = open_instructions(who, sealed)
        assert opened.deployment.hash() == dep.hash()
    with pytest.raises(WorkloadError, match="do not open with this key"):
        open_instructions(STRANGER, sealed)


def test_only_the_owner_named_in_it_signs_it() -> None:
    with pytest.raises(WorkloadError, match="only the owner"):
        seal_instructions(deployment(), HOLDER, NODE.public_hex)


def test_oversized_or_junk_instructions_are_refused_before_decoding() -> None:
    with pytest.raises(WorkloadError, match="more than"):
        open_instructions(NODE, "A" * (MAX_SEALED + 4))
    with pytest.raises(WorkloadError, match="do not open"):
        open_instructions(NODE, "not base64!")
