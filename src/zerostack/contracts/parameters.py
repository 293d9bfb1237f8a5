"""A template's parameters as a JSON Schema, and a user's values checked against it:
text from the command line is coerced to each parameter's type first."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from zerostack.contracts.errors import TemplateError
from zerostack.contracts.template import Parameter, Template
from zerostack.crypto import MAX_INT
from zerostack.workloads import parse_size

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def schema(template: Template) -> dict[str, Any]:
    """The JSON Schema the (coerced) values of `template`'s parameters must meet."""
    props: dict[str, Any] = {}
    required = []
    for name, p in template.spec.parameters.items():
        props[name] = _property(p)
        if p.default is None:
            required.append(name)
    return {"type": "object", "properties": props, "required": sorted(required),
            "additionalProperties": False}


def _property(p: Parameter) -> dict[str, Any]:
    if p.type == "enum":
        return {"enum": list(p.values or [])}
    if p.type == "bool":
        return {"type": "boolean"}
    if p.type == "string":
        out: dict[str, Any] = {"type": "string", "maxLength": p.max_length}
        if p.pattern is not None:
            out["pattern"] = p.pattern
        return out
    out = {"type": "integer", "minimum": -MAX_INT, "maximum": MAX_INT}
    lo, hi = p.bound("minimum"), p.bound("maximum")
    if p.type == "size":
        out["minimum"] = 0
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


def _coerce(name: str, p: Parameter, value: Any) -> Any:
    if p.type == "size":
        try:
            return parse_size(value)
        except ValueError as exc:
            raise TemplateError(f"parameter {name!r}: {exc}") from None
    if not isinstance(value, str):
        return value
    if p.type == "integer" and re.fullmatch(r"[+-]?\d{1,20}", value.strip()):
        return int(value)
    if p.type == "bool" and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if p.type == "enum" and any(isinstance(v, int) for v in p.values or []) \
            and re.fullmatch(r"[+-]?\d{1,20}", value.strip()):
        return int(value)
    return value


def _describe(name: str, p: Parameter, err: jsonschema.ValidationError) -> str:
    shown = repr(err.instance)[:60]
    if err.validator == "enum":
        return f"parameter {name!r}: {shown} is not one of {', '.join(map(str, p.values or []))}"
    if err.validator == "pattern":
        return f"parameter {name!r}: {shown} does not match {p.pattern}"
    if err.validator == "type":
        want = {"integer": "an integer", "boolean": "true or false", "string": "text"}
        return f"parameter {name!r}: {shown} is not {want.get(str(err.validator_value), 'valid')}"
    if err.validator in ("minimum", "maximum"):
        word = "below the minimum" if err.validator == "minimum" else "above the maximum"
        bound = getattr(p, err.validator)
        return f"parameter {name!r}: {shown} is {word} {bound}"
    return f"parameter {name!r}: {err.message[:200]}"


def resolve(template: Template, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in, values coerced and checked; raises TemplateError naming the
    first unknown, missing or invalid parameter."""
    params = template.spec.parameters
    for name in given:
        if name not in params:
            known = ", ".join(sorted(params)) or "none"
            raise TemplateError(f"unknown parameter {name[:64]!r} (template "
                                f"{template.name} takes: {known})")
    values: dict[str, Any] = {}
    for name, p in params.items():
        if name in given:
            values[name] = _coerce(name, p, given[name])
        elif p.default is not None:
            values[name] = _coerce(name, p, p.default)
    missing = sorted(n for n in params if n not in values)
    if missing:
        p = params[missing[0]]
        hint = f" ({p.help})" if p.help else ""
        raise TemplateError(f"missing parameter {missing[0]!r}{hint}: pass -p "
                            f"{missing[0]}=VALUE")
    validator = jsonschema.Draft202012Validator(schema(template))
    errors = sorted(validator.iter_errors(values), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        name = str(err.path[0]) if err.path else ""
        if name in params:
            raise TemplateError(_describe(name, params[name], err))
        raise TemplateError(f"parameters: {err.message[:200]}")
    return values
