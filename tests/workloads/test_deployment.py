"""Deployments: validation, canonical hash, multi-signature verification and version diff."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from zerostack.crypto import Domain, Identity, delete_vote_digest
from zerostack.workloads import (
    ContainerWorkload,
    Deployment,
    Resources,
    WorkloadError,
    ZdbWorkload,
    diff,
    total_resources,
    workload_hash,
    workload_resources,
)

names = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


def zdb(name: str, size: int = 1 << 20, **kw: Any) -> dict[str, Any]:
    return {"type": "zdb", "name": name, "size": size, **kw}


IDS = {t: Identity.from_seed(bytes([t]) * 32) for t in range(1, 10)}


def signers(owner: int, requests: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The requests with every twin's key, the owner listed first as required."""
    out = [{**r, "key": IDS[r["twin"]].public_hex} for r in requests or []]
    if owner not in {r["twin"] for r in out}:
        out.insert(0, {"twin": owner, "key": IDS[owner].public_hex, "weight": 1,
                       "required": True})
    return out


def dep(workloads: list[dict[str, Any]], version: int = 0, owner: int = 1,
        requests: list[dict[str, Any]] | None = None, weight: int = 1,
        delete: list[dict[str, Any]] | None = None) -> Deployment:
    data: dict[str, Any] = {
        "version": version,
        "twin_id": owner,
        "signature_requirement": {"requests": signers(owner, requests),
                                  "weight_required": weight},
        "workloads": workloads,
    }
    if delete is not None:
        data["delete_requirement"] = {"requests": signers(owner, delete), "weight_required": 2}
    return Deployment.parse(data)


workload_dicts = st.one_of(
    st.builds(
        lambda n, s, m, p, pub, d: zdb(n, s, mode=m, password=p, public=pub, disk_type=d),
        names, st.integers(1, 1 << 40), st.sampled_from(["user", "seq"]),
        st.text(max_size=10), st.booleans(), st.sampled_from(["hdd", "ssd"]),
    ),
    st.builds(lambda n, s: {"type": "volume", "name": n, "size": s}, names,
              st.integers(1, 1 << 40)),
    st.builds(lambda n, c, m: {"type": "container", "name": n, "flist": "hub://x", "cpu": c,
                               "memory": m}, names, st.integers(1, 8), st.integers(1, 1 << 34)),
    st.builds(lambda n, v6: {"type": "public_ip", "name": n, "v6": v6}, names, st.booleans()),
)
deployments = st.lists(workload_dicts, max_size=6, unique_by=lambda w: w["name"]).map(dep)


def test_every_primitive_parses() -> None:
    d = dep([
        zdb("db", "1G", mode="seq", password="pw", public=True, disk_type="ssd"),
        {"type": "volume", "name": "data", "size": "512M"},
        {"type": "network", "name": "net", "ip_range": "10.1.0.0/16", "subnet": "10.1.2.0/24"},
        {"type": "container", "name": "web", "flist": "hub://web", "env": {"A": "1"},
         "secret_env": {"K": "s"}, "mounts": [{"volume": "data", "mountpoint": "/data"}],
         "network": {"network": "net", "ip": "10.1.2.5"}, "publishers": ["ab" * 32]},
        {"type": "gateway_name_proxy", "name": "gw", "domain_name": "shop",
         "backends": ["http://10.1.2.5:80"]},
        {"type": "gateway_fqdn_proxy", "name": "gw2", "fqdn": "shop.example.com",
         "backends": ["http://10.1.2.5:80"]},
        {"type": "public_ip", "name": "ip"},
    ])
    assert [w.type for w in d.workloads][:2] == ["zdb", "volume"]
    db = d.workload("db")
    assert isinstance(db, ZdbWorkload) and db.size == 1 << 30
    res = total_resources(d.workloads)
    # zdb + volume + the container's writable layer (1 GiB by default)
    assert res.sru == (1 << 30) + (512 << 20) + (1 << 30) and res.cru == 1


