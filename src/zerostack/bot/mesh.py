"""The user's side of a network: which /24 each node gets, and every node's network
workload (keys, port, peers, endpoints), plus a wg-quick configuration for the user's
machine. Pure: keys come in, workloads come out.

Nodes with a public endpoint peer with every node. A node without one (behind NAT) peers
with the public nodes only and dials them; it reaches the other hidden nodes through the
first public node (the relay), which forwards between its peers. The user's machine
peers with one public node (`via`) that forwards for it.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nacl.public

DEFAULT_RANGE = "10.20.0.0/16"
DEFAULT_PORT = 51820


class MeshError(ValueError):
    """A network that cannot be laid out: no room, no public node, an unknown node."""


@dataclass(frozen=True)
class MeshNode:
    """A node of the network: its id, its /24 and its public address ("" when hidden)."""

    node_id: int
    subnet: str
    endpoint: str = ""


@dataclass(frozen=True)
class UserPeer:
    """The user's machine: its /24, its public key and the node it goes through."""

    subnet: str
    public_key: str
    via: int


def keypair() -> tuple[str, str]:
    """A new WireGuard key pair (private, public), base64 as `wg` prints them."""
    private = nacl.public.PrivateKey.generate()
    return (base64.b64encode(bytes(private)).decode(),
            base64.b64encode(bytes(private.public_key)).decode())


def public_key(private: str) -> str:
    return base64.b64encode(bytes(nacl.public.PrivateKey(base64.b64decode(private))
                                  .public_key)).decode()


def assign_subnets(ip_range: str, taken: Sequence[str], count: int) -> list[str]:
    """`count` /24s of `ip_range` not in `taken`, lowest first (the range's first /24 is
    skipped, so addresses read like 10.20.1.x for the first node)."""
    rng = ipaddress.IPv4Network(ip_range)
    if rng.prefixlen > 24:
        raise MeshError(f"range {ip_range} is smaller than a /24")
    out: list[str] = []
    for i, net in enumerate(rng.subnets(new_prefix=24)):
        if len(out) == count:
            break
        if (i == 0 and rng.prefixlen < 24) or str(net) in taken:
            continue
        out.append(str(net))
    if len(out) < count:
        raise MeshError(f"range {ip_range} has no room for {count} more /24s")
    return out


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def relay(nodes: Sequence[MeshNode]) -> MeshNode:
    public = [n for n in nodes if n.endpoint]
    if not public:
        raise MeshError("a network needs at least one node with a public endpoint")
    return public[0]


def workloads(name: str, ip_range: str, nodes: Sequence[MeshNode], keys: Mapping[int, str],
              port: int = DEFAULT_PORT, users: Sequence[UserPeer] = ()) -> dict[int, dict[str, Any]]:
    """Each node's network workload (a dict a deployment takes), by node id."""
    if len({n.node_id for n in nodes}) != len(nodes):
        raise MeshError("a node is listed twice")
    hub = relay(nodes)
    public = {n.node_id for n in nodes if n.endpoint}
    pub = {n.node_id: public_key(keys[n.node_id]) for n in nodes}
    for u in users:
        if u.via not in public:
            raise MeshError(f"node {u.via} has no public endpoint: the user's machine cannot "
                            "reach the network through it")
    out = {}
    for me in nodes:
        peers = []
        for other in nodes:
            if other.node_id == me.node_id:
                continue
            if not me.endpoint and not other.endpoint:
                continue  # neither can dial the other: through the relay
            allowed = []
            if not me.endpoint and other.node_id == hub.node_id:
                allowed += [n.subnet for n in nodes if not n.endpoint
                            and n.node_id != me.node_id]
            allowed += [u.subnet for u in users if u.via == other.node_id]
            peers.append({"subnet": other.subnet, "wireguard_public_key": pub[other.node_id],
                          "allowed_ips": allowed,
                          "endpoint": _endpoint(other.endpoint, port) if other.endpoint else ""})
        peers += [{"subnet": u.subnet, "wireguard_public_key": u.public_key,
                   "allowed_ips": [], "endpoint": ""} for u in users if u.via == me.node_id]
        out[me.node_id] = {"type": "network", "name": name, "ip_range": ip_range,
                           "subnet": me.subnet, "wireguard_private_key": keys[me.node_id],
                           "wireguard_listen_port": port, "peers": peers}
    return out


def access_config(private_key: str, user: UserPeer, ip_range: str, via: MeshNode,
                  via_public_key: str, port: int = DEFAULT_PORT) -> str:
    """A wg-quick configuration for the user's machine: its address in its /24, the
    whole range through the node it goes through."""
    address = ipaddress.IPv4Network(user.subnet).network_address + 1
    return (f"[Interface]\nPrivateKey = {private_key}\nAddress = {address}/24\n\n"
            f"[Peer]\nPublicKey = {via_public_key}\nAllowedIPs = {ip_range}\n"
            f"Endpoint = {_endpoint(via.endpoint, port)}\nPersistentKeepalive = 25\n")
