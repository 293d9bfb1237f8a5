"""Typed specs of every workload primitive a deployment can hold (pure data, no I/O).

Each model forbids unknown fields: a typo in a deployment is refused, never ignored.
Sizes are integers in bytes; YAML authors may write "512M" or "2G".
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

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


REPLICATION_PORTS = range(24000, 32000)
"""Where a replicated namespace's own Zero-DB server may listen (TCP): below Linux's
ephemeral ports and away from the node's own services."""


class ZdbReplication(Spec):
    """How a replicated namespace's own Zero-DB server is reached: the TCP port it listens
    on (on the node's Zero-DB address) and the replication password that the primary and
    its replicas share. The deployment is sealed to its node, so the password never
    reaches the ledger in clear; the node never reports it."""

    port: int = Field(ge=REPLICATION_PORTS.start, le=REPLICATION_PORTS.stop - 1)
    password: str = Field(min_length=16, max_length=128, pattern=r"^[!-~]+$", repr=False)


class ZdbReplicaOf(Spec):
    """The primary namespace a replica follows: workload `workload` of the same owner on
    node `node`, whose own server listens on `port` of that node's registered address.
    In a template only `workload` is written; `zerostack deploy` fills in the rest once
    the parts are placed."""

    workload: WorkloadName
    node: int = Field(default=0, ge=0, le=2**53)
    port: int = Field(default=0, ge=0, le=REPLICATION_PORTS.stop - 1)

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if v and v not in REPLICATION_PORTS:
            raise ValueError(f"port {v} is outside {REPLICATION_PORTS.start}-"
                             f"{REPLICATION_PORTS.stop - 1}, where replicated namespaces listen")
        return v


class ZdbWorkload(_WorkloadBase):
    """A namespace on the node's Zero-DB server; with `replication`, a namespace on a
    Zero-DB server of its own that replicas on other nodes follow (`replica_of`: this
    namespace is such a read-only replica)."""

    type: Literal["zdb"] = "zdb"
    size: Size = Field(gt=0)
    mode: Literal["user", "seq"] = "user"
    password: str = Field(default="", max_length=128)
    public: bool = False
    disk_type: Literal["hdd", "ssd"] = "hdd"
    replication: ZdbReplication | None = None
    replica_of: ZdbReplicaOf | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unset replication fields are left out, so that the hash of a deployment written
        # before they existed stays what its stakeholders signed.
        out: dict[str, Any] = handler(self)
        for key in ("replication", "replica_of"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    @model_validator(mode="after")
    def _not_itself(self) -> ZdbWorkload:
        if self.replica_of is not None and self.replica_of.workload == self.name:
            raise ValueError(f"zdb {self.name!r} cannot be a replica of itself")
        return self


MAX_PEERS = 256
# In a node's /24: .0 is the network, .1 the node's bridge, .255 the broadcast; containers
# get .2 to .254.
BRIDGE_HOST = 1
FIRST_CONTAINER_HOST = 2
LAST_HOST = 254
MAX_ALLOWED_IPS = 64
_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
_ENDPOINT = re.compile(r"(?:(?P<v4>[0-9.]{7,15})|\[(?P<v6>[0-9a-fA-F:.]{2,45})\]):(?P<port>[0-9]{1,5})")


def check_wireguard_key(value: str, what: str) -> str:
    """`value` if it is a WireGuard key as `wg` prints it (base64 of 32 bytes)."""
    if not _WG_KEY.fullmatch(value):
        raise ValueError(f"{what} {value[:50]!r} is not a WireGuard key (44 characters of "
                         "base64 encoding 32 bytes, as `wg genkey` or `wg pubkey` print)")
    return value


# Inside every node: the egress links between the node and its network resources
# (100.127.0.1 the node's side, 100.127.X.Y a resource's). Nothing a deployment names may
# point there.
NODE_UPLINK_RANGE = "100.127.0.0/16"
# What a user network's ip_range may be: the private IPv4 ranges, as on a LAN.
USER_RANGES = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                      "192.168.0.0/16"))
_NOT_PEERS = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8",  # "this network"
    "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", NODE_UPLINK_RANGE))


def parse_endpoint(value: str) -> tuple[str, int]:
    """`1.2.3.4:51820` or `[fd00::1]:51820` as (address, port); ValueError otherwise.
    Names are refused: a node resolves nothing a deployment gives it. So are addresses
    that are never another machine on the WAN (loopback, link-local, multicast, reserved,
    the node's internal uplink range): a peer endpoint must not aim the node's WireGuard
    socket at the node itself or at what only the node can reach."""
    m = _ENDPOINT.fullmatch(value)
    port = int(m.group("port")) if m else 0
    if m is None or not 1 <= port <= 65535:
        raise ValueError(f"endpoint {value[:80]!r} is not ADDRESS:PORT with an IPv4 address, "
                         "or [ADDRESS]:PORT with an IPv6 one, and a port from 1 to 65535")
    try:
        addr = ipaddress.ip_address(m.group("v4") or m.group("v6"))
    except ValueError as exc:
        raise ValueError(f"endpoint {value[:80]!r}: {exc}") from exc
    if addr.is_multicast or addr.is_unspecified:
        raise ValueError(f"endpoint {value[:80]!r} is not a unicast address")
    v4 = addr if isinstance(addr, ipaddress.IPv4Address) else (addr.ipv4_mapped
                                                               or addr.sixtofour)
    if (v4 is not None and any(v4 in n for n in _NOT_PEERS)) or (
            isinstance(addr, ipaddress.IPv6Address)
            and (addr.is_loopback or addr.is_link_local or addr.is_site_local
                 or addr.is_reserved)):
        raise ValueError(f"endpoint {value[:80]!r} is a loopback, link-local, reserved or "
                         "node-internal address, not a peer on the network")
    return str(addr), port


