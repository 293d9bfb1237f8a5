"""User networks on the user's side: create one over several nodes (one contract per
node) and let the user's machine in. The private keys live only in the deployments
sealed to each node (and to their owner); the local record keeps what is public.

Record: `$ZEROSTACK_HOME/networks/NAME.json` (0600): range, port, each node's /24,
endpoint and contract, and the user's machines (their /24, public key, node).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zerostack.bot.mesh import (
    DEFAULT_RANGE,
    MeshError,
    MeshNode,
    UserPeer,
    access_config,
    assign_subnets,
    keypair,
    public_key,
    workloads,
)
from zerostack.bot.threebot import BotError, ThreeBot
from zerostack.workloads import Deployment, NetworkWorkload, WorkloadError, open_instructions

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_RECORD = 1 << 20
# Where a new network's WireGuard port is picked: below Linux's ephemeral ports
# (32768-60999), above the well-known ones.
PORTS = range(20000, 30000)


def _path(home: Path, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise BotError(f"network name {name[:64]!r}: 1 to 63 of a-z, 0-9, '-' and '_'")
    return home / "networks" / f"{name}.json"


def load(home: Path, name: str) -> dict[str, Any]:
    path = _path(home, name)
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = json.loads(f.read(MAX_RECORD))
    except FileNotFoundError:
        raise BotError(f"no network {name!r} (create it with `zerostack network add`)") from None
    except (OSError, ValueError) as exc:
        raise BotError(f"{path} is unreadable: {exc}") from None
    return data


def _save(home: Path, name: str, record: dict[str, Any]) -> None:
    path = _path(home, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def _nodes(record: dict[str, Any]) -> list[MeshNode]:
    return [MeshNode(int(i), n["subnet"], n["endpoint"]) for i, n in record["nodes"].items()]


def _users(record: dict[str, Any]) -> list[UserPeer]:
    return [UserPeer(u["subnet"], u["public_key"], int(u["via"])) for u in record["users"]]


def _check_range(home: Path, name: str, ip_range: str) -> None:
    """Refuse a range that is no IPv4 network, or that overlaps another network of this
    user: a machine given access to both could not route to either."""
    try:
        rng = ipaddress.IPv4Network(ip_range)
    except ValueError:
        raise BotError(f"range {ip_range[:50]!r} is not an IPv4 network in CIDR form "
                       "(host bits zero, like 10.20.0.0/16)") from None
    folder = home / "networks"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        other = path.stem
        if other == name or not _NAME.fullmatch(other):
            continue
        theirs = str(load(home, other).get("range", ""))
        try:
            overlaps = rng.overlaps(ipaddress.IPv4Network(theirs))
        except ValueError:
            continue
        if overlaps:
            raise BotError(f"range {rng} overlaps {theirs} of your network {other!r}: "
                           "give another --range")


def _ports_in_use(home: Path, name: str) -> set[int]:
    folder = home / "networks"
    used = set()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.stem != name and _NAME.fullmatch(path.stem):
            try:
                used.add(int(load(home, path.stem).get("port", 0)))
            except (TypeError, ValueError):
                continue
    return used


def pick_port(home: Path, name: str) -> int:
    """A WireGuard port for a new network: random in PORTS (so that two users' networks
    on one node seldom want the same one; a node refuses the second clearly), and never
    one of this user's other networks."""
    used = _ports_in_use(home, name)
    free = [p for p in PORTS if p not in used]
    if not free:
        raise BotError(f"every port of {PORTS.start}-{PORTS.stop - 1} is used by one of "
                       "your networks: give --port")
    return secrets.choice(free)


def create(bot: ThreeBot, home: Path, name: str, node_ids: list[int],
           ip_range: str = DEFAULT_RANGE, port: int | None = None) -> dict[str, Any]:
    """Deploy network `name` over `node_ids` (one contract per node); returns the record.
    Everything is checked and every deployment built before the first contract exists.
    Without `port`, one is picked (`pick_port`)."""
    if _path(home, name).exists():
        raise BotError(f"network {name!r} exists already")
    if not node_ids or len(set(node_ids)) != len(node_ids):
        raise BotError("give each node once: --nodes 1,3,5")
    _check_range(home, name, ip_range)
    port = pick_port(home, name) if port is None else port
    try:
        subnets = assign_subnets(ip_range, [], len(node_ids))
        nodes = []
        for nid, subnet in zip(node_ids, subnets, strict=True):
            info = bot.ledger.node(nid)
            if info is None:
                raise BotError(f"node {nid} is not on the ledger")
            nodes.append(MeshNode(nid, subnet, str(info.get("endpoint") or "")))
        keys = {n.node_id: keypair()[0] for n in nodes}
        wls = workloads(name, ip_range, nodes, keys, port)
    except MeshError as exc:
        raise BotError(str(exc)) from exc
    deps = {n.node_id: bot.build({"workloads": [wls[n.node_id]]}, [], None) for n in nodes}
    record: dict[str, Any] = {"name": name, "range": ip_range, "port": port, "users": [],
                              "nodes": {}}
    for n in nodes:
        cid = bot.deploy(deps[n.node_id], n.node_id)
        record["nodes"][str(n.node_id)] = {"subnet": n.subnet, "endpoint": n.endpoint,
                                           "contract": cid}
        _save(home, name, record)  # each contract is recorded as soon as it exists
    return record


