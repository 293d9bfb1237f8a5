"""The approval quorum: required twins and summed weight."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.crypto import QuorumError, SignatureRequirement, deployment_hash


def key(twin: int) -> str:
    return f"{twin:064x}"


def req(*reqs: tuple[int, int, bool], weight_required: int) -> SignatureRequirement:
    return SignatureRequirement.from_dict(
        {
            "requests": [{"twin": t, "key": key(t), "weight": w, "required": r}
                         for t, w, r in reqs],
            "weight_required": weight_required,
        }
    )


def test_two_of_three_with_owner_required() -> None:
    r = req((1, 1, True), (2, 1, False), (3, 1, False), weight_required=2)
    assert not r.holds([1])
    assert r.missing([1]) == "signed weight 1 is below the required 2"
    assert not r.holds([2, 3])
    assert "twin(s) 1" in (r.missing([2, 3]) or "")
    assert r.holds([1, 3])
    assert r.holds([1, 2, 3, 99])  # an unknown signer adds nothing and breaks nothing


def test_the_owner_must_be_a_required_signer() -> None:
    data = req((2, 1, False), (7, 1, False), weight_required=1).to_dict()
    with pytest.raises(QuorumError, match=r"owner \(twin 7\) must be listed as a required"):
        SignatureRequirement.from_dict(data, owner=7)
    data["requests"][1]["required"] = True
    r = SignatureRequirement.from_dict(data, owner=7)
    assert not r.holds([2]) and r.holds([7])
    assert r.keys() == {2: key(2), 7: key(7)}


def test_the_hash_binds_both_requirements() -> None:
    body = "ab" * 32
    r = req((1, 1, True), (2, 1, False), weight_required=1)
    r2 = req((1, 1, True), (2, 1, False), weight_required=2)
    assert deployment_hash(body, r, None) != deployment_hash(body, r2, None)
    assert deployment_hash(body, r, None) != deployment_hash(body, r, r)
    assert deployment_hash(body, r, None) != deployment_hash("cd" * 32, r, None)
    assert deployment_hash(body, r, r2) == deployment_hash(body, r, r2)


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"requests": [], "weight_required": 0},
        {"requests": [{"twin": 1, "key": key(1)}], "weight_required": 2},
        {"requests": [{"twin": 1, "key": key(1)}, {"twin": 1, "key": key(2)}],
         "weight_required": 1},
        {"requests": [{"twin": 1, "key": key(1)}, {"twin": 2, "key": key(1)}],
         "weight_required": 1},
        {"requests": [{"twin": 1, "key": key(1), "extra": 1}], "weight_required": 1},
        {"requests": [{"twin": "1", "key": key(1)}], "weight_required": 1},
        {"requests": [{"twin": 1}], "weight_required": 1},
        {"requests": [{"twin": 1, "key": "AB" * 32}], "weight_required": 1},
        {"requests": [{"twin": 1, "key": key(1), "weight": -1}], "weight_required": 0},
        {"requests": [{"twin": 0, "key": key(1)}], "weight_required": 0},
        {"requests": [{"twin": 2**60, "key": key(1)}], "weight_required": 0},
    ],
)
def test_malformed_requirements_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(QuorumError):
        SignatureRequirement.from_dict(bad)


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=6, unique_by=lambda x: x),
       st.sets(st.integers(0, 10)))
def test_quorum_is_monotonic(weights: list[tuple[int, bool]], signed: set[int]) -> None:
    r = req(*[(i, w, rq) for i, (w, rq) in enumerate(weights, 1)], weight_required=0)
    r = SignatureRequirement(r.requests, sum(w for w, _ in weights) // 2)
    if r.holds(signed):
        assert r.holds(signed | {0, 1, 2})
