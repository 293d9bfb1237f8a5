"""A stakeholder's `approve` is no signing oracle: it opens the sealed deployment itself,
recomputes its hash and signs only that, bound to the contract, version and node."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessGroup
from tests.node.harness import Grid
from tests.node.test_untrusted_ledger import contracts_only, tampering_proxy
from zerostack.bot import BotError, ThreeBot
from zerostack.crypto import canonical_json, seal_envelope
from zerostack.ledger.tx import sign_tx, tx_hash
from zerostack.workloads import Deployment, seal_instructions

ZDB = {"workloads": [{"type": "zdb", "name": "db", "size": "1M", "password": "pw"}]}


def test_approve_signs_what_it_recomputed_never_what_the_server_shows(
        procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    _, _, _, node = grid.ready_node()
    owner, _ = grid.user()
    holder, holder_twin = grid.user()
    with grid.bot(owner) as bot:
        dep = bot.build(ZDB, [f"{holder_twin}:1:required"], None)
        cid = bot.deploy(dep, node)
    # a transaction in the holder's name the attacker would like signed
    bait = sign_tx(holder, "name.register", holder_twin, grid.client.next_nonce(holder_twin),
                   {"name": "stolen"})
    bait["signature"] = "00" * 64

    def lie(c: dict[str, Any]) -> dict[str, Any]:
        return {**c, "deployment_hash": tx_hash(bait)} if c.get("id") == cid else c

    nonce = grid.client.next_nonce(holder_twin)
    with tampering_proxy(grid.url, lie) as lying_ledger, \
            ThreeBot(lying_ledger, holder) as bot:
        with pytest.raises(BotError, match="HASH MISMATCH") as err:
            bot.approve(cid)
        assert dep.hash() in str(err.value) and tx_hash(bait) in str(err.value)
    c = grid.client.contract(cid)
    assert str(holder_twin) not in c["approvals"] and c["state"] == "created"
    assert grid.client.next_nonce(holder_twin) == nonce, "the holder signed nothing"
    assert grid.client.name("stolen") is None
    # a hash given with --hash must be the recomputed one
    with grid.bot(holder) as bot:
        with pytest.raises(BotError, match="not the expected"):
            bot.approve(cid, "ab" * 32)
        review = bot.review(cid)
        assert review.hash == dep.hash() and review.version == 1 and review.node == node
        summary = review.summary()
        assert [w["name"] for w in summary["workloads"]] == ["db"]
        assert {s["twin"] for s in summary["signers"]} == {dep.twin_id, holder_twin}
        # saying no at the prompt signs nothing
        with pytest.raises(BotError, match="not approved"):
            bot.approve(cid, confirm=lambda r: False)
        assert grid.client.contract(cid)["state"] == "created"
        bot.approve(cid, dep.hash(), confirm=lambda r: r.hash == dep.hash())
    assert grid.client.contract(cid)["state"] in ("approved", "deployed")


def test_a_deployment_not_sealed_to_the_stakeholder_is_not_signed(
        procs: ProcessGroup, tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    _, _, _, node = grid.ready_node()
    owner, _ = grid.user()
    holder, holder_twin = grid.user()
    with grid.bot(owner) as bot:
        dep = bot.build(ZDB, [f"{holder_twin}:1:required"], None)
        node_key = bot.node_key(node)
        # an owner who seals the instructions to the node only: the holder cannot read them
        body = canonical_json({"deployment": dep.to_dict(),
                               "owner_signature": dep.sign_owner(owner)})
        sealed = base64.b64encode(seal_envelope([node_key], body)).decode()
        cid = grid.client.create_contract(
            owner, node, dep.hash(), sealed, dep.requirement().to_dict(),
            body_hash=dep.body_hash(), approval=dep.approve(owner, 0, 1, node))
    with grid.bot(holder) as bot, pytest.raises(BotError, match="cannot read what contract"):
        bot.approve(cid)
    assert str(holder_twin) not in grid.client.contract(cid)["approvals"]


def test_a_contract_that_lists_a_stakeholder_under_another_key_is_not_signed(
        procs: ProcessGroup, tmp_path: Path) -> None:
    """The stakeholder pinned the owner's key; a lying ledger that serves a contract whose
    (validly signed) deployment names another key for the owner is refused."""
    grid = Grid(procs, tmp_path)
    _, _, _, node = grid.ready_node()
    owner, owner_twin = grid.user()
    holder, holder_twin = grid.user()
    mallory, _ = grid.user()
    with grid.bot(owner) as bot:
        cid = bot.deploy(bot.build(ZDB, [f"{holder_twin}:1:required"], None), node)
    with grid.bot(mallory) as bot:
        spec = bot.build(ZDB, [f"{holder_twin}:1:required"], None).to_dict()
    # mallory's deployment, dressed as the owner's: twin id of the owner, mallory's key
    spec["twin_id"] = owner_twin
    for r in spec["signature_requirement"]["requests"]:
        if r["key"] == mallory.public_hex:
            r["twin"] = owner_twin
    fake = Deployment.parse(spec)
    with grid.bot(holder) as bot:
        node_key = bot.node_key(node)
        bot.twin_key(owner_twin)  # the holder has seen the owner's real key
        sealed = seal_instructions(fake, mallory, node_key)

        def lie(c: dict[str, Any]) -> dict[str, Any]:
            if c.get("id") != cid:
                return c
            return {**c, "deployment_hash": fake.hash(), "instructions": sealed}

        with tampering_proxy(grid.url, lie) as lying_ledger, \
                ThreeBot(lying_ledger, holder, pins=bot.pins) as liar_bot, \
                pytest.raises(BotError, match=f"for twin {owner_twin}, whose key is"):
            liar_bot.approve(cid)
    assert str(holder_twin) not in grid.client.contract(cid)["approvals"]


def test_contracts_only_passes_other_answers_through() -> None:
    rewrite = contracts_only(lambda c: {**c, "x": 1})
    assert rewrite("/twins/1", 200, {"id": 1}) == (200, {"id": 1})
    assert rewrite("/contracts/1", 200, {"id": 1}) == (200, {"id": 1, "x": 1})
