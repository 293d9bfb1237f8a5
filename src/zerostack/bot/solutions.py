"""Solutions on the user's side: a template and parameters become one contract per node
(expansion, placement on the ledger's nodes, networks and gateways filled in), grouped as
a solution that each stakeholder approves once; then status, cancel and retry of a part.

Every step before `solution.create` is local: a bad parameter or no placement creates
nothing. The owner approves the solution last, after every part exists."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zerostack.bot.mesh import MeshError, MeshNode, assign_subnets, keypair
from zerostack.bot.mesh import workloads as mesh_workloads
from zerostack.bot.networks import PORTS as NETWORK_PORTS
from zerostack.bot.spec import BotError
from zerostack.bot.threebot import ThreeBot, _as_bot_error
from zerostack.contracts import (
    NodeOffer,
    Placed,
    Plan,
    Template,
    TemplateError,
    expand,
    from_data,
    place,
)
from zerostack.crypto import SignatureRequirement, hash_hex
from zerostack.ledger.pricing import Prices, monthly
from zerostack.workloads import (
    ContainerWorkload,
    Deployment,
    WorkloadError,
    ZdbWorkload,
    open_instructions,
    priced_units,
    total_resources,
)
from zerostack.workloads.types import REPLICATION_PORTS

MAX_NODES_LISTED = 5000
FINAL = ("deleted", "expired", "cancelled")


@dataclass
class Draft:
    """A solution before anything exists on the ledger: the plan, where each part copy
    goes, and the deployment for each node."""

    template: Template
    template_hash: str | None
    plan: Plan
    placed: Placed
    deployments: dict[int, Deployment] = field(default_factory=dict)
    parts_on: dict[int, list[str]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    networks: dict[str, tuple[str, dict[int, tuple[str, str]]]] = field(default_factory=dict)
    """Each user network: its range and, by node, (its /24, its public address or "")."""
    ports: dict[str, int] = field(default_factory=dict)
    """Each user network's WireGuard listen port (random, as `zerostack network add`)."""

    def summary(self) -> dict[str, Any]:
        nodes = []
        for nid, dep in sorted(self.deployments.items()):
            nodes.append({"node": nid, "parts": self.parts_on[nid],
                          "workloads": [f"{w.type}:{w.name}" for w in dep.workloads],
                          "resources": total_resources(dep.workloads).to_dict(),
                          "per_hour": sum(self.placed.hourly[k] for k in self.parts_on[nid])})
        req = next(iter(self.deployments.values())).requirement() if self.deployments else None
        return {"template": self.plan.template, "version": self.plan.version,
                "template_hash": self.template_hash, "parameters": self.plan.values,
                "derived": self.plan.derived, "nodes": nodes,
                "resources": self.plan.resources.to_dict(),
                "per_hour": self.placed.per_hour, "per_month": self.placed.per_month,
                "stakeholders": [] if req is None else req.to_dict()["requests"],
                "gateway_names": self.names}


def load_template(bot: ThreeBot, ref: str) -> tuple[Template, str]:
    """A published template by hash, or the latest one published under a name; its body
    is re-hashed here, so a ledger cannot swap it."""
    ledger = bot.ledger
    if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
        found = ledger.template(ref)
        if found is None:
            raise BotError(f"no template {ref} on the ledger")
    else:
        listed = ledger.templates(name=ref, limit=1000)
        if not listed:
            raise BotError(f"no template named {ref!r} on the ledger (see `zerostack template "
                           "list`)")
        found = max(listed, key=lambda t: (int(t["created"]), str(t["hash"])))
    if found["hash"] not in _payload_hashes(found):
        raise BotError(f"template {found['hash'][:16]}… does not hash to its id: the ledger "
                       "served a tampered template")
    if found["name"] != found["body"].get("name") or \
            found["version"] != found["body"].get("version"):
        raise BotError("the template's name or version differs from its body's")
    try:
        return from_data(found["body"]), str(found["hash"])
    except TemplateError as exc:
        raise BotError(f"template {found['name']}: {exc}") from exc