@pytest.mark.parametrize(
    ("workloads", "needle"),
    [
        ([zdb("db", sise=1)], "workloads.0.zdb.sise: Extra inputs are not permitted"),
        ([zdb("db"), zdb("db")], "used twice"),
        ([{"type": "teleport", "name": "x"}], "does not match any of the expected tags"),
        ([zdb("db", mode="fast")], "mode"),
        ([zdb("Bad Name")], "name"),
        ([zdb("db", size="lots")], "not a number of bytes"),
        ([{"type": "container", "name": "c", "flist": "f",
           "mounts": [{"volume": "nope", "mountpoint": "/m"}]}], "not a volume here"),
    ],
)
def test_invalid_deployments_are_refused_clearly(workloads: list[dict[str, Any]],
                                                 needle: str) -> None:
    with pytest.raises(WorkloadError, match="invalid deployment") as err:
        dep(workloads)
    assert needle in str(err.value)


def test_requirement_weight_is_checked() -> None:
    with pytest.raises(WorkloadError, match="exceeds the total weight"):
        dep([], weight=5)


@given(deployments)
@settings(deadline=None)
def test_hash_is_stable_across_round_trip_and_ignores_contract_id(d: Deployment) -> None:
    again = Deployment.parse(d.to_dict())
    assert again.hash() == d.hash()
    assert d.model_copy(update={"contract_id": 42}).hash() == d.hash()
    assert len(d.hash()) == 64


@given(deployments, st.integers(1, 1 << 30))
@settings(deadline=None)
def test_any_change_changes_the_hash(d: Deployment, v: int) -> None:
    assert d.model_copy(update={"version": d.version + v}).hash() != d.hash()
    assert d.model_copy(update={"metadata": "x"}).hash() != d.hash()


def test_multisig_two_of_three() -> None:
    ids = IDS
    keys = {t: ids[t].public_hex for t in (1, 2, 3)}
    d = dep([zdb("db")], requests=[{"twin": 2, "weight": 1}, {"twin": 3, "weight": 1}], weight=2)
    where = {"contract": 7, "version": 2, "node": 5}

    def approve(t: int, dd: Deployment = d) -> str:
        return dd.approve(ids[t], **where)

    sig = {1: approve(1)}
    with pytest.raises(WorkloadError, match="below the required 2"):
        d.verify_signatures(sig, keys, **where)
    sig[3] = approve(3)
    assert d.verify_signatures(sig, keys, **where) == {1, 3}
    # the owner is always required, whatever the weights say
    with pytest.raises(WorkloadError, match=r"twin\(s\) 1"):
        d.verify_signatures({2: approve(2), 3: approve(3)}, keys, **where)
    # a forged signature (someone else's key) is refused outright
    forged = dict(sig)
    forged[3] = approve(2)
    with pytest.raises(WorkloadError, match="twin 3 does not verify"):
        d.verify_signatures(forged, keys, **where)
    # a signature over another deployment does not count
    other = d.model_copy(update={"version": 1})
    with pytest.raises(WorkloadError, match="does not verify"):
        other.verify_signatures(sig, keys, **where)
    # nor one for another contract, version or node
    for field in where:
        moved = {**where, field: where[field] + 1}
        with pytest.raises(WorkloadError, match="does not verify"):
            d.verify_signatures(sig, keys, **moved)


def test_approval_is_no_other_kind_of_signature() -> None:
    owner = IDS[1]
    d = dep([zdb("db")])
    h = bytes.fromhex(d.hash())
    keys = {1: owner.public_hex}
    where = {"contract": 3, "version": 1, "node": 2}
    # the same key's signature over the bare hash, or in another domain, is no approval
    for domain in (Domain.TRANSACTION, Domain.DEPLOYMENT, Domain.FLIST_MANIFEST):
        with pytest.raises(WorkloadError, match="does not verify"):
            d.verify_signatures({1: owner.sign(domain, h).hex()}, keys, **where)
    # an owner's approval made before the contract had an id counts for version 1 only
    early = d.approve(owner, 0, 1, 2)
    assert d.verify_signatures({1: early}, keys, **where) == {1}
    with pytest.raises(WorkloadError, match="does not verify"):
        d.verify_signatures({1: d.approve(owner, 0, 2, 2)}, keys, **{**where, "version": 2})


