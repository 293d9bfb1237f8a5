"""Typed specs of every workload primitive a deployment can hold (pure data, no I/O).

Each model forbids unknown fields: a typo in a deployment is refused, never ignored.
Sizes are integers in bytes; YAML authors may write "512M" or "2G".
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> Any:
    """Accept 1024, "1024", "64M", "2G", "1GiB"; leave anything else to pydantic's int check."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
        if m is None:
            raise ValueError(f"size {value!r} is not a number of bytes like 512M or 2G")
        return int(m.group(1)) * _UNITS[m.group(2).upper()]
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
WorkloadName = Annotated[str, Field(pattern=NAME_PATTERN)]


class Spec(BaseModel):
    """Base of every boundary model here: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _WorkloadBase(Spec):
    name: WorkloadName
    description: str = ""


class Mount(Spec):
    """A volume workload of the same deployment mounted into a container."""

    volume: WorkloadName
    mountpoint: str = Field(pattern=r"^/.*")


class HealthCheck(Spec):
    """A probe run from the node: a TCP connect or an HTTP GET on the container's address."""

    tcp_port: int | None = Field(default=None, ge=1, le=65535)
    http_path: str | None = None
    http_port: int | None = Field(default=None, ge=1, le=65535)
    interval: int = Field(default=5, ge=1)


class ContainerNetwork(Spec):
    """Attachment of a container to a network workload of the same deployment."""

    network: WorkloadName
    ip: str | None = None
    public_ip: WorkloadName | None = None


class ContainerWorkload(_WorkloadBase):
    """A container run from a verified flist under runc with cgroup limits."""

    type: Literal["container"] = "container"
    flist: str = Field(min_length=1)
    flist_hash: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    publishers: list[str] = Field(default_factory=list)
    entrypoint: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, str] = Field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    hostname: str = ""
    cpu: int = Field(default=1, ge=1)
    memory: Size = 256 << 20
    pids: int = Field(default=1024, ge=1)
    # The writable layer (what the container writes outside its volumes): a filesystem of
    # this size, counted as SSD capacity (sru).
    disk: Size = Field(default=1 << 30, ge=16 << 20)
    mounts: list[Mount] = Field(default_factory=list)
    network: ContainerNetwork | None = None
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    healthcheck: HealthCheck | None = None

    @field_validator("publishers")
    @classmethod
    def _publishers_are_keys(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[0-9a-f]{64}", p):
                raise ValueError(f"publisher {p[:20]!r} is not an ed25519 public key in hex")
        return v


class VolumeWorkload(_WorkloadBase):
    """A size-limited filesystem on one of the node's SSD pools."""

    type: Literal["volume"] = "volume"
    size: Size = Field(gt=0)


class ZdbWorkload(_WorkloadBase):
    """A namespace on the node's Zero-DB server."""

    type: Literal["zdb"] = "zdb"
    size: Size = Field(gt=0)
    mode: Literal["user", "seq"] = "user"
    password: str = Field(default="", max_length=128)
    public: bool = False
    disk_type: Literal["hdd", "ssd"] = "hdd"


class WireguardPeer(Spec):
    subnet: str
    wireguard_public_key: str
    allowed_ips: list[str] = Field(default_factory=list)
    endpoint: str = ""


class NetworkWorkload(_WorkloadBase):
    """This node's share of a Zero-Net overlay: one subnet of `ip_range`, WireGuard peers."""

    type: Literal["network"] = "network"
    ip_range: str
    subnet: str
    wireguard_private_key: str = ""
    wireguard_listen_port: int = Field(default=0, ge=0, le=65535)
    peers: list[WireguardPeer] = Field(default_factory=list)

    @field_validator("ip_range", "subnet")
    @classmethod
    def _is_network(cls, v: str) -> str:
        try:
            ipaddress.ip_network(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IP network in CIDR form") from exc
        return v


class GatewayNameProxyWorkload(_WorkloadBase):
    """An HTTP(S) proxy for a name registered on the ledger, under the gateway's domain."""

    type: Literal["gateway_name_proxy"] = "gateway_name_proxy"
    domain_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    backends: list[str] = Field(min_length=1)
    tls_passthrough: bool = False


class GatewayFqdnProxyWorkload(_WorkloadBase):
    """An HTTP(S) proxy for a fully qualified domain name the owner points at the gateway."""

    type: Literal["gateway_fqdn_proxy"] = "gateway_fqdn_proxy"
    fqdn: str = Field(pattern=r"^([a-z0-9-]{1,63}\.)+[a-z]{2,63}$")
    backends: list[str] = Field(min_length=1)
    tls_passthrough: bool = False


class PublicIPWorkload(_WorkloadBase):
    """A public IPv4 and/or IPv6 address reserved on the node for this deployment."""

    type: Literal["public_ip"] = "public_ip"
    v4: bool = True
    v6: bool = False


Workload = Annotated[
    ContainerWorkload
    | VolumeWorkload
    | ZdbWorkload
    | NetworkWorkload
    | GatewayNameProxyWorkload
    | GatewayFqdnProxyWorkload
    | PublicIPWorkload,
    Field(discriminator="type"),
]

WORKLOAD_TYPES: tuple[str, ...] = (
    "container",
    "volume",
    "zdb",
    "network",
    "gateway_name_proxy",
    "gateway_fqdn_proxy",
    "public_ip",
)
