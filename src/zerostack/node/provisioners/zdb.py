"""Zero-DB namespaces, managed over RESP with admin rights: on the node's own Zero-DB
server, or, for a replicated namespace (`replication`), on a server of its own that
replicas on other nodes follow; a replica (`replica_of`) is such a server started as a
replica of the primary's, on the address the primary's node registered on the ledger."""

from __future__ import annotations

import threading
from typing import Any

import redis

from zerostack.node.provisioners.base import (
    NodeContext,
    Provisioned,
    Provisioner,
    ProvisionError,
    WorkloadID,
)
from zerostack.node.zdbd import NamespaceServer, zdb_dirs
from zerostack.workloads import Deployment, Workload, ZdbWorkload


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ZdbProvisioner(Provisioner):
    """One namespace per zdb workload, named after the workload id so it is never doubled
    (on a namespace's own server: after the workload, the only namespace there)."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self._conns: dict[tuple[str, int], redis.Redis] = {}
        self._servers: dict[str, NamespaceServer] = {}
        self._lock = threading.Lock()

    # ---- connections --------------------------------------------------------------

    def _admin(self, host: str, port: int, password: str) -> redis.Redis:
        conn = self._conns.get((host, port))
        if conn is None:
            # redis-py sends `AUTH <password>` on every (re)connect, as Zero-DB expects.
            conn = self._conns[(host, port)] = redis.Redis(
                host=host, port=port, password=password or None,
                socket_timeout=10, socket_connect_timeout=5,
            )
        return conn

    def _cmd(self, *args: Any, server: NamespaceServer | None = None) -> Any:
        # Retried once: the first command after a Zero-DB restart meets a dead socket.
        if server is None:
            host, port, password = self.node.zdb_host, self.node.zdb_port, self.node.zdb_admin
        else:
            host, port, password = server.address, server.port, server.admin()
        with self._lock:
            conn = self._admin(host, port, password)
            for attempt in (0, 1):
                try:
                    return conn.execute_command(*args)
                except redis.ConnectionError as exc:
                    if attempt:
                        raise ProvisionError(
                            f"Zero-DB at {host}:{port} of this node is unreachable: {exc}"
                        ) from exc
                    conn.connection_pool.disconnect()
                except redis.ResponseError as exc:
                    raise ProvisionError(f"Zero-DB refused {_text(args[0])}: {exc}") from exc
            raise AssertionError("unreachable")

    def namespaces(self, server: NamespaceServer | None = None) -> set[str]:
        return {_text(n) for n in self._cmd("NSLIST", server=server)}

    def info(self, ns: str, server: NamespaceServer | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in _text(self._cmd("NSINFO", ns, server=server)).splitlines():
            if ":" in line:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
        return out

    # ---- replicated namespaces ----------------------------------------------------

    def _server(self, wid: WorkloadID, spec: ZdbWorkload) -> NamespaceServer | None:
        """The namespace's own server, for a replicated one; None: the node's server."""
        if spec.replication is None:
            return None
        server = self._servers.get(wid.key)
        if server is None or server.port != spec.replication.port:
            base = zdb_dirs(self.node.data_dir, self.node.pools)[0].parent
            listen = str(self.node.extra.get("zdb_listen") or self.node.zdb_host)
            server = self._servers[wid.key] = NamespaceServer(
                base / "replicated" / wid.key, listen, spec.replication.port)
        return server

    def _primary_address(self, spec: ZdbWorkload) -> str:
        """HOST:PORT of the primary a replica follows: the address its node registered."""
        r = spec.replica_of
        assert r is not None
        if r.node == self.node.extra.get("node_id"):
            raise ProvisionError(f"zdb {spec.name!r} is a replica of {r.workload!r} on this "
                                 "same node: a replica must be on another node")
        host = (self.node.extra.get("zdb_primaries") or {}).get(r.node, "")
        if not host:
            raise ProvisionError(f"node {r.node}, where the primary {r.workload!r} of this "
                                 "replica runs, has no registered address this node can reach")
        return f"[{host}]:{r.port}" if ":" in host else f"{host}:{r.port}"

    def _start(self, server: NamespaceServer, spec: ZdbWorkload) -> None:
        assert spec.replication is not None
        replica_of = self._primary_address(spec) if spec.replica_of is not None else ""
        try:
            server.start(spec.replication.password, replica_of)
        except (OSError, RuntimeError) as exc:
            raise ProvisionError(f"zdb {spec.name!r}: {exc}") from exc

    # ---- the provisioner ----------------------------------------------------------

    def _converge(self, wid: WorkloadID, spec: Workload) -> Provisioned:
        assert isinstance(spec, ZdbWorkload)
        server = self._server(wid, spec)
        if server is not None:
            self._start(server, spec)
        if spec.replica_of is not None:
            # A replica copies the primary's namespace (name and settings) and refuses
            # every change: nothing to set here.
            assert server is not None
            return Provisioned(data={
                "host": self.node.public_host, "port": server.port,
                "namespace": spec.replica_of.workload, "mode": spec.mode, "size": spec.size,
                "read_only": True,
                "replica_of": {"node": spec.replica_of.node, "workload": spec.replica_of.workload},
            })
        ns = wid.key if server is None else spec.name
        if ns not in self.namespaces(server):
            self._cmd("NSNEW", ns, server=server)
        info = self.info(ns, server)
        want_mode = "userkey" if spec.mode == "user" else "sequential"
        if info.get("mode") != want_mode:
            if int(info.get("entries", "0") or 0):
                raise ProvisionError(
                    f"namespace {ns} holds data in {info.get('mode')} mode; "
                    "the mode of a used namespace cannot change"
                )
            self._cmd("NSSET", ns, "mode", spec.mode, server=server)
        # Each NSSET rewrites the namespace descriptor on disk: skip the ones already true.
        if info.get("data_limits_bytes") != str(spec.size):
            self._cmd("NSSET", ns, "maxsize", str(spec.size), server=server)
        if spec.password or info.get("password") != "no":
            self._cmd("NSSET", ns, "password", spec.password or "*", server=server)
        if info.get("public") != ("yes" if spec.public else "no"):
            self._cmd("NSSET", ns, "public", "1" if spec.public else "0", server=server)
        data: dict[str, Any] = {
            "host": self.node.public_host,
            "port": self.node.zdb_port if server is None else server.port,
            "namespace": ns, "mode": spec.mode, "size": spec.size}
        if server is not None:
            data["replicated"] = True
        return Provisioned(data=data)

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        return self._converge(wid, spec)

    def update(
        self, wid: WorkloadID, old: Workload, new: Workload, deployment: Deployment
    ) -> Provisioned:
        assert isinstance(old, ZdbWorkload) and isinstance(new, ZdbWorkload)
        if old.replication != new.replication or old.replica_of != new.replica_of:
            raise ProvisionError(f"the replication of namespace {new.name!r} cannot change "
                                 "in place: deploy a new workload")
        if new.replica_of is not None:
            return self._converge(wid, new)
        server = self._server(wid, new)
        ns = wid.key if server is None else new.name
        if server is not None:
            self._start(server, new)
        info = self.info(ns, server) if ns in self.namespaces(server) else {}
        used = int(info.get("data_size_bytes", "0") or 0)
        if new.size < used:
            raise ProvisionError(
                f"namespace {ns} already holds {used} bytes; cannot shrink to {new.size}"
            )
        return self._converge(wid, new)

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        assert isinstance(spec, ZdbWorkload)
        server = self._server(wid, spec)
        if server is not None:
            with self._lock:
                conn = self._conns.pop((server.address, server.port), None)
                if conn is not None:
                    conn.close()
            try:
                server.remove()
            except OSError as exc:
                raise ProvisionError(f"cannot remove namespace {spec.name!r}: {exc}") from exc
            self._servers.pop(wid.key, None)
        elif wid.key in self.namespaces():
            self._cmd("NSDEL", wid.key)

    def pause(self, wid: WorkloadID, spec: Workload) -> str | None:
        """Make the namespace read-only (`NSSET ns lock 1`): writes are refused, reads
        still served. The lock lives in the server's memory: after a restart of the
        Zero-DB the next pass of the agent sets it again. A replica is read-only anyway."""
        assert isinstance(spec, ZdbWorkload)
        if spec.replica_of is not None:
            return None
        server = self._server(wid, spec)
        ns = wid.key if server is None else spec.name
        if self.info(ns, server).get("locked") != "yes":
            self._cmd("NSSET", ns, "lock", "1", server=server)
        return "paused: read-only (writes refused) while the contract is in grace"

    def resume(self, wid: WorkloadID, spec: Workload) -> None:
        assert isinstance(spec, ZdbWorkload)
        if spec.replica_of is not None:
            return
        server = self._server(wid, spec)
        if server is not None and not server.running():
            return
        ns = wid.key if server is None else spec.name
        if ns in self.namespaces(server) and self.info(ns, server).get("locked") == "yes":
            self._cmd("NSSET", ns, "lock", "0", server=server)

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        assert isinstance(spec, ZdbWorkload)
        server = self._server(wid, spec)
        if server is None:
            return wid.key in self.namespaces()
        if not server.running():
            return False
        return spec.replica_of is not None or spec.name in self.namespaces(server)

    def live_state(self, wid: WorkloadID, spec: Workload) -> tuple[str, str] | None:
        """A replicated namespace whose server is gone is an error until the next pass
        starts it again; a replica says how its link to the primary stands (`connecting`,
        `syncing`, `online`: a word that changes seldom, so reports stay few)."""
        assert isinstance(spec, ZdbWorkload)
        server = self._server(wid, spec)
        if server is None:
            return None
        if not server.running():
            return ("error", "its Zero-DB server is not running; the node starts it again")
        r = spec.replica_of
        if r is None:
            return None
        info = self._cmd("INFO", server=server)  # redis-py parses it into a dict
        link = str(info.get("link", "unknown") if isinstance(info, dict) else "unknown").strip()[:20]
        return ("ok", f"read-only replica of {r.workload} on node {r.node}: link {link}")

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
            for server in self._servers.values():
                server.stop()
