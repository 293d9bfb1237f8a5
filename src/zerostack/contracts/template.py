"""The template document: typed parameters, derived values, parts (the workloads one node
runs, repeated `count` times), networks, gateways, placement rules, stakeholder roles and
allowed flist publishers. Loading checks the structure and every expression's syntax."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zerostack.contracts.errors import TemplateError
from zerostack.contracts.sandbox import Sandbox
from zerostack.contracts.source import Source, parse
from zerostack.workloads import parse_size

IDENT = r"^[a-z][a-z0-9_]{0,31}$"
ROLE = r"^[a-z][a-z0-9-]{0,31}$"
MAX_PARAMETERS = 64
MAX_PARTS = 32
MAX_WORKLOADS = 64

Ident = Annotated[str, Field(pattern=IDENT)]
Expr = Annotated[str, Field(max_length=4096)]
IntOrExpr = int | Expr
BoolOrExpr = bool | Expr


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parameter(_Model):
    """One typed input of a template. `size` values are bytes, written like 400G."""

    type: Literal["integer", "string", "enum", "size", "bool"]
    help: str = Field(default="", max_length=1024)
    default: Any = None
    minimum: int | str | None = None
    maximum: int | str | None = None
    pattern: str | None = Field(default=None, max_length=512)
    values: list[str | int] | None = Field(default=None, max_length=256)
    max_length: int = Field(default=256, ge=1, le=4096)

    @model_validator(mode="after")
    def _consistent(self) -> Parameter:
        if self.type == "enum" and not self.values:
            raise ValueError("an enum parameter lists its `values`")
        if self.type != "enum" and self.values is not None:
            raise ValueError("`values` is for enum parameters")
        if self.pattern is not None:
            if self.type != "string":
                raise ValueError("`pattern` is for string parameters")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern does not compile: {exc}") from None
        if (self.minimum is not None or self.maximum is not None) and \
                self.type not in ("integer", "size"):
            raise ValueError("`minimum`/`maximum` are for integer and size parameters")
        for what in ("minimum", "maximum"):
            v = getattr(self, what)
            if isinstance(v, str) and self.type != "size":
                raise ValueError(f"`{what}` of an integer is a number")
            if isinstance(v, str):
                try:
                    parse_size(v)
                except ValueError as exc:
                    raise ValueError(f"`{what}`: {exc}") from None
        return self

    def bound(self, which: str) -> int | None:
        v = getattr(self, which)
        return None if v is None else int(parse_size(v))


class Placement(_Model):
    """Where a part may run. Every field may be an expression over the parameters."""

    country: Expr | None = None
    farm: IntOrExpr | None = None
    disk_type: Literal["hdd", "ssd"] | Expr | None = None
    public_ip: BoolOrExpr = False
    distinct: BoolOrExpr = True
    """Each copy of the part on its own node."""


class Part(_Model):
    """The workloads one node runs for the solution, repeated `count` times (each copy sees
    `index` 0..count-1). Names and sizes may be expressions."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,23}$")]
    count: IntOrExpr = 1
    placement: Placement = Placement()
    workloads: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_WORKLOADS)


class NetworkSpec(_Model):
    """A user network joining the nodes of the named parts (one /24 per node)."""

    name: Expr
    ip_range: str = "10.60.0.0/16"
    parts: list[str] = Field(min_length=1)


class GatewaySpec(_Model):
    """The same name on `count` gateways, proxied to `port` of the containers of `part`."""

    name: Expr
    part: str
    port: IntOrExpr = 80
    count: IntOrExpr = 1


class Stakeholder(_Model):
    role: Annotated[str, Field(pattern=ROLE)]
    weight: int = Field(default=1, ge=0, le=1000)
    required: bool = False
    help: str = Field(default="", max_length=1024)


class Spread(_Model):
    """The solution's nodes: at least `nodes` distinct nodes in at least `farms` farms."""

    nodes: IntOrExpr = 1
    farms: IntOrExpr = 1