def _payload_hashes(found: Mapping[str, Any]) -> set[str]:
    """The ids the published payload may have: it is the hash of the payload as sent, in
    which a field at its default may have been left out."""
    full = {"name": found["name"], "version": found["version"],
            "description": found["description"], "body": found["body"],
            "author_share": found.get("author_share", 0)}
    defaults = {"version": "", "description": "", "author_share": 0}
    optional = [k for k, v in defaults.items() if full[k] == v]
    out = set()
    for mask in range(1 << len(optional)):
        payload = {k: v for k, v in full.items()
                   if not (k in optional and mask >> optional.index(k) & 1)}
        out.add(hash_hex(payload))
    return out


def _joins(part: Any, net_parts: tuple[str, ...]) -> bool:
    """Whether a part copy is on a network: its part is listed, or it is a gateway
    proxying to a part that is."""
    return part.part in net_parts or (part.gateway is not None
                                      and part.gateway.part in net_parts)


def _offers(bot: ThreeBot) -> tuple[list[NodeOffer], dict[int, Prices | None]]:
    views = bot.ledger.nodes(status="up", limit=MAX_NODES_LISTED)
    offers = [NodeOffer.of(v) for v in views]
    prices: dict[int, Prices | None] = {}
    if (bot.ledger.policy() or {}).get("policy"):
        by_farm: dict[int, Prices | None] = {}
        for o in offers:
            if o.farm not in by_farm:
                got = bot.ledger.node_prices(o.id) or {}
                by_farm[o.farm] = Prices.of(got["prices"]) if got.get("prices") else None
            prices[o.id] = by_farm[o.farm]
    return offers, prices


def _requirement(plan: Plan, owner: int, stakeholders: Mapping[str, int],
                 bot: ThreeBot) -> dict[str, Any]:
    roles = {s.role: s for s in plan.stakeholders}
    for role in stakeholders:
        if role not in roles:
            raise BotError(f"template {plan.template} has no stakeholder role {role!r} "
                           f"(roles: {', '.join(roles) or 'none'})")
    requests: list[dict[str, Any]] = [
        {"twin": owner, "key": bot.twin_key(owner), "weight": 1, "required": True}]
    for role, s in roles.items():
        twin = stakeholders.get(role)
        if twin is None:
            if s.required:
                raise BotError(f"stakeholder role {role!r} must approve: pass --stakeholder "
                               f"{role}=TWIN")
            continue
        if twin == owner:
            raise BotError(f"role {role!r}: the owner signs anyway; name another twin")
        if any(r["twin"] == twin for r in requests):
            raise BotError(f"twin {twin} is given two roles")
        requests.append({"twin": twin, "key": bot.twin_key(twin), "weight": s.weight,
                         "required": s.required})
    needed = sum(r["weight"] for r in requests if r["required"])
    return {"requests": requests, "weight_required": plan.weight_required
            if plan.weight_required is not None else needed}


def _container_ips(deps: dict[int, dict[str, Any]], net: str, subnet_of: dict[int, str],
                   hosts: dict[int, list[str]]) -> dict[str, str]:
    """Attach the part containers on each node to network `net`; their address by name."""
    out = {}
    for nid, names in hosts.items():
        base = ipaddress.IPv4Network(subnet_of[nid]).network_address
        n = 2
        for w in deps[nid]["workloads"]:
            if w.get("type") == "container" and w["name"] in names and not w.get("network"):
                ip = str(base + n)
                w["network"] = {"network": net, "ip": ip}
                out[w["name"]] = ip
                n += 1
    return out


