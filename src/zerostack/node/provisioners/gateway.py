"""Gateway workloads: `gateway_name_proxy` (NAME.<gateway domain>, the name owned on the
ledger by the deployment's owner) and `gateway_fqdn_proxy` (the owner's own domain), both
served by the node's one Caddy, or with `tls_passthrough` by the node's TLS front
(HAProxy, `gateway.front`), which forwards their TLS untouched by SNI. Backends on the owner's user network are reached through
the node's join of that network (`node.network.join`).

The routes live in memory and in Caddy only: after an agent restart the engine finds
them missing (`exists`) and provisions them again from the contracts, into a fresh
Caddy. Ledger facts the node needs (its gateway record, who owns each name) are put in
`node.extra` by the agent before every pass: "gateway" and "name_owners".
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import threading
from dataclasses import replace
from typing import Any

from zerostack.gateway import Caddy, GatewayError, Route, Upstream, front
from zerostack.gateway.dns import Dnsmasq, HealthWatch, Peer, lookup_txt, system_resolvers
from zerostack.gateway.front import Front
from zerostack.node.network import join
from zerostack.node.network.plan import NetworkResource, resource_names
from zerostack.node.provisioners.base import (
    NodeContext,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.workloads import (
    Deployment,
    GatewayFqdnProxyWorkload,
    GatewayNameProxyWorkload,
    NetworkWorkload,
    Workload,
)
from zerostack.workloads.types import parse_backend

log = logging.getLogger("zerostack.gateway")

ProxySpec = GatewayNameProxyWorkload | GatewayFqdnProxyWorkload
PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
"""Private ranges: user networks (other tenants' too, on a node that joined them), NAT
LANs and the nodes' uplinks. A backend there is reached only through `network`."""
TEST_TLDS = frozenset({"test", "example", "invalid", "localhost"})
"""Top-level domains reserved for tests (RFC 2606, 6761): no public CA certifies a name
under them and nobody owns one, so any tenant may proxy one with the internal CA."""
PROOF_LABEL = "_zerostack"
"""An fqdn's owner proves it by a TXT record `zerostack-twin=N` at `_zerostack.<fqdn>`."""


def _node_addresses() -> set[str]:
    """Every address of the node's own namespace (where the agent and Caddy run)."""
    try:
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        links = json.loads(out or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        # an empty set would let a backend name this node: refuse rather than guess
        raise ProvisionError(f"cannot list this node's addresses: {exc}") from None
    return {str(a.get("local")) for link in links for a in link.get("addr_info", [])}


class GatewayService:
    """What the gateway workloads of one node share: Caddy, the routes it serves and the
    networks the node joined for them."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self.caddy = Caddy(node.data_dir / "gateway",
                           acme_email=str(node.extra.get("gateway_acme_email", "")),
                           binary=str(node.extra.get("caddy", "caddy")))
        self.front = Front(node.data_dir / "gateway" / "front",
                           binary=str(node.extra.get("haproxy", "haproxy")))
        self.routes: dict[str, Route] = {}
        self.joined: dict[str, str] = {}  # port forward (its table) -> network tag
        self.paused: set[str] = set()  # routes whose contract is in grace: they answer 503
        self.lock = threading.RLock()
        self.watch = HealthWatch(Dnsmasq(node.data_dir / "gateway",
                                         binary=str(node.extra.get("dnsmasq", "dnsmasq"))),
                                 self._dns_state)

    def _dns_state(self) -> tuple[list[str], Peer, list[Peer]]:
        """For the grid DNS: the hosts served, this gateway and the farm's other ones."""
        with self.lock:
            hosts = [r.host for r in self.routes.values()]
        gw = self.node.extra.get("gateway") or {}
        own = Peer(0, str(gw.get("ipv4") or "").split("/")[0],
                   str(gw.get("ipv6") or "").split("/")[0])
        peers = [Peer(int(p["node"]), str(p.get("ipv4") or "").split("/")[0],
                      str(p.get("ipv6") or "").split("/")[0])
                 for p in self.node.extra.get("gateway_peers") or []]
        return hosts, own, peers

    @classmethod
    def of(cls, node: NodeContext) -> GatewayService:
        service = node.extra.get("gateway_service")
        if not isinstance(service, GatewayService):
            service = node.extra["gateway_service"] = cls(node)
        return service

    def record(self) -> dict[str, Any]:
        """The node's gateway record from the ledger; ProvisionError if it has none."""
        gw = self.node.extra.get("gateway")
        if not isinstance(gw, dict) or not gw.get("domain"):
            raise ProvisionError("this node is not a gateway: its farmer has not made it "
                                 "one (node.gateway with a domain and public addresses)")
        return gw

    def public_addresses(self) -> dict[str, str]:
        gw = self.record()
        return {k: str(gw.get(k) or "").split("/")[0] for k in ("ipv4", "ipv6")
                if gw.get(k)}

    def _load(self) -> None:
        try:
            front.serve(self.caddy, self.front, list(self.routes.values()))
        except GatewayError as exc:
            raise ProvisionError(f"gateway: {exc}") from None

    def _serves(self, route: Route) -> bool:
        """Whether Caddy (and for a passthrough route the front) serves `route`."""
        if route.passthrough:
            return self.caddy.has_route(f"{route.id}-http") and self.front.serves(route)
        return self.caddy.has_route(route.id)

    def put(self, route: Route) -> None:
        with self.lock:
            route = replace(route, paused=route.id in self.paused)
            for other in self.routes.values():
                if other.host == route.host and other.id != route.id:
                    raise ProvisionError(f"{route.host} is already proxied on this gateway "
                                         f"(by workload {other.id})")
            if self.routes.get(route.id) == route and self._serves(route):
                return
            previous = self.routes.get(route.id)
            self.routes[route.id] = route
            self.watch.start()
            try:
                self._load()
            except ProvisionError:
                if previous is None:
                    self.routes.pop(route.id, None)
                else:
                    self.routes[route.id] = previous
                raise

    def drop(self, route_id: str) -> None:
        with self.lock:
            self.paused.discard(route_id)
            if self.routes.pop(route_id, None) is not None:
                self._load()

    def set_paused(self, route_id: str, paused: bool) -> None:
        """Make `route_id` answer 503 (paused) or proxy again; remembered for a route
        provisioned later (after Caddy was rebuilt) until resumed."""
        with self.lock:
            (self.paused.add if paused else self.paused.discard)(route_id)
            route = self.routes.get(route_id)
            if route is None or route.paused == paused:
                return
            self.routes[route_id] = replace(route, paused=paused)
            try:
                self._load()
            except ProvisionError:
                self.routes[route_id] = route
                raise

    def present(self, route_id: str) -> bool:
        """Whether Caddy serves `route_id`: a dead Caddy is started again (with the
        routes known), so the next pass finds what it lacks and provisions it."""
        with self.lock:
            if route_id not in self.routes:
                return False
            try:
                self.caddy.ensure_running(list(self.routes.values()))
                if (any(r.passthrough for r in self.routes.values())
                        and not self.front.running()):
                    log.warning("event=front_died")
                    self._load()  # Caddy alone behind a dead front: nothing reaches it
            except (GatewayError, ProvisionError):
                return False
            self.watch.start()
            return self._serves(self.routes[route_id])

    def uses_network(self, tag: str) -> bool:
        """Whether a route or a port forward still reaches its backends through `tag`."""
        return (any(r.network == tag for r in self.routes.values())
                or tag in self.joined.values())

    # ---- backends ---------------------------------------------------------------------

    def _resource(self, wid: WorkloadID, spec: ProxySpec,
                  deployment: Deployment) -> tuple[NetworkResource, NetworkWorkload]:
        """The network resource of the deployment's network `spec.network` (unchanged)."""
        assert spec.network is not None
        net = deployment.workload(spec.network)
        if not isinstance(net, NetworkWorkload):
            raise ProvisionError(f"{spec.network!r} is not a network of this deployment")
        netprov = self.node.extra.get("container_network")
        if netprov is None:
            raise ProvisionError("this node runs no user networks")
        return netprov._plan(WorkloadID(wid.contract, net.name), net), net

    def upstreams(self, wid: WorkloadID, spec: ProxySpec,
                  deployment: Deployment) -> tuple[tuple[Upstream, ...], str]:
        """The backends, checked before anything is made: never this node itself (its
        public, namespace or network addresses); on `spec.network` when they are in its
        range, else public. Then joins the network. Returns the backends and the tag of
        the network joined ('' for none)."""
        parsed = [parse_backend(b) for b in spec.backends]
        if len({s for s, _, _ in parsed}) > 1:
            raise ProvisionError("backends mix http and https: use one scheme for all")
        own = set(self.public_addresses().values()) | _node_addresses()
        res: NetworkResource | None = None
        rng: ipaddress.IPv4Network | None = None
        if spec.network is not None:
            res, net = self._resource(wid, spec, deployment)
            rng = ipaddress.IPv4Network(net.ip_range)
            own |= {join.join_address(res.subnet), res.bridge_address.split("/")[0]}
        for backend, (_, address, _) in zip(spec.backends, parsed, strict=True):
            if address in own:
                raise ProvisionError(f"backend {backend} is this gateway node itself")
            ip = ipaddress.ip_address(address)
            if rng is not None and ip in rng:
                continue
            if any(ip in n for n in PRIVATE):
                where = f"outside network {spec.network!r} ({rng})" if rng else "private"
                raise ProvisionError(f"backend {backend} is {where}: a backend is on the "
                                     "deployment's network (name it in `network`) or public")
        if res is not None:
            join.ensure_join(res)
        return (tuple(Upstream(s, a, p) for s, a, p in parsed),
                res.names.tag if res is not None else "")

    def leave_unused(self, wid: WorkloadID, network: str | None) -> None:
        """Leave the network `network` of `wid`'s deployment unless something still
        uses the join (the network workload's removal takes it anyway)."""
        if network is None:
            return
        names = resource_names(self.node.identity.public_hex,
                               WorkloadID(wid.contract, network))
        with self.lock:
            if not self.uses_network(names.tag):
                join.leave(names)

    def close(self) -> None:
        self.watch.stop()
        self.front.stop()
        self.caddy.stop()


class _ProxyProvisioner(Provisioner):
    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self.service = GatewayService.of(node)

    def host(self, spec: ProxySpec, deployment: Deployment) -> tuple[str, int]:
        """The host name served and the twin it was checked for."""
        raise NotImplementedError

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        if not isinstance(spec, GatewayNameProxyWorkload | GatewayFqdnProxyWorkload):
            raise ProvisionError(f"{wid}: not a gateway proxy workload")
        if spec.tls_passthrough and any(not b.startswith("https://") for b in spec.backends):
            raise ProvisionError("tls_passthrough forwards TLS untouched: every backend is "
                                 "https://IP:PORT, a server holding the name's certificate")
        with self.service.lock:
            try:
                host, owner = self.host(spec, deployment)
            except ProvisionError:
                self.service.drop(wid.key)  # a name that changed hands loses its route
                raise
            upstreams, tag = self.service.upstreams(wid, spec, deployment)
            route = Route(wid.key, host, upstreams, spec.https_redirect, spec.health_path,
                          spec.health_interval, owner=owner, network=tag,
                          passthrough=spec.tls_passthrough)
            self.service.put(route)
        addresses = self.service.public_addresses()
        return Provisioned(data={
            "host": host, "url": f"https://{host}", "backends": list(spec.backends),
            **addresses})

    def update(self, wid: WorkloadID, old: Workload, new: Workload,
               deployment: Deployment) -> Provisioned:
        done = self.provision(wid, new, deployment)
        assert isinstance(old, GatewayNameProxyWorkload | GatewayFqdnProxyWorkload)
        if old.network is not None and old.network != getattr(new, "network", None):
            self.service.leave_unused(wid, old.network)
        return done

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        assert isinstance(spec, GatewayNameProxyWorkload | GatewayFqdnProxyWorkload)
        with self.service.lock:
            self.service.drop(wid.key)
            self.service.leave_unused(wid, spec.network)

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        with self.service.lock:
            route = self.service.routes.get(wid.key)
            if route is None:
                return False
            if isinstance(spec, GatewayNameProxyWorkload):
                owners = self.node.extra.get("name_owners") or {}
                if spec.domain_name in owners and owners[spec.domain_name] != route.owner:
                    # the name changed hands: its route goes now, provisioning says why
                    self.service.drop(wid.key)
                    return False
            network = getattr(spec, "network", None)
            if route.network and network and not join.joined(resource_names(
                    self.node.identity.public_hex, WorkloadID(wid.contract, network))):
                return False
            return self.service.present(wid.key)

    def pause(self, wid: WorkloadID, spec: Workload) -> str | None:
        """The host answers 503 (Caddy's static response): nothing reaches the backends
        while the contract is in grace."""
        self.service.set_paused(wid.key, True)
        return "paused: the name answers 503 while the contract is in grace"

    def resume(self, wid: WorkloadID, spec: Workload) -> None:
        self.service.set_paused(wid.key, False)

    def close(self) -> None:
        self.service.close()


class NameProxyProvisioner(_ProxyProvisioner):
    """`gateway_name_proxy`: NAME.<gateway domain>, for the name's owner only."""

    def host(self, spec: ProxySpec, deployment: Deployment) -> tuple[str, int]:
        assert isinstance(spec, GatewayNameProxyWorkload)
        gw = self.service.record()
        owners = self.node.extra.get("name_owners") or {}
        name = spec.domain_name
        if name not in owners:
            raise ProvisionError(f"cannot check who owns name {name!r}: the ledger did not "
                                 "answer")
        owner = owners[name]
        if owner is None:
            raise ProvisionError(f"name {name!r} is not registered: its owner registers it "
                                 "first (name.register)")
        if owner != deployment.twin_id:
            raise ProvisionError(f"name {name!r} belongs to twin {owner}, not to the "
                                 f"deployment's owner (twin {deployment.twin_id})")
        return f"{name}.{gw['domain']}", int(owner)


def _resolvers(node: NodeContext) -> list[tuple[str, int]]:
    """The name servers the gateway asks for ownership proofs: `gateway_resolvers`
    (`IP` or `IP#PORT`) if set, else the node's resolv.conf."""
    given = node.extra.get("gateway_resolvers")
    out: list[tuple[str, int]] = []
    for entry in (given if isinstance(given, list) else system_resolvers())[:3]:
        address, _, port = str(entry).partition("#")
        out.append((address, int(port) if port.isdigit() else 53))
    return out


class FqdnProxyProvisioner(_ProxyProvisioner):
    """`gateway_fqdn_proxy`: the owner's own domain. A name under a test TLD is first come
    on this gateway; any other name needs its DNS to say which twin may proxy it (a TXT
    record `zerostack-twin=N` at `_zerostack.<fqdn>`), and, unless its TLS passes through
    untouched, a gateway that gets certificates from ACME: the internal CA certifies test
    names only."""

    def host(self, spec: ProxySpec, deployment: Deployment) -> tuple[str, int]:
        assert isinstance(spec, GatewayFqdnProxyWorkload)
        domain = str(self.service.record()["domain"])
        fqdn, twin = spec.fqdn, deployment.twin_id
        if fqdn == domain or fqdn.endswith("." + domain):
            raise ProvisionError(f"{fqdn} is under the gateway's own domain {domain}: "
                                 "those names are registered on the ledger "
                                 "(gateway_name_proxy)")
        if fqdn.rsplit(".", 1)[-1] in TEST_TLDS:
            return fqdn, twin
        if not spec.tls_passthrough and not self.service.caddy.acme_email:
            raise ProvisionError(
                f"{fqdn} is a real domain and this gateway certifies names with its internal "
                "CA, which it does for test names only (.test, .example, .invalid, "
                ".localhost): use a gateway run with --gateway-acme-email, or "
                "tls_passthrough with the domain's own certificate on the backends")
        proof = f"{PROOF_LABEL}.{fqdn}"
        if len(proof) > 253:
            raise ProvisionError(f"{fqdn} is too long to carry an ownership proof ({proof})")
        wanted = f"zerostack-twin={twin}"
        servers = _resolvers(self.node)
        if not servers:
            raise ProvisionError(f"cannot check who owns {fqdn}: the node has no name server")
        records: list[str] = []
        for address, port in servers:
            try:
                records = lookup_txt(proof, [address], port=port)
                break
            except GatewayError as exc:
                error = str(exc)
        else:
            raise ProvisionError(f"cannot check who owns {fqdn}: {error}")
        if wanted not in records:
            raise ProvisionError(
                f"{fqdn} is not proven to be twin {twin}'s: its DNS needs a TXT record "
                f'{proof} "{wanted}" (found {len(records)} TXT record(s) there)')
        return fqdn, twin
