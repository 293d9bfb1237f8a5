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
from zerostack.ledger.errors import LedgerError, LedgerRejected
from zerostack.ledger.pin import PIN_FILE, HeaderPin
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
from zerostack.node.zdbd import ZdbServer, connect_address
from zerostack.workloads import (
    Deployment,
    GatewayNameProxyWorkload,
    Resources,
    WorkloadError,
    diff,
    open_instructions,
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
                                   extra=dict(cfg.extra))
        self.provisioners: dict[str, Provisioner] = {}
        self.executor: Executor | None = None
        self.node_id = 0
        self.started = time.time()
        self._lock = asyncio.Lock()
        self._pending: set[int] = set()
        self._wake = asyncio.Event()
        self._status: StatusServer | None = None
        self._resources: dict[tuple[int, str], Resources] = {}  # (contract, hash) -> need

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

    async def _gateway_facts(self) -> None:
        """The node's gateway record (its farmer's node.gateway), for gateway workloads."""
        if self.cfg.dry or self.node_id == 0:
            return
        node = await self.link.client.node(self.node_id)
        gateway = (node or {}).get("gateway")
        self.context.extra["gateway"] = gateway
        if gateway:  # the farm's other gateways: what the grid DNS checks and answers
            farm = await self.link.client.nodes(farm=self.cfg.farm, limit=1000)
            self.context.extra["gateway_peers"] = [
                {"node": n["id"], **n["gateway"]} for n in farm
                if n.get("gateway") and n["id"] != self.node_id][:16]

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

    async def _view(self, cid: int, c: dict[str, Any] | None) -> ContractView | None:
        local = self.state.contract(cid)
        running = (Deployment.parse(local.deployment)
                   if local and local.status == "active" and local.deployment else None)
        owner_key = running.owner_key if running else (local.owner_key if local else "")
        if c is None or c["state"] in ("deleted", "expired", "cancelled") \
                or c.get("active") is None:
            return self._ending(cid, c, local, running, owner_key)
        active = c["active"]
        view = ContractView(cid, int(active["version"]), owner_key, None,
                            ledger_report=c.get("report"))
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
            dep = self._verify(cid, c, active, running)
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

    def _ending(self, cid: int, c: dict[str, Any] | None, local: ContractRecord | None,
                running: Deployment | None, owner_key: str) -> ContractView | None:
        """The ledger says the contract is cancelled, deleted, expired or gone. The node
        removes what it runs only on cancel votes it verified itself against the delete
        requirement of the deployment it runs; any other say-so is an anomaly, and the
        workloads keep running."""
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

    def _verify(self, cid: int, c: dict[str, Any], active: dict[str, Any],
                previous: Deployment | None) -> Deployment:
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
            signed = dep.verify_signatures(approvals, keys, contract=cid,
                                           version=int(active["version"]), node=self.node_id)
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
        for wrec in self.state.workloads(view.cid):
            prov = self.provisioners.get(wrec.type)
            d = desired.get(wrec.wid)
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
        return outcomes

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
