"""Make, update and remove a node's network resource in the kernel, as `plan.py` lists it.

Runs in the node's network namespace (the calling thread's). Every step checks what is
there first, so a second run after a crash at any point converges to the one resource
the plan names. WireGuard: the kernel's when it has it, `wireguard-go` otherwise; either
way the interface is made in the node's namespace, where its UDP socket stays, and then
moved into the resource's namespace.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from zerostack.node.network.plan import (
    UPLINK_GATEWAY,
    NetworkResource,
    ResourceNames,
    route_changes,
)
from zerostack.node.provisioners.base import ProvisionError

log = logging.getLogger("zerostack.node.network")

NETNS_DIR = Path("/run/netns")
WG_SOCKETS = Path("/var/run/wireguard")
TIMEOUT = 30.0
EXIT_WAIT = 5.0
WIREGUARD_MTU = 1420  # 1500 less WireGuard's IPv6 overhead: what wg-quick sets, wireguard-go too
WIREGUARD_GO = "wireguard-go"  # the userspace daemon's command (a benchmark compares builds)
# the Go heap's soft limit of each wireguard-go daemon: unlimited, its heap grows with the
# traffic (past 330 MiB measured after a few GiB); below about 128 MiB its garbage
# collector costs throughput (docs/benchmarks.md)
WIREGUARD_GO_MEMORY_LIMIT = "192MiB"


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> str:
    try:
        out = subprocess.run(args, input=stdin, capture_output=True, text=True,
                             timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"{args[0]}: {exc}") from None
    if check and out.returncode != 0:
        # the command line holds no secret: private keys only ever go on stdin
        raise ProvisionError(f"{' '.join(args)[:200]} failed: {out.stderr.strip()[:300]}")
    return out.stdout


def _ip(ns: str | None, *args: str, check: bool = True) -> str:
    return _run(["ip", *(("-n", ns) if ns else ()), *args], check=check)


def _in(ns: str, *args: str, stdin: str | None = None) -> str:
    return _run(["nsenter", f"--net={NETNS_DIR / ns}", *args], stdin=stdin)


def _links(ns: str | None) -> dict[str, dict[str, Any]]:
    out = _ip(ns, "-j", "link", "show", check=False)
    try:
        return {str(link["ifname"]): link for link in json.loads(out or "[]")}
    except (ValueError, KeyError, TypeError):
        return {}


def _is_namespace(path: Path) -> bool:
    """Whether `path` is a bound network namespace, not a file left by a crashed
    `ip netns add` (every namespace file lives on the one nsfs device)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def namespace_exists(ns: str) -> bool:
    return _is_namespace(NETNS_DIR / ns)


def _ensure_namespace(ns: str) -> None:
    path = NETNS_DIR / ns
    if _is_namespace(path):
        return
    if path.exists():  # a crash between creating the file and binding the namespace
        _run(["umount", str(path)], check=False)
        path.unlink(missing_ok=True)
    _ip(None, "netns", "add", ns)
    log.info("event=netns_created name=%s", ns)


def _route_via(ns: str | None, dst: str) -> str | None:
    out = _ip(ns, "-j", "route", "show", "exact", dst, check=False)
    try:
        routes = json.loads(out or "[]")
    except ValueError:
        return None
    return str(routes[0].get("dev")) if routes else None