@_as_bot_error
def draft(bot: ThreeBot, template: Template, params: Mapping[str, Any],
          stakeholders: Mapping[str, int] | None = None,
          template_hash: str | None = None) -> Draft:
    """Expand, place and build every deployment; nothing is sent to the ledger."""
    try:
        plan = expand(template, params)
        offers, prices = _offers(bot)
        placed = place(plan, offers, prices)
    except TemplateError as exc:
        raise BotError(str(exc)) from exc
    owner = bot.twin_id()
    req = _requirement(plan, owner, stakeholders or {}, bot)
    by_key = {p.key: p for p in plan.parts}
    deps: dict[int, dict[str, Any]] = {}
    parts_on: dict[int, list[str]] = {}
    for key, nid in placed.nodes.items():
        d = deps.setdefault(nid, {"workloads": []})
        parts_on.setdefault(nid, []).append(key)
        for w in by_key[key].workloads:
            if any(x["name"] == w.name for x in d["workloads"]):
                raise BotError(f"two parts put workload {w.name!r} on node {nid}: name "
                               "workloads with {{ index }} or keep the parts on distinct nodes")
            d["workloads"].append(w.model_dump(mode="json"))
    _replication(plan, placed, deps)
    endpoints = {o.id: "" for o in offers}
    for v in bot.ledger.nodes(status="up", limit=MAX_NODES_LISTED):
        endpoints[int(v["id"])] = str(v.get("endpoint") or "")
    addresses: dict[str, dict[str, str]] = {}
    layouts: dict[str, tuple[str, dict[int, tuple[str, str]]]] = {}
    ports: dict[str, int] = {}
    for net in plan.networks:
        members = sorted({nid for key, nid in placed.nodes.items()
                          if _joins(by_key[key], net.parts)})
        try:
            subnets = assign_subnets(net.ip_range, [], len(members))
            mesh = [MeshNode(nid, s, _host(endpoints.get(nid, ""))) for nid, s in
                    zip(members, subnets, strict=True)]
            keys = {nid: keypair()[0] for nid in members}
            ports[net.name] = secrets.choice(NETWORK_PORTS)
            wls = mesh_workloads(net.name, net.ip_range, mesh, keys, port=ports[net.name])
        except MeshError as exc:
            raise BotError(f"network {net.name}: {exc}") from exc
        for nid in members:
            deps[nid]["workloads"].append(wls[nid])
        layouts[net.name] = (net.ip_range, {m.node_id: (m.subnet, m.endpoint) for m in mesh})
        hosts = {nid: [w.name for k in parts_on[nid] for w in by_key[k].workloads
                       if by_key[k].part in net.parts and isinstance(w, ContainerWorkload)]
                 for nid in members}
        addresses[net.name] = _container_ips(deps, net.name,
                                             dict(zip(members, subnets, strict=True)), hosts)
    names = []
    for key, nid in placed.nodes.items():
        gw = by_key[key].gateway
        if gw is None:
            continue
        backends = [f"http://{ip}:{gw.port}" for net in plan.networks if gw.part in net.parts
                    for name, ip in addresses[net.name].items()
                    if any(name == w.name for p in plan.parts if p.part == gw.part
                           for w in p.workloads)]
        if not backends:
            raise BotError(f"gateway {gw.name}: part {gw.part!r} has no container on a network "
                           "of the template to proxy to")
        proxy = {"type": "gateway_name_proxy", "name": f"gw-{gw.name}"[:63],
                 "domain_name": gw.name, "backends": backends}
        via = [net.name for net in plan.networks if gw.part in net.parts]
        if via:  # the backends are on the user network the gateway node joins
            proxy["network"] = via[0]
        deps[nid]["workloads"].append(proxy)
        if gw.name not in names:
            names.append(gw.name)
    built = {}
    for nid, d in deps.items():
        data = {**d, "signature_requirement": req, "twin_id": owner, "version": 1,
                "nonce": secrets.token_hex(8),
                "metadata": f"solution:{plan.template}:{','.join(parts_on[nid])}"[:1024]}
        try:
            built[nid] = Deployment.parse(data)
        except WorkloadError as exc:
            raise BotError(f"node {nid}: {exc}") from exc
    return Draft(template, template_hash, plan, placed, built, parts_on, names, layouts, ports)


