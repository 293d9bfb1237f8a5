"""Zero-DB namespaces on the node's own Zero-DB server, managed over RESP with admin rights."""

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
from zerostack.workloads import Deployment, Workload, ZdbWorkload


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ZdbProvisioner(Provisioner):
    """One namespace per zdb workload, named after the workload id so it is never doubled."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self._conn: redis.Redis | None = None
        self._lock = threading.Lock()

    def _admin(self) -> redis.Redis:
        if self._conn is None:
            # redis-py sends `AUTH <password>` on every (re)connect, as Zero-DB expects.
            self._conn = redis.Redis(
                host=self.node.zdb_host, port=self.node.zdb_port,
                password=self.node.zdb_admin or None,
                socket_timeout=10, socket_connect_timeout=5,
            )
        return self._conn

    def _cmd(self, *args: Any) -> Any:
        # Retried once: the first command after a Zero-DB restart meets a dead socket.
        with self._lock:
            conn = self._admin()
            for attempt in (0, 1):
                try:
                    return conn.execute_command(*args)
                except redis.ConnectionError as exc:
                    if attempt:
                        raise ProvisionError(
                            f"node Zero-DB at {self.node.zdb_host}:{self.node.zdb_port} "
                            f"is unreachable: {exc}"
                        ) from exc
                    conn.connection_pool.disconnect()
                except redis.ResponseError as exc:
                    raise ProvisionError(f"Zero-DB refused {_text(args[0])}: {exc}") from exc
            raise AssertionError("unreachable")

    def namespaces(self) -> set[str]:
        return {_text(n) for n in self._cmd("NSLIST")}

    def info(self, ns: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in _text(self._cmd("NSINFO", ns)).splitlines():
            if ":" in line:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
        return out

    def _converge(self, wid: WorkloadID, spec: Workload) -> Provisioned:
        assert isinstance(spec, ZdbWorkload)
        ns = wid.key
        if ns not in self.namespaces():
            self._cmd("NSNEW", ns)
        info = self.info(ns)
        want_mode = "userkey" if spec.mode == "user" else "sequential"
        if info.get("mode") != want_mode:
            if int(info.get("entries", "0") or 0):
                raise ProvisionError(
                    f"namespace {ns} holds data in {info.get('mode')} mode; "
                    "the mode of a used namespace cannot change"
                )
            self._cmd("NSSET", ns, "mode", spec.mode)
        # Each NSSET rewrites the namespace descriptor on disk: skip the ones already true.
        if info.get("data_limits_bytes") != str(spec.size):
            self._cmd("NSSET", ns, "maxsize", str(spec.size))
        if spec.password or info.get("password") != "no":
            self._cmd("NSSET", ns, "password", spec.password or "*")
        if info.get("public") != ("yes" if spec.public else "no"):
            self._cmd("NSSET", ns, "public", "1" if spec.public else "0")
        return Provisioned(
            data={"host": self.node.public_host, "port": self.node.zdb_port, "namespace": ns,
                  "mode": spec.mode, "size": spec.size}
        )

    def provision(self, wid: WorkloadID, spec: Workload, deployment: Deployment) -> Provisioned:
        return self._converge(wid, spec)

    def update(
        self, wid: WorkloadID, old: Workload, new: Workload, deployment: Deployment
    ) -> Provisioned:
        assert isinstance(new, ZdbWorkload)
        info = self.info(wid.key) if wid.key in self.namespaces() else {}
        used = int(info.get("data_size_bytes", "0") or 0)
        if new.size < used:
            raise ProvisionError(
                f"namespace {wid.key} already holds {used} bytes; cannot shrink to {new.size}"
            )
        return self._converge(wid, new)

    def deprovision(self, wid: WorkloadID, spec: Workload) -> None:
        if wid.key in self.namespaces():
            self._cmd("NSDEL", wid.key)

    def pause(self, wid: WorkloadID, spec: Workload) -> str | None:
        """Make the namespace read-only (`NSSET ns lock 1`): writes are refused, reads
        still served. The lock lives in the server's memory: after a restart of the
        Zero-DB the next pass of the agent sets it again."""
        if self.info(wid.key).get("locked") != "yes":
            self._cmd("NSSET", wid.key, "lock", "1")
        return "paused: read-only (writes refused) while the contract is in grace"

    def resume(self, wid: WorkloadID, spec: Workload) -> None:
        if wid.key in self.namespaces() and self.info(wid.key).get("locked") == "yes":
            self._cmd("NSSET", wid.key, "lock", "0")

    def exists(self, wid: WorkloadID, spec: Workload) -> bool:
        return wid.key in self.namespaces()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