def _ensure_uplink(res: NetworkResource) -> None:
    n = res.names
    ns = n.namespace
    outer_ok = n.uplink_outer in _links(None)
    inner_ok = n.uplink_inner in _links(ns)
    if not (outer_ok and inner_ok):
        # half a pair (a crash while making it): start the pair over
        if outer_ok:
            _ip(None, "link", "delete", n.uplink_outer, check=False)
        if inner_ok:
            _ip(ns, "link", "delete", n.uplink_inner, check=False)
        _ip(None, "link", "add", n.uplink_outer, "type", "veth", "peer", "name",
            n.uplink_inner, "netns", ns)
    owner = _route_via(None, f"{res.uplink_address}/32")
    if owner not in (None, n.uplink_outer):
        raise ProvisionError(f"network {n.namespace}: its uplink address {res.uplink_address} "
                             f"is already routed to {owner} on this node")
    _ip(None, "addr", "replace", f"{UPLINK_GATEWAY}/32", "dev", n.uplink_outer)
    _ip(None, "link", "set", n.uplink_outer, "up")
    _ip(None, "route", "replace", f"{res.uplink_address}/32", "dev", n.uplink_outer)
    _ip(ns, "addr", "replace", f"{res.uplink_address}/32", "dev", n.uplink_inner)
    _ip(ns, "link", "set", n.uplink_inner, "up")
    _ip(ns, "route", "replace", f"{UPLINK_GATEWAY}/32", "dev", n.uplink_inner)
    _ip(ns, "route", "replace", "default", "via", UPLINK_GATEWAY, "dev", n.uplink_inner)


def _ensure_bridge(res: NetworkResource) -> None:
    ns, bridge = res.names.namespace, res.names.bridge
    if bridge not in _links(ns):
        _ip(ns, "link", "add", bridge, "type", "bridge")
    _ip(ns, "addr", "replace", res.bridge_address, "dev", bridge)
    _ip(ns, "link", "set", bridge, "up")


def _wireguard_socket(name: str) -> Path:
    return WG_SOCKETS / f"{name}.sock"


def _wireguard_go_environment() -> dict[str, str]:
    """The daemon's environment: the node's, less what would keep it in the foreground or
    make it log, and with its heap's soft limit set (also over one the node was given)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WG_PROCESS_FOREGROUND", "LOG_LEVEL", "GOGC", "GOMEMLIMIT")}
    env["GOMEMLIMIT"] = WIREGUARD_GO_MEMORY_LIMIT
    return env


def _start_wireguard(name: str) -> None:
    """Create interface `name` in the node's namespace: kernel WireGuard if the kernel has
    it, otherwise a `wireguard-go` daemon (which exits when its interface is deleted)."""
    _ip(None, "link", "add", name, "type", "wireguard", check=False)
    if name in _links(None):
        log.info("event=wireguard_started name=%s impl=kernel", name)
        return
    _wireguard_socket(name).unlink(missing_ok=True)  # left by a process killed with -9
    try:
        out = subprocess.run([WIREGUARD_GO, name], capture_output=True, text=True,
                             timeout=TIMEOUT, check=False, env=_wireguard_go_environment())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"wireguard-go {name}: {exc}") from None
    if out.returncode != 0 or name not in _links(None):
        raise ProvisionError(f"wireguard-go {name} failed: {out.stderr.strip()[-300:]}")
    log.info("event=wireguard_started name=%s impl=wireguard-go", name)


def _wg_args(ns: str | None, *args: str) -> list[str]:
    """`wg ARGS` run in namespace `ns`: kernel WireGuard answers over netlink in the
    interface's namespace only (wireguard-go over its socket, from anywhere)."""
    return ["nsenter", f"--net={NETNS_DIR / ns}", "wg", *args] if ns else ["wg", *args]


def _answers(name: str, ns: str | None = None) -> bool:
    out = subprocess.run(_wg_args(ns, "show", name, "public-key"), capture_output=True,
                         timeout=TIMEOUT, check=False)
    return out.returncode == 0