class TemplateSpec(_Model):
    """A whole template as written by its author."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")]
    author: str = Field(default="", max_length=256)
    description: str = Field(default="", max_length=1024)
    parameters: dict[str, Parameter] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    derived: dict[str, Expr] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    placement: Placement = Placement()
    spread: Spread = Spread()
    max_cost: IntOrExpr | None = None
    """Most the solution may cost per month (base units); placement honours it."""
    parts: list[Part] = Field(min_length=1, max_length=MAX_PARTS)
    networks: list[NetworkSpec] = Field(default_factory=list, max_length=8)
    gateways: list[GatewaySpec] = Field(default_factory=list, max_length=8)
    stakeholders: list[Stakeholder] = Field(default_factory=list, max_length=16)
    weight_required: int | None = Field(default=None, ge=0)
    publishers: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _references(self) -> TemplateSpec:
        names = set(self.parameters) | set(self.derived)
        for n in names:
            if not re.fullmatch(IDENT, n):
                raise ValueError(f"parameter or derived name {n!r} must match {IDENT}")
        clash = set(self.parameters) & set(self.derived)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both a parameter and a derived value")
        for reserved in ("index", "count", "nodes"):
            if reserved in names:
                raise ValueError(f"{reserved!r} is a reserved name inside parts")
        parts = [p.name for p in self.parts]
        if len(set(parts)) != len(parts):
            raise ValueError("two parts have the same name")
        for net in self.networks:
            for p in net.parts:
                if p not in parts:
                    raise ValueError(f"network {net.name!r} joins unknown part {p!r}")
        for gw in self.gateways:
            if gw.part not in parts:
                raise ValueError(f"gateway {gw.name!r} proxies to unknown part {gw.part!r}")
        roles = [s.role for s in self.stakeholders]
        if len(set(roles)) != len(roles):
            raise ValueError("a stakeholder role is listed twice")
        if "owner" in roles:
            raise ValueError("'owner' is implicit: the user who deploys always signs")
        return self


class Template:
    """A checked template: its spec, the source it came from (for error positions), and
    the canonical body that is published and hashed."""

    def __init__(self, spec: TemplateSpec, body: dict[str, Any], source: Source | None) -> None:
        self.spec = spec
        self.body = body
        self.source = source

    @property
    def name(self) -> str:
        return self.spec.name

    def error(self, message: str, path: tuple[str | int, ...]) -> TemplateError:
        if self.source is not None:
            return self.source.error(message, path)
        return TemplateError(message, path=".".join(str(p) for p in path))


def _validation_error(exc: ValidationError, source: Source | None) -> TemplateError:
    # an unknown field explains a "missing" one (a typo): report it first
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = f"unknown field {loc[-1]!r}" if loc else "unknown field"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    if source is not None:
        return source.error(msg, loc)
    return TemplateError(msg, path=".".join(str(p) for p in loc))


def _expressions(value: Any, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    out: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(value, str):
        if "{" in value:
            out.append((path, value))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_expressions(v, (*path, i)))
    elif isinstance(value, dict):
        for k, v in value.items():
            out.extend(_expressions(v, (*path, k)))
    return out


def from_data(data: dict[str, Any], source: Source | None = None) -> Template:
    """A Template from decoded data (a ledger body, or a parsed file); raises TemplateError."""
    try:
        spec = TemplateSpec.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, source) from None
    sandbox = Sandbox()
    for path, text in _expressions(data, ()):
        if path[:1] == ("parameters",):
            continue
        try:
            sandbox.check(text)
        except TemplateError as exc:
            if source is not None:
                raise source.error(exc.message, path) from None
            raise TemplateError(exc.message, path=".".join(map(str, path))) from None
    return Template(spec, data, source)


def load_text(text: str) -> Template:
    source = parse(text)
    return from_data(source.data, source)