@given(deployments, deployments)
@settings(max_examples=60, deadline=None)
def test_diff_partitions_names(a: Deployment, b: Deployment) -> None:
    b = b.model_copy(update={"version": a.version + 1})
    a_types = {w.name: w.type for w in a.workloads}
    if any(a_types.get(w.name, w.type) != w.type for w in b.workloads):
        with pytest.raises(WorkloadError, match="cannot change type"):
            diff(a, b)
        return
    d = diff(a, b)
    added = {w.name for w in d.added}
    updated = {new.name for _, new in d.updated}
    removed = {w.name for w in d.removed}
    assert added | updated | set(d.unchanged) == {w.name for w in b.workloads}
    assert removed == {w.name for w in a.workloads} - {w.name for w in b.workloads}
    assert not (added & updated) and not (updated & set(d.unchanged))
    for old, new in d.updated:
        assert workload_hash(old) != workload_hash(new)


def test_diff_refuses_type_change_and_old_versions() -> None:
    a = dep([zdb("x")], version=1)
    with pytest.raises(WorkloadError, match="cannot change type from zdb to volume"):
        diff(a, dep([{"type": "volume", "name": "x", "size": 1}], version=2))
    with pytest.raises(WorkloadError, match="must be greater"):
        diff(a, dep([zdb("x")], version=1))
    d = diff(a, dep([zdb("x", size=2 << 20), zdb("y")], version=2))
    assert [w.name for w in d.added] == ["y"] and len(d.updated) == 1


def test_the_deployment_names_every_signer_by_key_and_requires_the_owner() -> None:
    base = {"version": 1, "twin_id": 1, "workloads": []}
    with pytest.raises(WorkloadError, match=r"owner \(twin 1\) must be listed as a required"):
        Deployment.parse({**base, "signature_requirement": {
            "requests": [{"twin": 2, "key": IDS[2].public_hex}], "weight_required": 1}})
    with pytest.raises(WorkloadError, match="key"):
        Deployment.parse({**base, "signature_requirement": {
            "requests": [{"twin": 1, "required": True}], "weight_required": 1}})
    with pytest.raises(WorkloadError, match="two different keys"):
        Deployment.parse({**base, "signature_requirement": {
            "requests": signers(1, None), "weight_required": 1},
            "delete_requirement": {"requests": [{"twin": 1, "key": IDS[3].public_hex,
                                                 "required": True}], "weight_required": 1}})


def test_the_hash_covers_both_requirements_and_the_owner_signs_it() -> None:
    d = dep([zdb("db")], requests=[{"twin": 2, "weight": 1}], weight=1)
    more = dep([zdb("db")], requests=[{"twin": 2, "weight": 1}], weight=2)
    deleting = dep([zdb("db")], requests=[{"twin": 2, "weight": 1}], weight=1,
                   delete=[{"twin": 2, "weight": 1}])
    assert len({d.hash(), more.hash(), deleting.hash()}) == 3
    assert d.body_hash() == more.body_hash() == deleting.body_hash()
    sig = d.sign_owner(IDS[1])
    assert d.owner_signed(sig)
    assert not more.owner_signed(sig)
    assert not d.owner_signed(d.sign_owner(IDS[2]))
    assert not d.owner_signed(IDS[1].sign(Domain.APPROVAL, d.hash_bytes()).hex())


