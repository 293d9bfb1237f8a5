"""Building a deployment from what a user writes: YAML, stakeholders, weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from zerostack.bot import BotError, load_deployment_file, parse_stakeholder
from zerostack.bot import build_deployment as build_with_keys
from zerostack.workloads import Deployment


def key(twin: int) -> str:
    return f"{twin:064x}"


def build_deployment(data: dict[str, Any], owner: int, stakeholders: list[str],
                     weight_required: int | None) -> Deployment:
    return build_with_keys(data, owner, stakeholders, weight_required, key_of=key)


def test_examples_parse() -> None:
    for name in ("zdb-namespace.yaml", "volume.yaml"):
        dep = build_deployment(load_deployment_file(REPO / "examples" / name), 5, [], None)
        assert dep.twin_id == 5 and dep.version == 1
        assert dep.requirement().holds([5])


def test_stakeholders_make_the_requirement() -> None:
    data = {"workloads": [{"type": "zdb", "name": "db", "size": "1M"}]}
    dep = build_deployment(data, 1, ["2:1", "3:1", "4:2:required"], 3)
    req = dep.requirement()
    assert req.weight_required == 3
    assert {(r.twin, r.weight, r.required) for r in req.requests} == {
        (1, 1, True), (2, 1, False), (3, 1, False), (4, 2, True)}
    assert not req.holds([1, 2, 3]) and req.holds([1, 4])
    # without --weight-required every listed weight is needed
    assert build_deployment(data, 1, ["2:1"], None).requirement().weight_required == 2
    # the owner's own entry sets its weight but stays required
    owner0 = build_deployment(data, 1, ["1:0", "2:1", "3:1"], 2).requirement()
    assert owner0.missing([2, 3]) is not None and owner0.holds([1, 2, 3])


@pytest.mark.parametrize("bad", ["x", "1", "1:2:maybe", "a:1", "1:b"])
def test_bad_stakeholder(bad: str) -> None:
    with pytest.raises(BotError, match="TWIN:WEIGHT"):
        parse_stakeholder(bad)


def test_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    f = tmp_path / "d.yaml"
    f.write_text("workloads: [\n")
    with pytest.raises(BotError, match="not valid YAML"):
        load_deployment_file(f)
    with pytest.raises(BotError, match="cannot read"):
        load_deployment_file(tmp_path / "missing.yaml")
    with pytest.raises(BotError, match=r"workloads\.0\.zdb\.sise"):
        build_deployment({"workloads": [{"type": "zdb", "name": "d", "size": 1, "sise": 2}]},
                         1, [], None)
    with pytest.raises(BotError, match="set by zerostack deploy"):
        build_deployment({"twin_id": 3, "workloads": []}, 1, [], None)
    with pytest.raises(BotError, match="exceeds the total weight"):
        build_deployment({"workloads": []}, 1, ["2:1"], 5)


def test_every_signer_is_named_by_its_key() -> None:
    data = {"workloads": [], "signature_requirement": {
        "requests": [{"twin": 2, "weight": 1}], "weight_required": 1}}
    dep = build_deployment(data, 1, [], None)
    assert dep.requirement().keys() == {1: key(1), 2: key(2)}
    assert dep.owner_key == key(1)
    # a key written in the file must be the twin's key
    data["signature_requirement"]["requests"][0]["key"] = key(3)
    with pytest.raises(BotError, match="twin 2 is listed with key"):
        build_deployment(data, 1, [], None)


def test_two_builds_of_one_file_differ() -> None:
    data = {"workloads": [{"type": "zdb", "name": "db", "size": "1M"}]}
    assert build_deployment(data, 1, [], None).hash() != build_deployment(data, 1, [], None).hash()
