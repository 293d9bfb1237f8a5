"""The approval quorum: required twins and summed weight."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.crypto import QuorumError, SignatureRequirement


def req(*reqs: tuple[int, int, bool], weight_required: int) -> SignatureRequirement:
    return SignatureRequirement.from_dict(
        {
            "requests": [{"twin": t, "weight": w, "required": r} for t, w, r in reqs],
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


def test_with_owner_makes_owner_required() -> None:
    r = req((2, 1, False), weight_required=1).with_owner(7)
    assert not r.holds([2])
    assert r.holds([7])


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"requests": [], "weight_required": 0},
        {"requests": [{"twin": 1}], "weight_required": 2},
        {"requests": [{"twin": 1}, {"twin": 1}], "weight_required": 1},
        {"requests": [{"twin": 1, "extra": 1}], "weight_required": 1},
        {"requests": [{"twin": "1"}], "weight_required": 1},
        {"requests": [{"twin": 1, "weight": -1}], "weight_required": 0},
    ],
)
def test_malformed_requirements_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(QuorumError):
        SignatureRequirement.from_dict(bad)


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=6, unique_by=lambda x: x),
       st.sets(st.integers(0, 10)))
def test_quorum_is_monotonic(weights: list[tuple[int, bool]], signed: set[int]) -> None:
    r = req(*[(i, w, rq) for i, (w, rq) in enumerate(weights)], weight_required=0)
    r = SignatureRequirement(r.requests, sum(w for w, _ in weights) // 2)
    if r.holds(signed):
        assert r.holds(signed | {0, 1, 2})
