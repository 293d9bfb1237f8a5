"""The node agent: registers the node, follows its contracts on the ledger, verifies them
itself, reconciles the machine against them, and reports back, signed.

Level-triggered: events only say "look at contract N now"; a periodic pass looks at all
of them again (and checks workloads still exist), so nothing depends on seeing an event.
Its data dir is 0700 and its key and state 0600: no other host user reads any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerostack.crypto import Identity, KeyChanged, KeyPins, hash_hex, load_identity, save_identity
from zerostack.ledger.client import consumption_payload
from zerostack.ledger.errors import LedgerError, LedgerRejected
from zerostack.ledger.pin import PIN_FILE, HeaderPin
from zerostack.node.billing import TrafficMeter, check_notice
from zerostack.node.capacity import node_capacity, system_reserve
from zerostack.node.engine import (
    Desired,
    Executor,
    Outcome,
    missing_provisioners,
    observe,
    plan,
)
from zerostack.node.hostfs import private_dir, restrict
from zerostack.node.link import LedgerLink
from zerostack.node.network import vxlan
from zerostack.node.provisioners import (
    NodeContext,
    Pool,
    Provisioner,
    ProvisionError,
    WorkloadID,
    build_provisioners,
)
from zerostack.node.provisioners.container import ContainerProvisioner
from zerostack.node.state import ContractRecord, NodeState
from zerostack.node.status import StatusServer
from zerostack.node.zdbd import ZdbServer, connect_address, endpoint_address
from zerostack.workloads import (
    Deployment,
    GatewayNameProxyWorkload,
    Resources,
    WorkloadError,
    ZdbWorkload,
    diff,
    open_instructions,
    reserved_units,
    total_resources,
    workload_hash,
)

log = logging.getLogger("zerostack.node.agent")

LIVE = ("approved", "deployed", "error")


@dataclass
class AgentConfig:
    """Everything `zerostack node run` configures."""

    ledger_url: str
    farm: int
    data_dir: Path
    zdb_port: int = 9900
    zdb_listen: str = "127.0.0.1"
    pools: list[Pool] = field(default_factory=list)
    cpu: int | None = None
    memory: int | None = None
    country: str = "BE"
    city: str = ""
    # The node's public address ('' for a node nothing can dial, e.g. behind NAT: it
    # reports its workloads at its zdb_listen address, reachable from its own LAN only).
    endpoint: str = "127.0.0.1"
    status_port: int | None = None
    status_listen: str = "127.0.0.1"
    heartbeat: float = 10.0
    resync: float = 10.0
    dry: bool = False
    # Settings for provisioners beyond storage (e.g. "hub", "flist_publishers").
    extra: dict[str, Any] = field(default_factory=dict)
    # The ledger operator's public key (hex); unset: learnt on first contact and pinned.
    ledger_key: str | None = None


class Refused(Exception):
    """A contract version this node will not run, with the reason it reports."""


@dataclass
class ContractView:
    """What the agent decided about one contract in one pass."""

    cid: int
    version: int
    owner_key: str
    deployment: Deployment | None  # the verified deployment to run (None: run nothing)
    cancelled: bool = False  # removal authorised by cancel votes this node checked
    final: bool = False  # the ledger no longer takes reports: report nothing
    error: str = ""
    ledger_report: dict[str, Any] | None = None
    live: dict[str, tuple[str, str]] = field(default_factory=dict)
    paused: bool = False  # in grace, on a billing notice this node checked: pause it


def default_pools(data_dir: Path) -> list[Pool]:
    """Without --pool a node keeps an SSD and an HDD pool in its data dir (same disk)."""
    return [Pool("ssd", data_dir / "pools" / "ssd", "ssd"),
            Pool("hdd", data_dir / "pools" / "hdd", "hdd")]


def load_or_create_identity(data_dir: Path) -> Identity:
    path = data_dir / "identity.key"
    if path.exists():
        restrict(path)
        return load_identity(path)
    ident = Identity.generate()
    save_identity(ident, path, "node")
    log.info("event=identity_created public=%s", ident.public_hex)
    return ident


class NodeAgent:
    """One node. `run()` until cancelled; every change to the machine goes through plan()."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        # Created 0700, or made so: a node upgraded from a version that left it open.
        # (The operator may have made the data dir itself a link: that one is followed.)
        private_dir(cfg.data_dir.resolve())
        for name in ("zdb.log", "zdb.pid"):
            restrict(cfg.data_dir / name)
        self.pools = cfg.pools or default_pools(cfg.data_dir)
        self.identity = load_or_create_identity(cfg.data_dir)
        self.state = NodeState(cfg.data_dir / "state.db")
        # keys of the twins whose deployments this node ran: never taken from a server
        self.pins = KeyPins(cfg.data_dir / "pins.json")
        self.capacity = node_capacity(self.pools, cfg.cpu, cfg.memory)
        self.reserve = system_reserve(self.capacity)
        self.zdb: ZdbServer | None = None
        self.link = LedgerLink(cfg.ledger_url, self.identity,
                               HeaderPin(cfg.data_dir / PIN_FILE, cfg.ledger_key))
        zdb_host = connect_address(cfg.zdb_listen)
        self.context = NodeContext(cfg.data_dir, self.identity, self.pools,
                                   cfg.endpoint or zdb_host, zdb_host, cfg.zdb_port,
                                   extra={**cfg.extra, "zdb_listen": cfg.zdb_listen})
        self.provisioners: dict[str, Provisioner] = {}
        self.executor: Executor | None = None
        self.node_id = 0
        self.started = time.time()
        self._lock = asyncio.Lock()
        self._pending: set[int] = set()
        self._wake = asyncio.Event()
        self._status: StatusServer | None = None
        self._resources: dict[tuple[int, str], Resources] = {}  # (contract, hash) -> need
        # bytes in/out per contract not reported yet, and what the agent knows of each
        # contract's pause (absent: unknown, e.g. after a restart: resumed if not in grace)
        self.meter = TrafficMeter(cfg.data_dir / "traffic.json")
        self._paused: dict[int, bool] = {}

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        for pool in self.pools:
            pool.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        restrict(self.cfg.data_dir / "pools")
        if not self.cfg.dry:
            self.zdb = ZdbServer(self.cfg.data_dir, self.pools, self.cfg.zdb_port,
                                 self.cfg.zdb_listen)
            self.context.zdb_admin = self.zdb.admin
            await self.zdb.spawn()
        self.provisioners = build_provisioners(self.context, dry=self.cfg.dry)
        self.executor = Executor(self.provisioners, self.state)
        while True:
            try:
                self.node_id = await self.register()
                self.context.extra["node_id"] = self.node_id
                break
            except LedgerRejected:
                raise
            except LedgerError as exc:  # not up yet: a node waits for its ledger
                log.warning("event=register_failed retry_in=1s error=%r", str(exc))
                await asyncio.sleep(1)
        if self.zdb is not None:
            await self.zdb.ready()
        if self.cfg.status_port:
            self._status = StatusServer(self.snapshot, self.cfg.status_port,
                                        self.cfg.status_listen, logs=self.logs_query)
            await self._status.start()
        log.info("event=node_ready node=%s twin=%s capacity=%s", self.node_id,
                 self.link.twin_id, self.capacity.to_dict())

    async def stop(self) -> None:
        if self._status is not None:
            await self._status.stop()
        for prov in {id(p): p for p in self.provisioners.values()}.values():
            prov.close()
        await self.link.close()
        if self.zdb is not None:
            await self.zdb.stop()
        self.state.close()

    async def run(self) -> None:
        try:
            await self.start()
            try:
                await self.reconcile_all()  # after a restart: converge before anything else
            except LedgerError as exc:
                log.warning("event=resync_failed error=%r", str(exc))
            await asyncio.gather(self._follow(), self._worker(), self._heartbeats(),
                                 self._resyncs())
        finally:
            await self.stop()

    async def register(self) -> int:
        """Register the node's twin and the node itself; on later starts, update the
        ledger only if the capacity, farm, location or endpoint changed."""
        await self.link.ensure_twin(self.cfg.endpoint)
        fields = {
            "farm": self.cfg.farm,
            "capacity": self.capacity.to_dict(),
            "location": {"country": self.cfg.country, "city": self.cfg.city},
            "endpoint": self.cfg.endpoint,
        }
        node = await self.link.node_of_twin()
        if node is None:
            receipt = await self.link.submit("node.register", fields)
            return int(receipt["node"])
        if {k: node.get(k) for k in fields} != fields:
            await self.link.submit("node.update", fields)
            log.info("event=node_updated node=%s", node["id"])
        return int(node["id"])

    # ---- loops ----------------------------------------------------------------------

    async def _follow(self) -> None:
        """Long-poll the ledger's events; queue the contracts on this node they touch."""
        cursor: int | str = await self.link.height()
        while True:
            try:
                cursor, contracts = await self.link.node_events(self.node_id, cursor)
            except LedgerError as exc:
                log.warning("event=follow_failed error=%r", str(exc))
                await asyncio.sleep(1)
                if exc.code == "bad_cursor":
                    # the ledger no longer has our position: follow on from its head; the
                    # periodic full pass looks at every contract anyway
                    with contextlib.suppress(LedgerError):
                        cursor = await self.link.height()
                continue
            if contracts:
                self._pending |= contracts
                self._wake.set()

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, set()
            try:
                await self.reconcile(batch)
            except LedgerError as exc:
                log.warning("event=reconcile_failed error=%r", str(exc))
                self._pending |= batch
                await asyncio.sleep(1)
                self._wake.set()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            try:
                await self.link.submit("node.heartbeat", {
                    "used": self._used().to_dict(),
                    "uptime": int(time.time() - self.started)})
            except LedgerError as exc:
                log.warning("event=heartbeat_failed error=%r", str(exc))

    async def _resyncs(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.resync)
            try:
                await self.reconcile_all()
            except LedgerError as exc:
                log.warning("event=resync_failed error=%r", str(exc))

    # ---- reconciliation -------------------------------------------------------------

    async def reconcile_all(self) -> None:
        """Every contract the ledger gives this node, plus any the node still runs."""
        await self.reconcile(set(), everything=True)

    async def reconcile(self, contract_ids: set[int], everything: bool = False) -> None:
        async with self._lock:
            # nothing is done for a ledger that rolled back or forked since the last pass
            await self.link.check_ledger()
            await self._gateway_facts()
            # Listed under the lock: a pass must never act on a view older than the last one.
            listed: dict[int, dict[str, Any]] = {}
            if everything:
                listed = {int(c["id"]): c for c in await self.link.node_contracts(self.node_id)}
                contract_ids = (set(contract_ids) | set(listed)
                                | {w.wid.contract for w in self.state.workloads()})
            reports = []
            for cid in sorted(contract_ids):
                contract = listed[cid] if cid in listed else await self.link.contract(cid)
                if contract is not None and int(contract["node"]) != self.node_id:
                    continue
                try:
                    view = await self._view(cid, contract)
                    if view is None:
                        continue
                    await self._name_owners(view)
                    await self._primaries(view)
                    if contract is not None:  # the pool addresses the ledger gave it
                        self.context.extra.setdefault("contract_ips", {})[cid] = [
                            str(a) for a in contract.get("public_ips") or []][:64]
                    await asyncio.to_thread(self._converge, view)
                    report = self._report(view)
                except LedgerError:
                    raise
                except Exception:
                    # A bug met by one contract must not stop the node serving the others.
                    log.exception("event=contract_failed contract=%s", cid)
                    continue
                if report is not None:
                    reports.append((cid, report))
            if reports:
                errors = await self.link.submit_many("contract.report",
                                                     [r for _, r in reports])
                # A rejected report (often: a nonce after an earlier rejection in the same
                # batch) stays unreported, so the next pass sends it again.
                for (cid, r), err in zip(reports, errors, strict=True):
                    if not err:
                        self.state.set_reported(cid, hash_hex(r))
            if everything:
                await self._consumption(listed)

    async def _gateway_facts(self) -> None:
        """The node's gateway record (its farmer's node.gateway), for gateway workloads."""
        if self.cfg.dry or self.node_id == 0:
            return
        node = await self.link.client.node(self.node_id)
        gateway = (node or {}).get("gateway")
        self.context.extra["gateway"] = gateway
        self.context.extra["farm"] = self.cfg.farm
        peers: list[dict[str, Any]] = []
        if gateway:  # the farm's other gateways: what the grid DNS checks and answers
            farm = await self.link.client.nodes(farm=self.cfg.farm, limit=1000)
            peers = [{"node": n["id"], **n["gateway"]} for n in farm
                     if n.get("gateway") and n["id"] != self.node_id][:16]
            self.context.extra["gateway_peers"] = peers
        if not gateway:
            self.context.extra["farm_pool"] = []
            await asyncio.to_thread(self._segment, None, [], [])
            return
        # a gateway: the farm's public pool, where its addresses route (public_ip) and
        # what the VXLAN segment between the farm's gateways carries
        try:
            pool = await self.link.client.farm_pool(self.cfg.farm)
        except LedgerError as exc:
            # the segment waits for a pool it could read (a guess could move the WAN link)
            log.warning("event=farm_pool_unread farm=%s error=%r", self.cfg.farm, str(exc))
            return
        self.context.extra["farm_pool"] = [p for p in pool if isinstance(p, dict)][:1024]
        await asyncio.to_thread(self._segment, gateway, peers,
                                self.context.extra["farm_pool"])

    def _segment(self, gateway: dict[str, Any] | None, peers: list[dict[str, Any]],
                 pool: list[dict[str, Any]]) -> None:
        """Runs in a worker thread: the node's part of its farm's VXLAN segment, from the
        ledger facts just read (made, changed or removed)."""
        try:
            vxlan.converge(self.cfg.farm, self.node_id, gateway, peers, pool)
        except ProvisionError as exc:
            log.warning("event=segment_failed farm=%s error=%r", self.cfg.farm, str(exc))

    async def _name_owners(self, view: ContractView) -> None:
        """Who owns each gateway name the contract proxies, asked at every pass: a name
        that changed hands loses its route."""
        if view.deployment is None or self.cfg.dry:
            return
        owners: dict[str, int | None] = self.context.extra.setdefault("name_owners", {})
        for w in view.deployment.workloads:
            if isinstance(w, GatewayNameProxyWorkload):
                entry = await self.link.client.name(w.domain_name)
                owners[w.domain_name] = int(entry["owner"]) if entry else None

    async def _primaries(self, view: ContractView) -> None:
        """The registered address of every node holding a primary namespace that one of
        the contract's replicas follows, asked at every pass (a node may move)."""
        if view.deployment is None or self.cfg.dry:
            return
        found: dict[int, str] = self.context.extra.setdefault("zdb_primaries", {})
        for w in view.deployment.workloads:
            if isinstance(w, ZdbWorkload) and w.replica_of is not None and w.replica_of.node:
                node = await self.link.client.node(w.replica_of.node)
                found[w.replica_of.node] = endpoint_address(str((node or {}).get("endpoint")
                                                                or ""))

    async def _view(self, cid: int, c: dict[str, Any] | None) -> ContractView | None:
        local = self.state.contract(cid)
        running = (Deployment.parse(local.deployment)
                   if local and local.status == "active" and local.deployment else None)
        owner_key = running.owner_key if running else (local.owner_key if local else "")
        if c is None or c["state"] in ("deleted", "expired", "cancelled") \
                or c.get("active") is None:
            ended = (c is not None and c["state"] == "cancelled" and running is not None
                     and await self._standing(cid) == "ended")
            return self._ending(cid, c, local, running, owner_key, ended)
        active = c["active"]
        view = ContractView(cid, int(active["version"]), owner_key, None,
                            ledger_report=c.get("report"))
        if c["state"] == "grace":
            # Paused on the governing key's signed notice only; otherwise it keeps running.
            # It runs the version it verified: one approved during grace waits for the end.
            if running is None:
                return None
            view.deployment = running
            view.paused = await self._standing(cid) == "grace"
            return view
        if c["state"] not in LIVE:
            return None
        h = active["deployment_hash"]
        if local is not None and local.hash == h and local.status == "active":
            view.deployment = running
            return view
        # A refusal is remembered for exactly what was judged: if the approvals or the
        # instructions the node sees change (a real approval after a forged one), judge again.
        attempt = hash_hex({"hash": h, "instructions": active.get("instructions", ""),
                            "approvals": active.get("approvals") or {}})
        if local is not None and local.refused == attempt:
            view.deployment, view.error = running, local.message
            return view
        try:
            parts = await self._solution_parts(active)
            dep = self._verify(cid, c, active, running, parts)
        except Refused as exc:
            msg = str(exc)
            log.warning("event=contract_refused contract=%s version=%s reason=%r",
                        cid, active["version"], msg)
            self.state.put_contract(ContractRecord(
                cid, local.version if local else 0, local.hash if local else "",
                local.deployment if local else {}, owner_key,
                local.status if local else "refused", msg, "", attempt))
            view.deployment, view.error = running, msg
            return view
        for twin, key in dep.keys().items():
            self.pins.pin("twin", twin, key)
        self.state.record_run(h, cid)
        self.state.put_contract(ContractRecord(
            cid, int(active["version"]), h, dep.to_dict(), dep.owner_key, "active", "", "", ""))
        view.deployment, view.owner_key = dep, dep.owner_key
        return view

    async def _standing(self, cid: int) -> str | None:
        """Where contract `cid` stands with its payments, from a billing notice checked
        against the pinned operator key and head (see `node.billing`); None when there is
        no notice this node can trust (it then pauses and removes nothing)."""
        pin = self.link.pin
        if pin is None:
            return None
        try:
            notice = await self.link.client.billing_notice(cid)
            return check_notice(notice, pin.key, cid, self.node_id, pin.height, pin.hash)
        except LedgerError as exc:
            log.warning("event=billing_notice_refused contract=%s reason=%r", cid, str(exc))
            return None

    def _ending(self, cid: int, c: dict[str, Any] | None, local: ContractRecord | None,
                running: Deployment | None, owner_key: str,
                ended: bool = False) -> ContractView | None:
        """The ledger says the contract is cancelled, deleted, expired or gone. The node
        removes what it runs only on cancel votes it verified itself against the delete
        requirement of the deployment it runs, or on a billing notice it verified saying
        the contract's grace period ended unpaid (`ended`); any other say-so is an
        anomaly, and the workloads keep running."""
        state = "missing" if c is None else str(c["state"])
        active = (c or {}).get("active") or {}
        version = int(active.get("version") or (local.version if local else 0))
        report = (c or {}).get("report")
        if running is None:
            if state != "cancelled":
                return None
            # removed already (or nothing ever ran here): the ledger waits for the report
            # that says so
            removed = (Deployment.parse(local.deployment)
                       if local and local.status == "cancelled" and local.deployment else None)
            return ContractView(cid, version, owner_key, removed, cancelled=True,
                                ledger_report=report)
        votes = {int(t): str(v) for t, v in ((c or {}).get("cancel_votes") or {}).items()}
        try:
            if ended:
                log.warning("event=contract_ended_unpaid contract=%s action=remove", cid)
                self._paused.pop(cid, None)
            else:
                running.cancel_votes(votes, contract=cid, node=self.node_id)
        except WorkloadError as exc:
            why = (f"anomaly: the ledger says contract {cid} is {state}, without cancel votes "
                   f"that meet its delete requirement ({exc}); its workloads keep running")
            if local is not None and local.message != why:
                log.warning("event=contract_anomaly contract=%s ledger_state=%s reason=%r",
                            cid, state, str(exc))
                self.state.put_contract(ContractRecord(
                    local.id, local.version, local.hash, local.deployment, local.owner_key,
                    local.status, why, local.reported, local.refused))
            return ContractView(cid, version, owner_key, running, final=True, error=why)
        # the ledger takes a report only while the contract is cancelled
        return ContractView(cid, version, owner_key, running, cancelled=True,
                            final=state != "cancelled", ledger_report=report)

    async def _solution_parts(self, active: dict[str, Any]) -> list[tuple[int, int, int, str]]:
        """The parts of the solution whose approvals `active` carries ([] for none). What
        the ledger says is only an input: the signatures must cover exactly these parts."""
        sid = int(active.get("solution") or 0)
        if not sid:
            return []
        sol = await self.link.solution(sid)
        if sol is None:
            raise Refused(f"solution {sid} is not on the ledger")
        try:
            return [(int(p["contract"]), int(p["version"]), int(p["node"]),
                     str(p["deployment_hash"])) for p in sol["parts"][:64]]
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused(f"solution {sid} is malformed: {exc}") from exc

    def _verify(self, cid: int, c: dict[str, Any], active: dict[str, Any],
                previous: Deployment | None,
                solution_parts: list[tuple[int, int, int, str]] | None = None) -> Deployment:
        """Trust no server: open, parse, hash, the owner's signature, every key against the
        pinned ones, approvals against the keys the deployment names, update rules,
        capacity."""
        try:
            opened = open_instructions(self.identity, active["instructions"])
        except WorkloadError as exc:
            raise Refused(str(exc)) from exc
        dep = opened.deployment
        got, want = dep.hash(), active["deployment_hash"]
        if got != want:
            raise Refused(f"deployment hash mismatch: the contract says {want[:16]}…, "
                          f"the instructions hash to {got[:16]}…")
        if dep.twin_id != int(c["owner"]):
            raise Refused(f"deployment owner twin {dep.twin_id} is not the contract owner "
                          f"twin {c['owner']}")
        if dep.contract_id not in (0, cid):
            raise Refused(f"deployment is for contract {dep.contract_id}, not {cid}")
        ran = self.state.ran_as(want)
        if ran is not None and ran != cid:
            raise Refused(f"this signed deployment already ran here as contract {ran}: "
                          "a deployment runs under one contract only")
        for twin, key in dep.keys().items():
            try:
                self.pins.check("twin", twin, key)
            except KeyChanged as exc:
                raise Refused(str(exc)) from exc
        approvals = {int(k): str(v) for k, v in (active.get("approvals") or {}).items()}
        keys = dep.keys()
        if previous is not None:
            keys = {**previous.keys(), **keys}
        try:
            if previous is not None:
                diff(previous, dep)
            sid = int(active.get("solution") or 0)
            if sid:
                if previous is not None:
                    raise Refused("a solution approves first versions only")
                signed = dep.verify_solution_signatures(
                    approvals, solution=sid, parts=solution_parts or [], contract=cid,
                    version=int(active["version"]), node=self.node_id)
            else:
                signed = dep.verify_signatures(approvals, keys, contract=cid,
                                               version=int(active["version"]),
                                               node=self.node_id)
            if previous is not None:
                why = previous.requirement().missing(signed)
                if why is not None:
                    raise Refused(f"update lacks the current stakeholders' consent: {why}")
        except WorkloadError as exc:
            raise Refused(str(exc)) from exc
        self._refuse_unprovisionable(dep)
        need = total_resources(dep.workloads)
        free = self.capacity - self.reserve - self._used(exclude=cid)
        why = need.fits_in(free)
        if why is not None:
            raise Refused(f"over capacity: {why} (after the system reserve)")
        return dep

    def _refuse_unprovisionable(self, dep: Deployment) -> None:
        """A type this node cannot run is refused before anything is provisioned or
        reserved: accepted, it would fail, hold its capacity and block its own removal."""
        why = dep.replication_problem(self.node_id)
        if why is not None:
            raise Refused(why)
        missing = missing_provisioners(dep.workloads, self.provisioners)
        if missing:
            kind = "type" if len(missing) == 1 else "types"
            raise Refused(f"node {self.node_id} has no provisioner for workload {kind} "
                          f"{', '.join(missing)}")

    def _used(self, exclude: int | None = None) -> Resources:
        used = Resources()
        for rec in self.state.contracts():
            if rec.status == "active" and rec.id != exclude and rec.deployment:
                key = (rec.id, rec.hash)
                if key not in self._resources:
                    self._resources[key] = total_resources(
                        Deployment.parse(rec.deployment).workloads)
                used = used + self._resources[key]
        return used

    def _converge(self, view: ContractView) -> list[Outcome]:
        """Runs in a worker thread: observe, plan, execute for one contract."""
        assert self.executor is not None
        desired: dict[WorkloadID, Desired] = {}
        if view.deployment is not None and not view.cancelled:
            for w in view.deployment.workloads:
                wid = WorkloadID(view.cid, w.name)
                desired[wid] = Desired(wid, w, workload_hash(w), view.deployment, view.owner_key)
        actual = observe(self.state.workloads(view.cid), self.provisioners)
        actions = plan(desired, actual)
        outcomes = self.executor.execute(actions)
        self._pause_or_resume(view, desired)
        for wrec in self.state.workloads(view.cid):
            prov = self.provisioners.get(wrec.type)
            d = desired.get(wrec.wid)
            if wrec.wid.name in view.live:
                continue  # paused: what `_pause_or_resume` said
            if wrec.state == "ok" and prov is not None and d is not None:
                try:
                    live = prov.live_state(wrec.wid, d.spec)
                except ProvisionError as exc:
                    live = ("error", str(exc))
                if live is not None:
                    view.live[wrec.wid.name] = live
        if view.cancelled and not self.state.workloads(view.cid):
            rec = self.state.contract(view.cid)
            if rec is not None and rec.status == "active":
                self.state.put_contract(ContractRecord(
                    rec.id, rec.version, rec.hash, rec.deployment, rec.owner_key,
                    "cancelled", rec.message, rec.reported, rec.refused))
                self.meter.forget(view.cid)
        return outcomes

    def _pause_or_resume(self, view: ContractView, desired: dict[WorkloadID, Desired]) -> None:
        """Pause the contract's workloads while it is in grace (on a checked notice), and
        resume them as soon as it is not: every pass, so a restarted Zero-DB or agent
        converges too. Resuming is only done when the contract may be paused."""
        if view.cancelled or view.deployment is None:
            return
        if not view.paused and self._paused.get(view.cid) is False:
            return
        for wrec in self.state.workloads(view.cid):
            prov = self.provisioners.get(wrec.type)
            d = desired.get(wrec.wid)
            if prov is None or d is None or wrec.state != "ok":
                continue
            try:
                if view.paused:
                    note = prov.pause(wrec.wid, d.spec)
                    if note is not None:
                        view.live[wrec.wid.name] = ("paused", note)
                else:
                    prov.resume(wrec.wid, d.spec)
            except ProvisionError as exc:
                log.warning("event=pause_failed contract=%s workload=%s paused=%s error=%r",
                            view.cid, wrec.wid.name, view.paused, str(exc))
                view.live[wrec.wid.name] = ("error", str(exc))
                return  # the next pass tries again
        if self._paused.get(view.cid, False) != view.paused:
            log.info("event=contract_%s contract=%s", "paused" if view.paused else "resumed",
                     view.cid)
        self._paused[view.cid] = view.paused

    # ---- consumption reports ----------------------------------------------------------

    def _traffic(self, cid: int, dep: Deployment) -> None:
        """Runs in a worker thread: add what the contract's interfaces counted."""
        counters: dict[str, tuple[int, int]] = {}
        for w in dep.workloads:
            prov = self.provisioners.get(w.type)
            if prov is None:
                continue
            try:
                got = prov.traffic(WorkloadID(cid, w.name), w)
            except ProvisionError as exc:
                log.warning("event=traffic_unread contract=%s workload=%s error=%r",
                            cid, w.name, str(exc))
                continue
            for key, value in (got or {}).items():
                counters[f"{w.name}/{key}"] = value
        if counters:
            self.meter.sample(cid, counters)

    async def _consumption(self, listed: dict[int, dict[str, Any]]) -> None:
        """Count each billed contract's traffic, and for each whose last billing period
        ended (by this node's clock: the ledger refuses a period its own clock has not
        ended, and the next pass sends it again) without a report, send one, signed."""
        try:
            policy = (await self.link.client.policy()).get("policy")
        except LedgerError as exc:
            log.warning("event=policy_unread error=%r", str(exc))
            return
        if not policy:
            return  # nothing is priced on this grid
        period, max_traffic = int(policy["period"]), int(policy["max_traffic"])
        k = int(time.time()) // period - 1
        payloads: list[dict[str, Any]] = []
        for cid, c in sorted(listed.items()):
            b = c.get("billing")
            rec = self.state.contract(cid)
            if (b is None or c["state"] not in (*LIVE, "grace") or rec is None
                    or rec.status != "active" or not rec.deployment):
                continue
            dep = Deployment.parse(rec.deployment)
            await asyncio.to_thread(self._traffic, cid, dep)
            if k < 0 or k <= int(b.get("last_period", -1)) or (k + 1) * period <= int(c["created"]):
                continue
            payloads.append(self._consumption_report(cid, k, dep, c, max_traffic))
        if not payloads:
            return
        errors = await self.link.submit_many("contract.consumption", payloads)
        for p, err in zip(payloads, errors, strict=True):
            if not err:
                self.meter.reported(p["contract"], p["traffic_in"], p["traffic_out"])
                log.info("event=consumption_reported contract=%s period=%s in=%s out=%s",
                         p["contract"], p["period"], p["traffic_in"], p["traffic_out"])

    def _consumption_report(self, cid: int, period: int, dep: Deployment, c: dict[str, Any],
                            max_traffic: int) -> dict[str, Any]:
        """What the node reserved for the contract (its own arithmetic on the deployment
        it runs, never above what the contract reserves on the ledger) and the traffic it
        counted, at most the policy's `max_traffic` (the rest waits for the next one)."""
        mine = reserved_units(dep.workloads)
        cap = (c.get("active") or {}).get("capacity") or c.get("capacity") or {}
        billing = c.get("billing") or {}
        ledger = {**cap, "ipv4": billing.get("ipv4", 0), "names": billing.get("names", 0)}
        reserved = {}
        for unit, value in mine.items():
            reserved[unit] = min(value, int(ledger.get(unit, 0)))
            if value > reserved[unit]:
                log.warning("event=reservation_mismatch contract=%s unit=%s node=%s ledger=%s",
                            cid, unit, value, ledger.get(unit, 0))
        tin, tout = self.meter.pending(cid)
        tin = min(tin, max_traffic)
        tout = min(tout, max_traffic - tin)
        return consumption_payload(self.identity, cid, self.node_id, period, reserved,
                                   tin, tout)

    def _report(self, view: ContractView) -> dict[str, Any] | None:
        if view.final:
            return None
        records = {r.wid.name: r for r in self.state.workloads(view.cid)}
        workloads = []
        for w in view.deployment.workloads if view.deployment else []:
            rec = records.get(w.name)
            if rec is None:
                state, msg, data = ("deleted" if view.cancelled else "init"), "", {}
            else:
                state, msg, data = rec.state, rec.message, dict(rec.result)
                state, msg = view.live.get(w.name, (state, msg))
                if view.cancelled and state != "error":
                    state = "init"  # still being removed
            sealed = data.pop("sealed", "")
            workloads.append({"name": w.name, "type": w.type, "state": state,
                              "message": msg[:1000], "data": data, "sealed": sealed})
        report = {"contract": view.cid, "version": view.version, "error": view.error[:1000],
                  "workloads": workloads}
        crec = self.state.contract(view.cid)
        lr = view.ledger_report
        if (crec is not None and crec.reported == hash_hex(report) and lr is not None
                and int(lr.get("version", 0)) == view.version):
            return None
        return report

    # ---- read-only status -------------------------------------------------------------

    def logs_query(self, token: str) -> tuple[int, dict[str, Any]]:
        """GET /logs: a container's logs, for an owner-signed request, sealed to the owner."""
        prov = self.provisioners.get("container")
        if not isinstance(prov, ContainerProvisioner):
            return 404, {"error": "this node runs no containers"}

        def owner_key_for(cid: int) -> str | None:
            rec = self.state.contract(cid)
            return rec.owner_key if rec is not None and rec.status == "active" else None

        return prov.serve_logs_query(token, owner_key_for)

    def snapshot(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "twin": self.link.twin_id,
            "public_key": self.identity.public_hex,
            "capacity": self.capacity.to_dict(),
            "reserve": self.reserve.to_dict(),
            "used": self._used().to_dict(),
            "contracts": [{"id": c.id, "version": c.version, "status": c.status,
                           "message": c.message} for c in self.state.contracts()],
            "workloads": [{"contract": w.wid.contract, "name": w.wid.name, "type": w.type,
                           "state": w.state, "message": w.message}
                          for w in self.state.workloads()],
        }
