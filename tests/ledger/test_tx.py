"""Wire format: parsing refuses anything malformed with a precise reason; signing round-trips."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerostack.crypto import MAX_INT, Domain, Identity, canonical_json, hash_obj, verify
from zerostack.ledger.errors import LedgerRejected
from zerostack.ledger.tx import (
    MAX_INSTRUCTIONS,
    MAX_PAYLOAD_DEPTH,
    PAYLOADS,
    parse_tx,
    sign_tx,
    tx_hash,
)

KEY = Identity.from_seed(bytes(range(32)))


def good(**changes: Any) -> dict[str, Any]:
    tx = sign_tx(KEY, "name.register", 3, 5, {"name": "web"})
    tx.update(changes)
    return tx


def rejected(data: Any) -> LedgerRejected:
    with pytest.raises(LedgerRejected) as info:
        parse_tx(data)
    return info.value


def test_sign_and_parse_round_trip() -> None:
    wire = good()
    tx = parse_tx(wire)
    assert tx.hash == hash_obj({"type": "name.register", "sender": 3, "nonce": 5,
                                "payload": {"name": "web"}})
    assert tx.hash_hex == tx_hash(wire)
    assert verify(Domain.TRANSACTION, KEY.public_hex, tx.hash, tx.signature)
    assert not verify(Domain.APPROVAL, KEY.public_hex, tx.hash, tx.signature)
    assert tx.to_wire() == wire
    assert tx.payload.name == "web"


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        ([1, 2], "malformed", "JSON object"),
        ({"type": "name.register"}, "malformed", "missing"),
        (good(extra=1), "invalid", "unknown field 'extra'"),
        (good(type="contract.destroy"), "invalid", "unknown transaction type"),
        (good(sender="3"), "invalid", "sender"),
        (good(sender=0), "invalid", "sender"),
        (good(sender=True), "invalid", "sender"),
        (good(nonce=-1), "invalid", "nonce"),
        (good(nonce="1"), "invalid", "nonce"),
        (good(payload=[]), "invalid", "payload must be an object"),
        (good(signature="ab"), "invalid", "signature"),
        (good(signature="A" * 128), "invalid", "lowercase hex"),
        (good(payload={"name": "web", "owner": 1}), "invalid", "unknown field 'owner'"),
        (good(payload={"name": "Web!"}), "invalid", "name"),
        (good(payload={}), "invalid", "name"),
    ],
)
def test_malformed_transactions_are_refused(data: Any, code: str, words: str) -> None:
    exc = rejected(data)
    assert exc.code == code
    assert words in str(exc)


def test_payload_types_are_strict() -> None:
    tx = sign_tx(KEY, "contract.cancel", 3, 1, {"contract": "7"})
    assert "contract" in str(rejected(tx))
    tx = sign_tx(KEY, "node.heartbeat", 3, 1, {"uptime": 1})
    tx["payload"]["uptime"] = 1.5
    assert rejected(tx).code == "invalid"


def test_oversize_instructions_are_refused() -> None:
    payload = {
        "node": 1,
        "deployment_hash": "0" * 64,
        "body_hash": "0" * 64,
        "instructions": "A" * (MAX_INSTRUCTIONS + 4),
        "signature_requirement": {"requests": [{"twin": 1, "key": KEY.public_hex}],
                                  "weight_required": 1},
    }
    exc = rejected(sign_tx(KEY, "contract.create", 3, 1, payload))
    assert exc.code == "invalid" and "instructions" in str(exc)


def test_floats_have_no_canonical_form() -> None:
    tx = sign_tx(KEY, "template.publish", 3, 1, {"name": "t", "body": {"a": "b"}})
    tx["payload"]["body"] = {"a": 1.5}
    exc = rejected(tx)
    assert exc.code == "invalid" and "float" in str(exc)


# ---- input hardening: nesting, integer bounds, names ------------------------------------


def unsigned(ttype: str, payload: Any, sender: Any = 3, nonce: Any = 1) -> dict[str, Any]:
    """A wire transaction with a dummy signature: parse_tx checks shape, not signatures,
    and sign_tx could not even hash the values these tests feed it."""
    return {"type": ttype, "sender": sender, "nonce": nonce, "payload": payload,
            "signature": "00" * 64}


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("levels", [MAX_PAYLOAD_DEPTH, 249, 250, 900])
def test_deep_payloads_are_refused_with_a_reason(levels: int) -> None:
    # 249 and 250 levels were accepted, then broke the event feed and the block encoder
    payload = {"name": "t", "body": {"x": nested(levels)}}
    exc = rejected(unsigned("template.publish", payload))
    assert exc.code == "invalid" and f"nested deeper than {MAX_PAYLOAD_DEPTH} levels" in str(exc)
    assert "template.publish payload: body.x" in str(exc)


def test_the_deepest_accepted_payload_fits_a_block_and_an_event_answer() -> None:
    payload = {"name": "t", "body": {"x": nested(MAX_PAYLOAD_DEPTH - 2)}}
    tx = parse_tx(unsigned("template.publish", payload))
    answer = {"events": [{"tx": tx.to_wire()}]}
    assert canonical_json({"header": {}, "txs": [tx.to_wire()]}) and orjson.dumps(answer)


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (unsigned("name.register", {"name": "a"}, sender=2**53), "sender"),
        (unsigned("name.register", {"name": "a"}, nonce=2**53), "nonce"),
        (unsigned("name.register", {"name": "a"}, nonce=2**62), "nonce"),
        (unsigned("contract.cancel", {"contract": 2**53}), "contract"),
        (unsigned("node.heartbeat", {"used": {"cru": 2**62}}), "cru"),
        (unsigned("node.heartbeat", {"uptime": 2**53}), "uptime"),
        (unsigned("template.publish", {"name": "t", "body": {"n": -(2**53)}}), "integers"),
        (unsigned("farm.create", {"name": "f", "pricing": {"cu": [2**60]}}), "integers"),
    ],
)
def test_integers_beyond_what_json_clients_hold_are_refused(wire: dict[str, Any],
                                                            words: str) -> None:
    exc = rejected(wire)
    assert exc.code == "invalid" and words in str(exc)


def test_integers_up_to_the_bound_are_accepted() -> None:
    tx = parse_tx(unsigned("node.heartbeat", {"used": {"cru": MAX_INT}, "uptime": MAX_INT},
                           sender=MAX_INT, nonce=MAX_INT))
    assert tx.payload.used.cru == MAX_INT


def node(country: str = "BE", city: str = "") -> dict[str, Any]:
    return unsigned("node.register", {"farm": 1, "capacity": {},
                                      "location": {"country": country, "city": city}})


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (unsigned("farm.create", {"name": "farm\u200b"}), "name"),  # zero-width space
        (unsigned("farm.create", {"name": "f\u0430rm"}), "name"),  # Cyrillic a
        (unsigned("farm.create", {"name": "Farm"}), "name"),
        (unsigned("farm.create", {"name": "my farm"}), "name"),
        (unsigned("farm.create", {"name": "-farm"}), "name"),
        (unsigned("farm.create", {"name": "farm\n"}), "name"),
        (unsigned("farm.create", {"name": "f", "public_ips": ["1.2.3.4 gw"]}), "public_ips"),
        (unsigned("template.publish", {"name": "z\u00a0db", "body": {}}), "name"),
        (unsigned("template.publish", {"name": "zdb", "version": "1.0\u202e", "body": {}}),
         "version"),
        (node(country="be"), "country"),
        (node(country="BEL"), "country"),
        (node(city="Lie\u0300ge"), "NFC"),  # decomposed: e + combining grave
        (node(city="Gent\u200b"), "U+200B"),
        (node(city="Gent\u0007"), "U+0007"),
        (node(city=" Gent"), "spaces"),
        (unsigned("twin.register", {"endpoint": "http://a b"}, sender="ab" * 32, nonce=0),
         "endpoint"),
        (unsigned("contract.report", {"contract": 1, "version": 1, "workloads": [
            {"name": "db\u200d", "state": "ok"}]}), "name"),
    ],
)
def test_names_with_look_alikes_or_invisible_characters_are_refused(wire: dict[str, Any],
                                                                   words: str) -> None:
    exc = rejected(wire)
    assert exc.code == "invalid" and words in str(exc)


def test_names_in_their_one_spelling_are_accepted() -> None:
    assert parse_tx(node(city="Liège")).payload.location.city == "Liège"
    assert parse_tx(node(city="São Paulo")).payload.location.city == "São Paulo"
    assert parse_tx(node(city="Saint-Jean-d'Angély")).payload.location.country == "BE"
    assert parse_tx(unsigned("farm.create", {"name": "farm-1.eu_west",
                                             "public_ips": ["198.18.0.10/24", "2001:db8::1"]}))
    assert parse_tx(unsigned("template.publish",
                             {"name": "zdb", "version": "1.2.0-rc1+b5", "body": {}}))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
                      st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=30,
)
deep_value = st.builds(nested, st.integers(0, 400), json_leaf)
huge_value = st.one_of(st.text(min_size=2000, max_size=20000),
                       st.lists(st.integers(-(2**60), 2**60), min_size=100, max_size=2000),
                       st.dictionaries(st.text(max_size=40), st.integers(), min_size=50,
                                       max_size=500))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(st.sampled_from(sorted(PAYLOADS)),
       st.dictionaries(st.sampled_from(["name", "body", "pricing", "data", "location",
                                        "capacity", "used", "workloads", "farm", "x"]),
                       json_value | deep_value | huge_value, max_size=4),
       st.one_of(st.integers(-5, 2**64), st.just("ab" * 32), json_value),
       st.one_of(st.integers(-5, 2**64), json_value))
def test_parse_tx_accepts_or_refuses_any_json_never_crashes(ttype: str, payload: Any,
                                                            sender: Any, nonce: Any) -> None:
    wire = unsigned(ttype, payload, sender=sender, nonce=nonce)
    try:
        tx = parse_tx(wire)
    except LedgerRejected as exc:
        assert exc.code in ("invalid", "malformed") and str(exc)
        return
    # whatever is accepted has a canonical form and fits inside a block and an answer
    assert tx.hash == hash_obj({"type": ttype, "sender": sender, "nonce": nonce,
                                "payload": payload})
    orjson.dumps({"events": [{"tx": tx.to_wire()}]})