def adopt(home: Path, name: str, ip_range: str,
          nodes: Mapping[int, tuple[str, str, int]], port: int) -> bool:
    """Record a network a solution made (node -> (its /24, its public address, the
    contract holding the network); `port` its WireGuard port), so `network access`, `extend` and `remove` work on
    it; False when this user already has a network of that name (left as it is)."""
    if _path(home, name).exists():
        return False
    record: dict[str, Any] = {"name": name, "range": ip_range, "port": port, "users": [],
                              "nodes": {str(nid): {"subnet": subnet, "endpoint": endpoint,
                                                   "contract": cid}
                                        for nid, (subnet, endpoint, cid) in nodes.items()}}
    _save(home, name, record)
    return True


def _current(bot: ThreeBot, cid: int) -> Deployment:
    c = bot.contract(cid)
    try:
        return open_instructions(bot.identity, c["instructions"]).deployment
    except WorkloadError as exc:
        raise BotError(f"cannot open contract {cid}'s deployment: {exc}") from exc


def _update(bot: ThreeBot, name: str, record: dict[str, Any], nodes: list[MeshNode],
            users: list[UserPeer], also: Sequence[MeshNode] = (),
            also_keys: Mapping[int, str] | None = None) -> dict[int, str]:
    """Deploy the next version of every contract of `nodes` with the network laid out
    anew (with the nodes `also`, whose keys are `also_keys`, joining it); the nodes' private
    keys are read back from their sealed deployments (returned)."""
    current = {n.node_id: _current(bot, int(record["nodes"][str(n.node_id)]["contract"]))
               for n in nodes}
    keys = {}
    for nid, dep in current.items():
        net = dep.workload(name)
        if not isinstance(net, NetworkWorkload):
            raise BotError(f"contract {record['nodes'][str(nid)]['contract']} has no "
                           f"network {name!r}")
        keys[nid] = net.wireguard_private_key
    wls = workloads(name, record["range"], [*nodes, *also], {**keys, **(also_keys or {})},
                    int(record["port"]), users)
    for nid, dep in current.items():
        data = dep.model_dump(mode="json", exclude={"version", "twin_id", "contract_id",
                                                    "signature_requirement",
                                                    "delete_requirement"})
        data["workloads"] = [wls[nid] if w["name"] == name else w for w in data["workloads"]]
        data["signature_requirement"] = dep.signature_requirement.model_dump(mode="json")
        if dep.delete_requirement is not None:
            data["delete_requirement"] = dep.delete_requirement.model_dump(mode="json")
        new = bot.build(data, [], None, version=dep.version + 1)
        bot.update(int(record["nodes"][str(nid)]["contract"]), new)
    return keys


def access(bot: ThreeBot, home: Path, name: str, via: int | None = None) -> str:
    """Add the user's machine to network `name` (an update of every node's contract) and
    return its wg-quick configuration (holding its new private key)."""
    record = load(home, name)
    nodes = _nodes(record)
    try:
        if via is None:
            via = next(n.node_id for n in nodes if n.endpoint) if any(
                n.endpoint for n in nodes) else -1
        through = next((n for n in nodes if n.node_id == via), None)
        if through is None or not through.endpoint:
            raise MeshError(f"node {via} is not a node of {name} with a public endpoint")
        taken = [n.subnet for n in nodes] + [u.subnet for u in _users(record)]
        [subnet] = assign_subnets(record["range"], taken, 1)
        private, public = keypair()
        user = UserPeer(subnet, public, through.node_id)
        users = [*_users(record), user]
        keys = _update(bot, name, record, nodes, users)
    except MeshError as exc:
        raise BotError(str(exc)) from exc
    record["users"].append({"subnet": subnet, "public_key": public, "via": through.node_id})
    _save(home, name, record)
    return access_config(private, user, record["range"], through,
                         public_key(keys[through.node_id]), int(record["port"]))


