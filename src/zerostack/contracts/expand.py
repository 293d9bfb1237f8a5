"""Expansion: a template and a user's parameters become a Plan, the low-level description
of the solution (each part's workloads, where it may run, networks, gateways, who must
approve). Pure: no ledger, no I/O; every expression runs in the sandbox."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import TypeAdapter, ValidationError

from zerostack.contracts.errors import TemplateError
from zerostack.contracts.parameters import resolve
from zerostack.contracts.sandbox import Sandbox
from zerostack.contracts.template import Placement, Template
from zerostack.workloads import (
    ContainerWorkload,
    Resources,
    Workload,
    ZdbWorkload,
    total_resources,
)
from zerostack.workloads.deployment import describe_validation_error
from zerostack.workloads.types import NAME_PATTERN

GATEWAY_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
"""A gateway name as the ledger registers it."""

MAX_COPIES = 64
"""Most copies of one part (and so most nodes one part may take)."""
MAX_TOTAL_PARTS = 128

_WORKLOAD: TypeAdapter[Workload] = TypeAdapter(Workload)


@dataclass(frozen=True)
class Where:
    """A part copy's placement rules, evaluated."""

    country: str | None = None
    farm: int | None = None
    disk_type: str | None = None
    public_ip: bool = False
    distinct: bool = True


@dataclass(frozen=True)
class GatewayPlan:
    name: str
    part: str
    port: int
    count: int


@dataclass(frozen=True)
class PartPlan:
    """One copy of a part: what one node will run for it."""

    part: str
    index: int
    workloads: tuple[Workload, ...]
    where: Where
    gateway: GatewayPlan | None = None
    """A gateway copy: its proxy workload is made once the backends' addresses are known."""
    apart_from: tuple[str, ...] = ()
    """Keys of the part copies that must run on another node than this one: a replica
    namespace and its primary."""
    followed: bool = False
    """It holds a namespace that replicas follow: its node needs an address others reach."""

    @property
    def key(self) -> str:
        return f"{self.part}-{self.index}"

    @property
    def resources(self) -> Resources:
        return total_resources(self.workloads)


@dataclass(frozen=True)
class NetworkPlan:
    name: str
    ip_range: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class StakeholderRole:
    role: str
    weight: int
    required: bool