def _ipv4_network(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value[:50]!r} is not an IP network in CIDR form "
                         "(host bits zero, like 10.20.3.0/24)") from exc
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"{what} {value[:50]!r} is not IPv4: user networks are IPv4")
    return net


class WireguardPeer(Spec):
    """Another node of the network (or the user's machine): its /24, its public key, what
    else it routes for (`allowed_ips`, e.g. the /24 of a node it forwards for) and where
    to reach it (empty: it has no public endpoint and dials in)."""

    subnet: str
    wireguard_public_key: str
    allowed_ips: list[str] = Field(default_factory=list, max_length=MAX_ALLOWED_IPS)
    endpoint: str = ""

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        _ipv4_network(v, "peer subnet")
        return v

    @field_validator("allowed_ips")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        for a in v:
            _ipv4_network(a, "peer allowed_ips entry")
        return v

    @field_validator("wireguard_public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_wireguard_key(v, "peer public key")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if v:
            parse_endpoint(v)
        return v

    def routes(self) -> list[ipaddress.IPv4Network]:
        """What this peer carries: its subnet and its allowed_ips, without duplicates."""
        nets = [ipaddress.IPv4Network(self.subnet)]
        for a in self.allowed_ips:
            n = ipaddress.IPv4Network(a)
            if n not in nets:
                nets.append(n)
        return nets


class NetworkWorkload(_WorkloadBase):
    """This node's share of a Zero-Net overlay: one /24 (`subnet`) of `ip_range`, the
    WireGuard key and port of this node, and its peers (the other nodes)."""

    type: Literal["network"] = "network"
    ip_range: str
    subnet: str
    wireguard_private_key: str = ""
    wireguard_listen_port: int = Field(default=0, ge=0, le=65535)
    peers: list[WireguardPeer] = Field(default_factory=list, max_length=MAX_PEERS)

    @field_validator("ip_range", "subnet")
    @classmethod
    def _is_network(cls, v: str) -> str:
        _ipv4_network(v, "network")
        return v

    @field_validator("wireguard_private_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_wireguard_key(v, "wireguard_private_key") if v else v

    @model_validator(mode="after")
    def _consistent(self) -> NetworkWorkload:
        rng = ipaddress.IPv4Network(self.ip_range)
        own = ipaddress.IPv4Network(self.subnet)
        if not 8 <= rng.prefixlen <= 24:
            raise ValueError(f"ip_range {self.ip_range} must be a /8 to a /24")
        if not any(rng.subnet_of(n) for n in USER_RANGES):
            raise ValueError(f"ip_range {self.ip_range} must be private: inside 10.0.0.0/8, "
                             "172.16.0.0/12 or 192.168.0.0/16")
        if own.prefixlen != 24:
            raise ValueError(f"subnet {self.subnet} must be a /24 (each node gets one /24)")
        if not own.subnet_of(rng):
            raise ValueError(f"subnet {self.subnet} is outside the ip_range {self.ip_range}")
        if self.peers and not self.wireguard_private_key:
            raise ValueError("a network with peers needs its wireguard_private_key")
        taken: list[tuple[ipaddress.IPv4Network, str]] = [(own, "this node's subnet")]
        keys: set[str] = set()
        for i, peer in enumerate(self.peers):
            if peer.wireguard_public_key in keys:
                raise ValueError(f"peers.{i}: public key {peer.wireguard_public_key} is "
                                 "listed twice")
            keys.add(peer.wireguard_public_key)
            if not ipaddress.IPv4Network(peer.subnet).subnet_of(rng):
                raise ValueError(f"peers.{i}: subnet {peer.subnet} is outside the ip_range "
                                 f"{self.ip_range}")
            for net in peer.routes():
                if not net.subnet_of(rng):
                    raise ValueError(f"peers.{i}: {net} is outside the ip_range "
                                     f"{self.ip_range}")
                for other, whose in taken:
                    if net.overlaps(other):
                        raise ValueError(f"peers.{i}: {net} overlaps {whose} ({other})")
                taken.append((net, f"what peers.{i} carries"))
        return self


MAX_BACKENDS = 16
_BACKEND = re.compile(r"(?P<scheme>https?)://(?:(?P<v4>[0-9.]{7,15})|\[(?P<v6>[0-9a-fA-F:.]{2,45})\])"
                      r"(?::(?P<port>[0-9]{1,5}))?/?")
FQDN_PATTERN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
GATEWAY_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def parse_backend(value: str) -> tuple[str, str, int]:
    """`http://10.20.1.10:8080` or `https://[fd00::5]` as (scheme, address, port);
    ValueError otherwise. Names are refused (a gateway resolves nothing a deployment gives
    it), and so are loopback, link-local, multicast and unspecified addresses: a backend
    is a service on the owner's network or on the public network, never the gateway."""
    m = _BACKEND.fullmatch(value)
    port = 0
    if m is not None:
        port = int(m.group("port") or (443 if m.group("scheme") == "https" else 80))
    if m is None or not 1 <= port <= 65535:
        raise ValueError(f"backend {value[:80]!r} is not a URL like http://10.20.1.10:8080 or "
                         "https://[fd00::5]:443 (scheme http or https, an IP address, a port; "
                         "no path)")
    try:
        addr = ipaddress.ip_address(m.group("v4") or m.group("v6"))
    except ValueError as exc:
        raise ValueError(f"backend {value[:80]!r}: {exc}") from exc
    # an IPv4 address written as IPv6 (::ffff:a.b.c.d) is dialled as IPv4: check it as one
    addr = getattr(addr, "ipv4_mapped", None) or addr
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_link_local:
        raise ValueError(f"backend {value[:80]!r} points at a loopback, link-local, "
                         "multicast or unspecified address: not a service a gateway proxies to")
    return m.group("scheme"), str(addr), port


class _ProxyBase(_WorkloadBase):
    """What name and fqdn proxies share: the backends and how traffic reaches them."""

    backends: list[str] = Field(min_length=1, max_length=MAX_BACKENDS)
    """URLs of the backends (`http://IP:PORT`): addresses on the owner's user network
    (`network`) or public addresses. Several: requests go to healthy ones only."""
    network: WorkloadName | None = None
    """The network workload of this deployment (the gateway node's share of the owner's
    user network) through which the backends are reached; none: public backends."""
    tls_passthrough: bool = False
    """Forward TLS untouched to the backends by SNI (the gateway never holds their key):
    every backend is `https://IP:PORT`; plain HTTP to the host redirects to HTTPS."""
    https_redirect: bool = True
    """Plain HTTP requests are redirected to HTTPS; false: HTTP is proxied as well."""
    health_path: str = Field(default="/", max_length=256, pattern=r"^/[!-~]*$")
    health_interval: int = Field(default=2, ge=1, le=300)
    """Seconds between active health checks of every backend."""

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        for b in v:
            parse_backend(b)
        if len(set(v)) != len(v):
            raise ValueError("a backend is listed twice")
        return v


class GatewayNameProxyWorkload(_ProxyBase):
    """An HTTP(S) proxy for `NAME.<gateway domain>`: `name` registered on the ledger to
    the deployment's owner (`name.register`) first."""

    type: Literal["gateway_name_proxy"] = "gateway_name_proxy"
    domain_name: str = Field(pattern=GATEWAY_NAME_PATTERN)


class GatewayFqdnProxyWorkload(_ProxyBase):
    """An HTTP(S) proxy for a fully qualified domain name the owner points at the gateway."""

    type: Literal["gateway_fqdn_proxy"] = "gateway_fqdn_proxy"
    fqdn: str = Field(max_length=253, pattern=FQDN_PATTERN)


class PublicIPWorkload(_WorkloadBase):
    """A public IPv4 and/or IPv6 address reserved on the node for this deployment."""

    type: Literal["public_ip"] = "public_ip"
    v4: bool = True
    v6: bool = False


class PortForwardWorkload(_WorkloadBase):
    """A TCP or UDP port of the gateway's public address(es) forwarded to `target`
    (`IP:PORT`) on the owner's user network `network` (a network workload of this
    deployment: the gateway node's share of it)."""

    type: Literal["port_forward"] = "port_forward"
    protocol: Literal["tcp", "udp"] = "tcp"
    port: int = Field(ge=1, le=65535)
    network: WorkloadName
    target: str

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        addr, _ = parse_endpoint(v)
        if ipaddress.ip_address(addr).version != 4:
            raise ValueError(f"target {v!r} is not an IPv4 address: user networks are IPv4")
        return v


Workload = Annotated[
    ContainerWorkload
    | VolumeWorkload
    | ZdbWorkload
    | NetworkWorkload
    | GatewayNameProxyWorkload
    | GatewayFqdnProxyWorkload
    | PublicIPWorkload
    | PortForwardWorkload,
    Field(discriminator="type"),
]

GATEWAY_TYPES = frozenset({"gateway_name_proxy", "gateway_fqdn_proxy", "port_forward"})
"""Workloads that expose something through a gateway node (and may name a `network`)."""

WORKLOAD_TYPES: tuple[str, ...] = (
    "container",
    "volume",
    "zdb",
    "network",
    "gateway_name_proxy",
    "gateway_fqdn_proxy",
    "public_ip",
    "port_forward",
)