def remove_node(bot: ThreeBot, home: Path, name: str, node_id: int) -> int:
    """Take `node_id` out of network `name`: the other nodes' contracts are updated
    without it (their tunnels stay up), then its contract is cancelled. Returns that
    contract's id."""
    record = load(home, name)
    entry = record["nodes"].get(str(node_id))
    if entry is None:
        raise BotError(f"node {node_id} is not a node of network {name!r}")
    users = _users(record)
    if any(u.via == node_id for u in users):
        raise BotError(f"a machine of yours reaches {name!r} through node {node_id}: "
                       "remove its access first")
    rest = [n for n in _nodes(record) if n.node_id != node_id]
    if not rest:
        raise BotError(f"node {node_id} is the last node of {name!r}: cancel its contract")
    try:
        _update(bot, name, record, rest, users)
    except MeshError as exc:
        raise BotError(str(exc)) from exc
    cid = int(entry["contract"])
    bot.cancel(cid)
    del record["nodes"][str(node_id)]
    _save(home, name, record)
    return cid


def deploy_on(bot: ThreeBot, home: Path, name: str, node_id: int,
              data: dict[str, Any]) -> int:
    """Run the workloads of `data` (containers joining `name`, volumes…) on `node_id`: the
    next version of that node's network contract keeps its network workload and takes
    these as its other workloads. Returns the contract's id."""
    record = load(home, name)
    entry = record["nodes"].get(str(node_id))
    if entry is None:
        raise BotError(f"node {node_id} is not a node of network {name!r}")
    extra = data.get("workloads") or []
    if not isinstance(extra, list) or any(not isinstance(w, dict) for w in extra):
        raise BotError("the file's `workloads` must be a list of workloads")
    if any(w.get("name") == name for w in extra):
        raise BotError(f"workload name {name!r} is the network's own: rename that workload")
    cid = int(entry["contract"])
    dep = _current(bot, cid)
    net = dep.workload(name)
    if net is None:
        raise BotError(f"contract {cid} has no network {name!r}")
    body = dep.model_dump(mode="json", exclude={"version", "twin_id", "contract_id",
                                                "signature_requirement", "delete_requirement"})
    body["workloads"] = [net.model_dump(mode="json"), *extra]
    body["signature_requirement"] = dep.signature_requirement.model_dump(mode="json")
    if dep.delete_requirement is not None:
        body["delete_requirement"] = dep.delete_requirement.model_dump(mode="json")
    bot.update(cid, bot.build(body, [], None, version=dep.version + 1))
    return cid


def add_nodes(bot: ThreeBot, home: Path, name: str, node_ids: list[int]) -> dict[str, Any]:
    """Extend network `name` to `node_ids`: the present nodes' contracts are updated with
    the new peers (their tunnels stay up), and each new node gets a contract of its own.
    Returns the record."""
    record = load(home, name)
    new_ids = [i for i in node_ids if str(i) not in record["nodes"]]
    if not new_ids or len(set(new_ids)) != len(new_ids):
        raise BotError(f"give nodes not yet in {name!r}, each once")
    present = _nodes(record)
    try:
        taken = [n.subnet for n in present] + [u.subnet for u in _users(record)]
        subnets = assign_subnets(record["range"], taken, len(new_ids))
        added = []
        for nid, subnet in zip(new_ids, subnets, strict=True):
            info = bot.ledger.node(nid)
            if info is None:
                raise BotError(f"node {nid} is not on the ledger")
            added.append(MeshNode(nid, subnet, str(info.get("endpoint") or "")))
        nodes = [*present, *added]
        new_keys = {n.node_id: keypair()[0] for n in added}
        keys = _update(bot, name, record, present, _users(record), also=added,
                       also_keys=new_keys)
        wls = workloads(name, record["range"], nodes, {**keys, **new_keys},
                        int(record["port"]), _users(record))
    except MeshError as exc:
        raise BotError(str(exc)) from exc
    for n in added:
        cid = bot.deploy(bot.build({"workloads": [wls[n.node_id]]}, [], None), n.node_id)
        record["nodes"][str(n.node_id)] = {"subnet": n.subnet, "endpoint": n.endpoint,
                                           "contract": cid}
        _save(home, name, record)
    return record