def _ensure_wireguard(res: NetworkResource) -> None:
    n = res.names
    ns, wg = n.namespace, n.wireguard
    if wg not in _links(ns):
        if wg not in _links(None):
            _start_wireguard(wg)
        # wireguard-go looks its interface up by name in this namespace as it starts: the
        # interface moves only once the daemon answers (also after a crash right here)
        deadline = time.monotonic() + EXIT_WAIT
        while not _answers(wg):
            if time.monotonic() > deadline:
                raise ProvisionError(f"WireGuard interface {wg} does not answer")
            time.sleep(0.02)
        _ip(None, "link", "set", wg, "netns", ns)
    # syncconf changes only what differs: peers kept stay up, their sessions untouched
    try:
        _run(_wg_args(ns, "syncconf", wg, "/dev/stdin"), stdin=res.wireguard_config())
    except ProvisionError as exc:
        if "in use" in str(exc):
            raise ProvisionError(f"WireGuard port {res.listen_port} is taken on this node "
                                 "(by another network or service): give the network "
                                 "another port") from None
        raise
    _ip(ns, "link", "set", wg, "up")
    out = _ip(ns, "-j", "route", "show", "dev", wg, check=False)
    try:
        actual = {str(r["dst"]) for r in json.loads(out or "[]")}
    except (ValueError, KeyError, TypeError):
        actual = set()
    changes = route_changes(res.routes, actual)
    src = res.bridge_address.split("/")[0]
    for dst in changes.remove:
        _ip(ns, "route", "delete", dst, "dev", wg, check=False)
    for dst in changes.add:
        _ip(ns, "route", "replace", dst, "dev", wg, "src", src)


def ensure(res: NetworkResource) -> None:
    """Make `res` real, or bring an existing one (complete or half made) to it in place."""
    n = res.names
    _ensure_namespace(n.namespace)
    _ip(n.namespace, "link", "set", "lo", "up")
    # user networks are IPv4: no IPv6 at all inside (no link-local addresses, no neighbour
    # discovery) on any link there now or moved in later
    # the resource routes some traffic back onto its bridge (a public address's, through
    # the node's join): no ICMP redirects, which would send it around the resource
    _in(n.namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1",
        "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0")
    # the rules first: the namespace is closed before any of its links is up
    _in(n.namespace, "nft", "-f", "-", stdin=res.resource_rules())
    _ensure_bridge(res)
    _in(n.namespace, "sysctl", "-qw", f"net.ipv4.conf.{n.bridge}.send_redirects=0")
    _run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    _run(["nft", "-f", "-"], stdin=res.node_rules())
    _ensure_uplink(res)
    _ensure_wireguard(res)
    log.info("event=network_resource_ready ns=%s peers=%d", n.namespace, len(res.peers))


def exists(names: ResourceNames) -> bool:
    """Whether the resource's namespace holds its bridge, its uplink and a WireGuard
    interface that answers (`wg show` reaches its daemon)."""
    if not namespace_exists(names.namespace):
        return False
    links = _links(names.namespace)
    if not {names.bridge, names.wireguard, names.uplink_inner} <= set(links):
        return False
    return _answers(names.wireguard, names.namespace)


def remove(names: ResourceNames) -> None:
    """Remove everything the resource made, whatever of it exists: deleting the namespace
    deletes its links (and so the WireGuard interface, whose daemon then exits)."""
    ns = names.namespace
    if namespace_exists(ns):
        _ip(None, "netns", "delete", ns)
        log.info("event=netns_deleted name=%s", ns)
    elif (NETNS_DIR / ns).exists():
        _run(["umount", str(NETNS_DIR / ns)], check=False)
        (NETNS_DIR / ns).unlink(missing_ok=True)
    for link in (names.wireguard, names.uplink_outer):  # left in the node's namespace
        if link in _links(None):
            _ip(None, "link", "delete", link, check=False)
    _run(["nft", "delete", "table", "ip", names.node_table], check=False)
    _run(["nft", "delete", "table", "inet", names.join_table], check=False)
    sock = _wireguard_socket(names.wireguard)
    deadline = time.monotonic() + EXIT_WAIT
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if sock.exists():  # its daemon was killed with -9 before it could clean up
        sock.unlink(missing_ok=True)