def _replication(plan: Plan, placed: Placed, deps: dict[int, dict[str, Any]]) -> None:
    """Fill in every replica namespace's primary (its node and port) and give each
    replicated namespace a port of its own and its set a fresh password, now that every
    part copy has a node. The password goes only into the deployments, which are sealed
    to their nodes."""
    primaries = {w.name: p.key for p in plan.parts for w in p.workloads
                 if isinstance(w, ZdbWorkload)}
    pairs: dict[str, list[tuple[int, str]]] = {}  # primary name: replicas (node, name)
    for p in plan.parts:
        for w in p.workloads:
            if isinstance(w, ZdbWorkload) and w.replica_of is not None:
                pairs.setdefault(w.replica_of.workload, []).append((placed.nodes[p.key], w.name))
    if not pairs:
        return
    ports = secrets.SystemRandom().sample(REPLICATION_PORTS, len(pairs)
                                          + sum(map(len, pairs.values())))

    def find(nid: int, name: str) -> dict[str, Any]:
        return next(w for w in deps[nid]["workloads"] if w["name"] == name)

    for primary, replicas in sorted(pairs.items()):
        pnode = placed.nodes[primaries[primary]]
        password = secrets.token_urlsafe(24)
        pport = ports.pop()
        find(pnode, primary)["replication"] = {"port": pport, "password": password}
        for rnode, name in replicas:
            if rnode == pnode:
                raise BotError(f"zdb {name!r} was placed on node {pnode} with its primary "
                               f"{primary!r}: a replica must be on another node")
            entry = find(rnode, name)
            entry["replication"] = {"port": ports.pop(), "password": password}
            entry["replica_of"] = {"workload": primary, "node": pnode, "port": pport}


def _host(endpoint: str) -> str:
    """The address part of a node's ledger endpoint ("" when it has none)."""
    if not endpoint:
        return ""
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ""
    return host


@_as_bot_error
def create(bot: ThreeBot, d: Draft, metadata: str = "") -> int:
    """Create one contract per node (no approvals yet), group them as a solution and
    approve it as the owner. A failure midway cancels what was created."""
    for name in d.names:
        held = bot.ledger.name(name)
        if held is None:
            bot.ledger.register_name(bot.identity, name)
        elif int(held["owner"]) != bot.twin_id():
            raise BotError(f"gateway name {name!r} belongs to twin {held['owner']}")
    created: list[int] = []
    try:
        for nid, dep in sorted(d.deployments.items()):
            stakeholders = [k for t, k in dep.keys().items() if t != dep.twin_id]
            units = priced_units(dep.workloads)
            cid = bot.ledger.create_contract(
                bot.identity, nid, dep.hash(), bot._seal(dep, nid, stakeholders),
                dep.requirement().to_dict(), approve=False, body_hash=dep.body_hash(),
                capacity=total_resources(dep.workloads).to_dict(),
                metadata=dep.metadata[:1024], template=d.template_hash,
                ipv4=units["ipv4"], names=units["names"])
            created.append(cid)
        meta = metadata or f"{d.plan.template} {d.plan.version}"
        sid = bot.ledger.create_solution(bot.identity, created, meta[:1024])
    except BaseException:
        for cid in created:
            try:
                bot.cancel(cid)
            except BotError:
                pass
        raise
    approve(bot, sid)
    return sid


@dataclass(frozen=True)
class SolutionReview:
    """What a stakeholder checked before signing: every part opened and re-hashed."""

    solution: int
    owner: int
    parts: list[tuple[int, int, int, str]]
    deployments: dict[int, Deployment]
    signed: frozenset[int]
    per_month: int = 0
    """What the solution costs per month: each part's capacity at the prices its contract
    was created with (what the ledger holds a budget cap against)."""


@_as_bot_error
def review(bot: ThreeBot, sid: int) -> SolutionReview:
    """Open every part sealed to this identity and recompute its hash: the approval then
    covers what this side read, never what the ledger says."""
    sol = bot.ledger.solution(sid)
    if sol is None:
        raise BotError(f"solution {sid} does not exist")
    me = bot.identity.public_hex
    req = SignatureRequirement.from_dict(sol["signature_requirement"])
    if me not in req.keys().values() and int(sol["owner"]) != bot.twin_id(register=False):
        raise BotError(f"you are not a stakeholder of solution {sid}")
    parts, deps = [], {}
    per_month = 0
    for p in sol["parts"]:
        cid = int(p["contract"])
        c = bot.contract(cid)
        billing = c.get("billing")
        if billing:
            per_month += monthly(billing["prices"], c["capacity"], int(billing["ipv4"]),
                                 int(billing["names"]))
        try:
            dep = open_instructions(bot.identity, c["instructions"]).deployment
        except WorkloadError as exc:
            raise BotError(f"cannot read part contract {cid} ({exc})") from exc
        h = dep.hash()
        if h != p["deployment_hash"] or h != c["deployment_hash"]:
            raise BotError(f"HASH MISMATCH on part contract {cid} of solution {sid}: refusing "
                           "to sign")
        if dep.twin_id != int(sol["owner"]) or int(c["node"]) != int(p["node"]):
            raise BotError(f"part contract {cid} does not match solution {sid}")
        bot._check_keys(dep)
        parts.append((cid, int(p["version"]), int(p["node"]), h))
        deps[cid] = dep
    return SolutionReview(sid, int(sol["owner"]), parts, deps,
                          frozenset(int(t) for t in sol.get("approvals") or {}), per_month)


