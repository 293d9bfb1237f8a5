"""Turning what a user writes (a deployment YAML, --stakeholder options) into a Deployment."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from zerostack.workloads import Deployment, WorkloadError


class BotError(Exception):
    """Something the user's side cannot do, with a message saying what to change."""


def parse_stakeholder(text: str) -> dict[str, Any]:
    """`TWIN:WEIGHT[:required]` -> a signature request."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "required"):
            raise ValueError
        return {"twin": int(parts[0]), "weight": int(parts[1]), "required": len(parts) == 3}
    except ValueError:
        raise BotError(f"stakeholder {text!r} must be TWIN:WEIGHT or TWIN:WEIGHT:required")\
            from None


def load_deployment_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BotError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise BotError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BotError(f"{path} must be a mapping with a `workloads` list")
    return data


def build_deployment(data: dict[str, Any], owner: int, stakeholders: list[str],
                     weight_required: int | None, version: int = 1, *,
                     key_of: Callable[[int], str]) -> Deployment:
    """The owner's deployment: the file's workloads, this twin as owner, and the signature
    requirement from the options (or the file, or owner-only by default). Every signer is
    named by its key too, from `key_of(twin)` (which checks pins); a key written in the
    file must be that key."""
    data = dict(data)
    for key in ("twin_id", "contract_id", "version"):
        if key in data:
            raise BotError(f"`{key}` is set by zerostack deploy; remove it from the file")
    if stakeholders:
        requests = [{"twin": owner, "weight": 1, "required": True}]
        for s in stakeholders:
            r = parse_stakeholder(s)
            if r["twin"] == owner:
                requests[0] = {**r, "required": True}
            else:
                requests.append(r)
        total = sum(r["weight"] for r in requests)
        data["signature_requirement"] = {
            "requests": requests,
            "weight_required": total if weight_required is None else weight_required,
        }
    elif "signature_requirement" not in data:
        data["signature_requirement"] = {
            "requests": [{"twin": owner, "weight": 1, "required": True}],
            "weight_required": 1 if weight_required is None else weight_required,
        }
    elif weight_required is not None:
        data["signature_requirement"] = {**data["signature_requirement"],
                                         "weight_required": weight_required}
    for field in ("signature_requirement", "delete_requirement"):
        if isinstance(data.get(field), dict):
            data[field] = _with_keys(data[field], owner, key_of, field)
    data.update(twin_id=owner, version=version)
    data.setdefault("nonce", secrets.token_hex(8))
    try:
        return Deployment.parse(data)
    except WorkloadError as exc:
        raise BotError(str(exc)) from exc


def _with_keys(req: dict[str, Any], owner: int, key_of: Callable[[int], str],
               field: str) -> dict[str, Any]:
    """The requirement with the owner listed as required and every twin's key filled in."""
    requests = [dict(r) if isinstance(r, dict) else r for r in req.get("requests") or []]
    twins = [r.get("twin") for r in requests if isinstance(r, dict)]
    if owner not in twins:
        requests.insert(0, {"twin": owner, "weight": 1, "required": True})
    for r in requests:
        if not isinstance(r, dict) or not isinstance(r.get("twin"), int):
            continue  # Deployment.parse words the error
        if r["twin"] == owner:
            r["required"] = True
        key = key_of(r["twin"])
        if r.setdefault("key", key) != key:
            raise BotError(f"{field}: twin {r['twin']} is listed with key {str(r['key'])[:16]}…, "
                           f"but its key is {key[:16]}…")
    return {**req, "requests": requests}