def implementation(names: ResourceNames) -> str:
    """Which WireGuard carries the resource: "kernel" (a wireguard link), "wireguard-go"
    (a tun its daemon made), or "" when the interface is not there."""
    out = _ip(names.namespace, "-j", "-d", "link", "show", "dev", names.wireguard,
              check=False)
    try:
        kind = json.loads(out or "[]")[0].get("linkinfo", {}).get("info_kind", "")
    except (ValueError, IndexError, AttributeError):
        return ""
    return {"wireguard": "kernel", "tun": "wireguard-go"}.get(str(kind), "")


def transfer(names: ResourceNames) -> dict[str, tuple[int, int]]:
    """Bytes (received, sent) per peer public key, as `wg show transfer` reports them."""
    out = _run(_wg_args(names.namespace, "show", names.wireguard, "transfer"))
    counts = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


def attach_container(names: ResourceNames, bridge_address: str, netns: str, outer: str,
                     inner: str, address: str) -> None:
    """Give namespace `netns` an `eth0` on the resource's bridge with `address` (in the
    bridge's subnet) and a default route through the bridge; converges like `ensure`."""
    rns = names.namespace
    _ensure_namespace(netns)
    outer_ok = outer in _links(rns)
    inner_ok = "eth0" in _links(netns)
    if not (outer_ok and inner_ok):
        if outer_ok:
            _ip(rns, "link", "delete", outer, check=False)
        for stale in ("eth0", inner):
            if stale in _links(netns):
                _ip(netns, "link", "delete", stale, check=False)
        _ip(rns, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", netns)
        _ip(netns, "link", "set", inner, "name", "eth0")
    # the tunnel's MTU end to end: a container's full-size packet would not fit through it
    _ip(rns, "link", "set", outer, "mtu", str(WIREGUARD_MTU), "master", names.bridge, "up")
    _ip(netns, "link", "set", "eth0", "mtu", str(WIREGUARD_MTU))
    prefix = bridge_address.split("/")[1]
    gateway = bridge_address.split("/")[0]
    current = _ip(netns, "-j", "-4", "addr", "show", "dev", "eth0", check=False)
    try:
        have = {f"{a['local']}/{a['prefixlen']}" for link in json.loads(current or "[]")
                for a in link.get("addr_info", [])}
    except (ValueError, KeyError, TypeError):
        have = set()
    for old in have - {f"{address}/{prefix}"}:
        _ip(netns, "addr", "delete", old, "dev", "eth0", check=False)
    _ip(netns, "addr", "replace", f"{address}/{prefix}", "dev", "eth0")
    _ip(netns, "link", "set", "lo", "up")
    _ip(netns, "link", "set", "eth0", "up")
    _ip(netns, "route", "replace", "default", "via", gateway, "dev", "eth0")


def detach_container(netns: str) -> None:
    """Remove a container's namespace (its veth goes with it)."""
    if namespace_exists(netns):
        _ip(None, "netns", "delete", netns)
    elif (NETNS_DIR / netns).exists():
        _run(["umount", str(NETNS_DIR / netns)], check=False)
        (NETNS_DIR / netns).unlink(missing_ok=True)


def _link_bytes(ns: str | None, dev: str) -> tuple[int, int] | None:
    """(received, sent) bytes of interface `dev` in namespace `ns` (None: the node's)."""
    out = _ip(ns, "-j", "-s", "link", "show", "dev", dev, check=False)
    try:
        stats = json.loads(out or "[]")[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def counters(names: ResourceNames) -> dict[str, tuple[int, int]]:
    """Bytes (in, out) of the resource through its WireGuard interface and its egress
    veth, as the kernel counts them; an interface that is not there is left out."""
    out: dict[str, tuple[int, int]] = {}
    wg = _link_bytes(names.namespace, names.wireguard) if namespace_exists(names.namespace) \
        else None
    if wg is not None:
        out["wireguard"] = wg  # received by the resource: in
    up = _link_bytes(None, names.uplink_outer)
    if up is not None:
        # the node's end of the egress veth: what it sends goes into the resource
        out["uplink"] = (up[1], up[0])
    return out
