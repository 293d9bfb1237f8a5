"""Containers under runc: OCI config, per-container supervisor (restart policy, logs),
health probes inside the container's network namespace, and complete cleanup.

Names are imported lazily so the per-container shim (`python -m
zerostack.node.runtime.shim`) starts without loading the whole runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zerostack.node.runtime.logaccess import (
        LogRequest,
        answer_log_request,
        decode_request,
        encode_request,
        sign_log_request,
    )
    from zerostack.node.runtime.logs import read_logs
    from zerostack.node.runtime.oci import oci_config, resolve_user
    from zerostack.node.runtime.runtime import ContainerRuntime, ContainerStatus, cgroup_dirs
    from zerostack.node.runtime.spec import (
        ContainerError,
        ContainerSpec,
        HealthProbe,
        RestartPolicy,
        VolumeBind,
    )

_EXPORTS = {
    "ContainerError": "spec",
    "ContainerSpec": "spec",
    "HealthProbe": "spec",
    "RestartPolicy": "spec",
    "VolumeBind": "spec",
    "ContainerRuntime": "runtime",
    "ContainerStatus": "runtime",
    "cgroup_dirs": "runtime",
    "oci_config": "oci",
    "resolve_user": "oci",
    "read_logs": "logs",
    "LogRequest": "logaccess",
    "answer_log_request": "logaccess",
    "sign_log_request": "logaccess",
    "encode_request": "logaccess",
    "decode_request": "logaccess",
}

__all__ = [
    "ContainerError",
    "ContainerRuntime",
    "ContainerSpec",
    "ContainerStatus",
    "HealthProbe",
    "LogRequest",
    "RestartPolicy",
    "VolumeBind",
    "answer_log_request",
    "cgroup_dirs",
    "decode_request",
    "encode_request",
    "oci_config",
    "read_logs",
    "resolve_user",
    "sign_log_request",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zerostack.node.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"zerostack.node.runtime.{module}"), name)