@dataclass(frozen=True)
class Plan:
    """What a template expands into for one set of parameters."""

    template: str
    version: str
    values: dict[str, Any]
    parts: tuple[PartPlan, ...]
    networks: tuple[NetworkPlan, ...] = ()
    gateways: tuple[GatewayPlan, ...] = ()
    stakeholders: tuple[StakeholderRole, ...] = ()
    weight_required: int | None = None
    min_nodes: int = 1
    min_farms: int = 1
    max_cost: int | None = None
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def resources(self) -> Resources:
        total = Resources()
        for p in self.parts:
            total = total + p.resources
        return total


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TemplateError(f"{what} must be an integer, got {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise TemplateError(f"{what} is {value}, outside {lo}..{hi}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TemplateError(f"{what} must be true or false, got {str(value)[:40]!r}")
    return value


class _Expander:
    def __init__(self, template: Template) -> None:
        self.t = template
        self.sandbox = Sandbox()

    def eval(self, value: Any, names: dict[str, Any], path: tuple[str | int, ...]) -> Any:
        try:
            return self.sandbox.evaluate(value, names)
        except TemplateError as exc:
            raise self.t.error(exc.message, path) from None

    def where(self, p: Placement, base: Where, names: dict[str, Any],
              path: tuple[str | int, ...]) -> Where:
        def get(name: str, fallback: Any) -> Any:
            if name not in p.model_fields_set:
                return fallback
            v = getattr(p, name)
            return None if v is None else self.eval(v, names, (*path, name))
        country = get("country", base.country)
        farm = get("farm", base.farm)
        disk = get("disk_type", base.disk_type)
        try:
            if country is not None and not (isinstance(country, str) and len(country) == 2
                                            and country.isascii() and country.isupper()):
                raise TemplateError(f"country {str(country)[:20]!r} is not a two-letter code "
                                    "like CH")
            if disk not in (None, "hdd", "ssd"):
                raise TemplateError(f"disk_type {str(disk)[:20]!r} is not hdd or ssd")
            return Where(
                country=country or None,
                farm=None if farm is None else _int(farm, "farm", 1, 2**53 - 1),
                disk_type=disk,
                public_ip=_bool(get("public_ip", base.public_ip), "public_ip"),
                distinct=_bool(get("distinct", base.distinct), "distinct"),
            )
        except TemplateError as exc:
            raise self.t.error(exc.message, path) from None

    def workload(self, raw: dict[str, Any], names: dict[str, Any],
                 path: tuple[str | int, ...]) -> Workload:
        data = self.eval(raw, names, path)
        publishers = self.t.spec.publishers
        if isinstance(data, dict) and data.get("type") == "container" and publishers:
            own = data.get("publishers")
            if not own:
                data["publishers"] = list(publishers)
            elif not set(own) <= set(publishers):
                raise self.t.error("container lists a publisher the template does not "
                                   "allow (see `publishers:`)", (*path, "publishers"))
        try:
            w = _WORKLOAD.validate_python(data)
        except ValidationError as exc:
            loc = tuple(exc.errors()[0]["loc"])
            if loc and isinstance(data, dict) and loc[0] == data.get("type"):
                loc = loc[1:]  # the union's tag
            raise self.t.error(f"expands to an invalid workload: "
                               f"{describe_validation_error(exc)}", (*path, *loc)) from None
        if publishers and isinstance(w, ContainerWorkload) and not w.publishers:
            raise self.t.error("container has no publisher", path)
        return w


def _pair_replicas(template: Template, parts: list[PartPlan],
                   paths: Mapping[tuple[str, str], tuple[str | int, ...]]) -> list[PartPlan]:
    """Check every `replica_of` against the whole plan and keep each replica's part copy
    apart from its primary's. A template names only the primary workload: the node, port
    and replication password are `zerostack deploy`'s to fill in once parts are placed."""
    zdbs: dict[str, list[tuple[str, ZdbWorkload]]] = {}
    for p in parts:
        for w in p.workloads:
            if isinstance(w, ZdbWorkload):
                zdbs.setdefault(w.name, []).append((p.key, w))
    apart: dict[str, set[str]] = {}
    followed: set[str] = set()
    for p in parts:
        for w in p.workloads:
            if not isinstance(w, ZdbWorkload):
                continue
            path = paths[(p.key, w.name)]
            if w.replication is not None:
                raise template.error("replication is filled in by `zerostack deploy` (a port "
                                     "and a fresh password): leave it out of a template",
                                     (*path, "replication"))
            r = w.replica_of
            if r is None:
                continue
            if r.node or r.port:
                raise template.error("in a template replica_of takes only `workload`: the "
                                     "node and port are filled in once the parts are placed",
                                     (*path, "replica_of"))
            found = zdbs.get(r.workload, [])
            if not found:
                raise template.error(f"zdb {w.name!r} is a replica of {r.workload!r}, but no "
                                     "part of the template has a zdb workload of that name",
                                     (*path, "replica_of", "workload"))
            if len(found) > 1:
                raise template.error(f"zdb {w.name!r} is a replica of {r.workload!r}, a name "
                                     f"{len(found)} part copies use: name the primary with "
                                     "{{ index }} so it is unique", (*path, "replica_of"))
            (key, primary), = found
            if primary.replica_of is not None:
                raise template.error(f"zdb {w.name!r} is a replica of {r.workload!r}, itself "
                                     "a replica: a replica follows a primary, not another "
                                     "replica", (*path, "replica_of", "workload"))
            if key == p.key:
                raise template.error(f"zdb {w.name!r} is a replica of {r.workload!r} in the "
                                     "same part copy, so on the same node: a replica must be "
                                     "on another node than its primary (put it in another "
                                     "part)", (*path, "replica_of", "workload"))
            apart.setdefault(p.key, set()).add(key)
            apart.setdefault(key, set()).add(p.key)
            followed.add(key)
    return [replace(p, apart_from=tuple(sorted(apart[p.key])), followed=p.key in followed)
            if p.key in apart else p for p in parts]


def expand(template: Template, given: Mapping[str, Any]) -> Plan:
    """The Plan for `given` parameters; raises TemplateError (with the template position
    of the failing expression) on any bad parameter, failing expression or invalid result."""
    spec = template.spec
    values = resolve(template, given)
    x = _Expander(template)
    names: dict[str, Any] = dict(values)
    derived: dict[str, Any] = {}
    for key, expr in spec.derived.items():
        derived[key] = names[key] = x.eval(expr, names, ("derived", key))
    base = x.where(spec.placement, Where(), names, ("placement",))
    parts: list[PartPlan] = []
    paths: dict[tuple[str, str], tuple[str | int, ...]] = {}  # (part key, workload): path
    for pi, part in enumerate(spec.parts):
        path: tuple[str | int, ...] = ("parts", pi)
        try:
            count = _int(x.eval(part.count, names, (*path, "count")), f"part {part.name} count",
                         0, MAX_COPIES)
        except TemplateError as exc:
            raise template.error(exc.message, (*path, "count")) from None
        for index in range(count):
            local = {**names, "index": index, "count": count}
            where = x.where(part.placement, base, local, (*path, "placement"))
            wls = tuple(x.workload(w, local, (*path, "workloads", wi))
                        for wi, w in enumerate(part.workloads))
            seen: set[str] = set()
            for wi, w in enumerate(wls):
                if w.name in seen:
                    raise template.error(f"workload name {w.name!r} is used twice in part "
                                         f"{part.name} copy {index}: add {{{{ index }}}} to it",
                                         (*path, "workloads", wi, "name"))
                seen.add(w.name)
                paths[(f"{part.name}-{index}", w.name)] = (*path, "workloads", wi)
            parts.append(PartPlan(part.name, index, wls, where))
            if len(parts) > MAX_TOTAL_PARTS:
                raise template.error(f"more than {MAX_TOTAL_PARTS} part copies", path)
    if not parts:
        raise template.error("the parameters give no part at all (every count is 0)", ("parts",))
    parts = _pair_replicas(template, parts, paths)
    networks = []
    for i, n in enumerate(spec.networks):
        nname = x.eval(n.name, names, ("networks", i, "name"))
        if not (isinstance(nname, str) and re.fullmatch(NAME_PATTERN, nname)):
            raise template.error(f"network name {str(nname)[:40]!r} must match {NAME_PATTERN}",
                                 ("networks", i, "name"))
        networks.append(NetworkPlan(nname, n.ip_range, tuple(n.parts)))
    gateways = []
    for i, g in enumerate(spec.gateways):
        gpath: tuple[str | int, ...] = ("gateways", i)
        try:
            gname = x.eval(g.name, names, (*gpath, "name"))
            if not (isinstance(gname, str) and re.fullmatch(GATEWAY_NAME, gname)):
                raise TemplateError(f"gateway name {str(gname)[:40]!r} must match "
                                    f"{GATEWAY_NAME}")
            gateways.append(GatewayPlan(
                gname, g.part,
                _int(x.eval(g.port, names, (*gpath, "port")), "gateway port", 1, 65535),
                _int(x.eval(g.count, names, (*gpath, "count")), "gateway count", 0, 8)))
        except TemplateError as exc:
            raise template.error(exc.message, gpath) from None
        gw = gateways[-1]
        for index in range(gw.count):
            parts.append(PartPlan(f"gw-{i}", index, (), Where(public_ip=True), gw))
    try:
        min_nodes = _int(x.eval(spec.spread.nodes, names, ("spread", "nodes")),
                         "spread.nodes", 1, MAX_TOTAL_PARTS)
        min_farms = _int(x.eval(spec.spread.farms, names, ("spread", "farms")),
                         "spread.farms", 1, MAX_TOTAL_PARTS)
        max_cost = None if spec.max_cost is None else _int(
            x.eval(spec.max_cost, names, ("max_cost",)), "max_cost", 0, 2**53 - 1)
    except TemplateError as exc:
        raise template.error(exc.message, ("spread",)) from None
    return Plan(
        template=spec.name, version=spec.version, values=values, parts=tuple(parts),
        networks=tuple(networks), gateways=tuple(gateways),
        stakeholders=tuple(StakeholderRole(s.role, s.weight, s.required)
                           for s in spec.stakeholders),
        weight_required=spec.weight_required, min_nodes=min_nodes, min_farms=min_farms,
        max_cost=max_cost, derived=derived,
    )
