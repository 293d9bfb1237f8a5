"""Turning what a user writes (a deployment YAML, --stakeholder options) into a Deployment."""

from __future__ import annotations

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
                     weight_required: int | None, version: int = 1) -> Deployment:
    """The owner's deployment: the file's workloads, this twin as owner, and the signature
    requirement from the options (or the file, or owner-only by default)."""
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
    data.update(twin_id=owner, version=version)
    try:
        return Deployment.parse(data)
    except WorkloadError as exc:
        raise BotError(str(exc)) from exc