@_as_bot_error
def approve(bot: ThreeBot, sid: int, max_cost: int | None = None) -> dict[str, Any]:
    """Review solution `sid` and sign it. With `max_cost` (per month, base units): refuse
    to sign when it costs more, and name the cap in the approval, so the ledger refuses
    it too and refuses a later version of a part that would take the solution over it."""
    r = review(bot, sid)
    if max_cost is not None and r.per_month > max_cost:
        raise BotError(f"solution {sid} costs {r.per_month} per month, over your "
                       f"--max-cost {max_cost}: not signed")
    return dict(bot.ledger.approve_solution(bot.identity, sid, r.parts,
                                            max_cost=max_cost)["receipt"])


@_as_bot_error
def status(bot: ThreeBot, sid: int) -> dict[str, Any]:
    """The solution, each part's contract state and report, and who still has to sign."""
    sol = bot.ledger.solution(sid)
    if sol is None:
        raise BotError(f"solution {sid} does not exist")
    req = SignatureRequirement.from_dict(sol["signature_requirement"])
    signed = {int(t) for t in sol.get("approvals") or {}}
    parts = []
    for p in sol["parts"]:
        c = bot.contract(int(p["contract"]))
        report = c.get("report") or {}
        parts.append({"contract": c["id"], "node": c["node"], "state": c["state"],
                      "error": report.get("error", ""),
                      "workloads": [{k: w.get(k) for k in ("name", "type", "state", "message",
                                                           "data")}
                                    for w in report.get("workloads") or []]})
    return {"id": sid, "owner": sol["owner"], "metadata": sol["metadata"],
            "approved_by": sorted(signed),
            "waiting_for": [r.twin for r in req.requests if r.twin not in signed
                            and r.required],
            "parts": parts}


@_as_bot_error
def cancel(bot: ThreeBot, sid: int) -> list[int]:
    """Cancel every live part; returns the contracts voted on."""
    sol = bot.ledger.solution(sid)
    if sol is None:
        raise BotError(f"solution {sid} does not exist")
    done = []
    for p in sol["parts"]:
        c = bot.contract(int(p["contract"]))
        if c["state"] in FINAL or bot.twin_id() in {int(t) for t in c.get("cancel_votes") or {}}:
            continue
        bot.cancel(int(c["id"]))
        done.append(int(c["id"]))
    return done