def test_cancel_votes_meet_the_delete_requirement() -> None:
    d = dep([zdb("db")], delete=[{"twin": 2, "weight": 1}, {"twin": 3, "weight": 1}])

    def vote(t: int, contract: int = 4, node: int = 5) -> str:
        return IDS[t].sign(Domain.DELETE_VOTE, delete_vote_digest(contract, node)).hex()

    assert d.cancel_votes({1: vote(1), 2: vote(2)}, contract=4, node=5) == {1, 2}
    with pytest.raises(WorkloadError, match="below the required 2"):
        d.cancel_votes({1: vote(1)}, contract=4, node=5)
    with pytest.raises(WorkloadError, match=r"twin\(s\) 1"):
        d.cancel_votes({2: vote(2), 3: vote(3)}, contract=4, node=5)
    with pytest.raises(WorkloadError, match="does not verify"):
        d.cancel_votes({1: vote(1), 2: vote(2, contract=9)}, contract=4, node=5)
    with pytest.raises(WorkloadError, match="does not verify"):
        d.cancel_votes({1: vote(1), 4: vote(4)}, contract=4, node=5)
    # without a delete requirement the owner alone cancels
    alone = dep([zdb("db")])
    assert alone.cancel_votes({1: vote(1)}, contract=4, node=5) == {1}
    with pytest.raises(WorkloadError):
        alone.cancel_votes({}, contract=4, node=5)


def test_a_deployment_without_a_canonical_form_is_refused_not_crashed_on() -> None:
    # a size past 2^53 - 1 has no canonical JSON, so the deployment has no hash to sign
    with pytest.raises(WorkloadError, match=r"workloads\[0\]\.size: integers are limited"):
        dep([zdb("huge", 1 << 60)])
    assert dep([zdb("big", (1 << 53) - 1)]).hash()


def test_container_writable_layer_counts_as_ssd_capacity() -> None:
    small = ContainerWorkload(name="a", flist="hub://x", disk="64M")
    assert workload_resources(small) == Resources(cru=1, mru=256 << 20, sru=64 << 20)
    assert ContainerWorkload(name="b", flist="hub://x").disk == 1 << 30
    need = total_resources([small, ContainerWorkload(name="b", flist="hub://x", disk="2G")])
    assert need.sru == (64 << 20) + (2 << 30)
    assert need.fits_in(Resources(cru=4, mru=1 << 30, sru=2 << 30)) == (
        f"sru: needs {need.sru}, {2 << 30} free")
    with pytest.raises(ValidationError):
        ContainerWorkload(name="c", flist="hub://x", disk="1M")


def test_solution_approvals_are_checked_by_the_node_alone() -> None:
    """What a node checks of a solution: its own part among the parts, each signature a
    solution approval of exactly those parts by a key its deployment names, the quorum."""
    from zerostack.crypto import solution_digest

    d = dep([zdb("db")], requests=[{"twin": 2, "weight": 1, "required": True}], weight=2)
    mine = (7, 1, 5, d.hash())
    parts = [(6, 1, 4, "ab" * 32), mine]
    where = {"contract": 7, "version": 1, "node": 5}

    def sign(t: int, over: list[tuple[int, int, int, str]] = parts, sid: int = 3) -> str:
        return IDS[t].sign(Domain.SOLUTION_APPROVAL, solution_digest(sid, over)).hex()

    good = {1: sign(1), 2: sign(2)}
    assert d.verify_solution_signatures(good, solution=3, parts=parts, **where) == {1, 2}
    with pytest.raises(WorkloadError, match="required"):
        d.verify_solution_signatures({1: sign(1)}, solution=3, parts=parts, **where)
    # this node's part is not in the list the signatures cover
    with pytest.raises(WorkloadError, match="does not list"):
        d.verify_solution_signatures(good, solution=3, parts=parts[:1], **where)
    with pytest.raises(WorkloadError, match="does not list"):
        d.verify_solution_signatures(good, solution=3, parts=parts,
                                     **{**where, "node": 6})
    # signed over other parts, another solution, by a stranger, or as a plain approval
    for bad in (sign(2, parts[1:]), sign(2, sid=4), sign(3),
                d.approve(IDS[2], contract=7, version=1, node=5)):
        with pytest.raises(WorkloadError, match=r"does not verify|does not name"):
            d.verify_solution_signatures({1: sign(1), 2: bad}, solution=3, parts=parts,
                                         **where)
    with pytest.raises(WorkloadError, match="does not name"):
        d.verify_solution_signatures({**good, 3: sign(3)}, solution=3, parts=parts, **where)
    # and a solution approval is no per-contract approval
    with pytest.raises(WorkloadError, match="does not verify"):
        d.verify_signatures(good, **where)