@_as_bot_error
def retry(bot: ThreeBot, sid: int, contract: int) -> int:
    """Move part `contract` of solution `sid` to another node that fits it: the failed
    contract is cancelled, the same workloads go into a new contract elsewhere, grouped
    as a new solution of one part that the stakeholders approve; the rest is untouched."""
    sol = bot.ledger.solution(sid)
    if sol is None or contract not in {int(p["contract"]) for p in sol["parts"]}:
        raise BotError(f"contract {contract} is not a part of solution {sid}")
    c = bot.contract(contract)
    try:
        old = open_instructions(bot.identity, c["instructions"]).deployment
    except WorkloadError as exc:
        raise BotError(f"cannot read part contract {contract}: {exc}") from exc
    if any(w.type == "network" for w in old.workloads):
        raise BotError("a part on a user network cannot move alone yet: cancel the solution "
                       "and deploy again")
    if any(isinstance(w, ZdbWorkload) and w.replication is not None and w.replica_of is None
           for w in old.workloads):
        raise BotError("a part holding a namespace that replicas follow cannot move alone "
                       "yet: cancel the solution and deploy again")
    need = total_resources(old.workloads)
    used = {int(p["node"]) for p in sol["parts"]}
    cands = [n for n in bot.ledger.nodes(status="up", free_cru=need.cru, free_mru=need.mru,
                                         free_sru=need.sru, free_hru=need.hru,
                                         limit=MAX_NODES_LISTED)
             if int(n["id"]) not in used]
    if not cands:
        raise BotError(f"no other node that is up has room for part contract {contract}")
    if c["state"] not in FINAL:
        bot.cancel(contract)
    data = old.model_dump(mode="json")
    data.update(nonce=secrets.token_hex(8), contract_id=0)
    dep = Deployment.parse(data)
    nid = int(cands[0]["id"])
    stakeholders = [k for t, k in dep.keys().items() if t != dep.twin_id]
    units = priced_units(dep.workloads)
    cid = bot.ledger.create_contract(
        bot.identity, nid, dep.hash(), bot._seal(dep, nid, stakeholders),
        dep.requirement().to_dict(), approve=False, body_hash=dep.body_hash(),
        capacity=need.to_dict(), metadata=dep.metadata[:1024],
        ipv4=units["ipv4"], names=units["names"])
    new = bot.ledger.create_solution(bot.identity, [cid],
                                     f"retry of contract {contract} of solution {sid}")
    approve(bot, new)
    return new


@_as_bot_error
def publish(bot: ThreeBot, template: Template) -> str:
    """Publish `template` signed by this identity (its author); returns its content hash.
    Publishing the same content twice is refused by the ledger: a new version is a new
    template."""
    bot.twin_id()
    return bot.ledger.publish_template(bot.identity, template.spec.name, template.body,
                                       version=template.spec.version,
                                       description=template.spec.description[:1024])


def _jobs(bot: ThreeBot, sid: int) -> dict[int, set[str]]:
    """The run-to-completion containers (restart: never) of each part, by contract, read
    from the deployments sealed to this owner."""
    sol = bot.ledger.solution(sid)
    if sol is None:
        raise BotError(f"solution {sid} does not exist")
    out: dict[int, set[str]] = {}
    for p in sol["parts"]:
        c = bot.contract(int(p["contract"]))
        try:
            dep = open_instructions(bot.identity, c["instructions"]).deployment
        except WorkloadError as exc:
            raise BotError(f"cannot read part contract {c['id']}: {exc}") from exc
        out[int(c["id"])] = {w.name for w in dep.workloads
                             if isinstance(w, ContainerWorkload) and w.restart == "never"}
    return out


def job_results(st: Mapping[str, Any], jobs: Mapping[int, set[str]]) -> dict[str, str] | None:
    """Each job's final message once every one has ended ("exited with 0", or the node's
    reason), else None. A part in error ends its jobs too."""
    results = {}
    for p in st["parts"]:
        names = jobs.get(int(p["contract"]), set())
        reported = {w["name"]: w for w in p["workloads"]}
        for name in names:
            w = reported.get(name)
            if p["state"] == "error":
                results[name] = (w or {}).get("message") or p["error"] or "part failed"
            elif w is None or not (w["state"] == "error" or "exited" in w.get("message", "")):
                return None
            else:
                results[name] = str(w.get("message", ""))
    return results


@_as_bot_error
def wait_jobs(bot: ThreeBot, sid: int, timeout: float, release: bool) -> dict[str, str]:
    """Wait until every run-to-completion container of the solution has ended; with
    `release`, then cancel every part so the nodes free what it held."""
    import time as _time

    jobs = _jobs(bot, sid)
    if not any(jobs.values()):
        raise BotError(f"solution {sid} has no run-to-completion container (restart: never)")
    deadline = _time.monotonic() + timeout
    while True:
        results = job_results(status(bot, sid), jobs)
        if results is not None:
            break
        if _time.monotonic() > deadline:
            raise BotError(f"the jobs of solution {sid} are still running after {timeout:.0f}s")
        _time.sleep(0.5)
    if release:
        cancel(bot, sid)
    return results
