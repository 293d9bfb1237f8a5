"""A ledger cluster on this machine: an etcd cluster and N ledger replicas, started and
stopped as processes (`zerostack ledger cluster up`, and `start_cluster()` for callers
such as a local grid).

Layout of `DIR` (mode 0700):
- `etcd-<i>/`: the data dir of etcd member i;
- `replica-<i>/ledger.db`, `replica-<i>/validator.key` (0600): replica i's SQLite log and
  its validator key (kept, so a cluster started again over the same DIR resumes);
- `cluster.json`: the URLs of the etcd members and of the replicas, and the pids.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerostack.crypto import Identity, load_identity, save_identity
from zerostack.ledger.errors import LedgerError

MAX_REPLICAS = 16


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float,
               host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LedgerError(f"process {proc.args!r:.120} exited with {proc.returncode} "
                              f"before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LedgerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass
class EtcdMember:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


@dataclass
class Replica:
    index: int
    dir: Path
    port: int
    key: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.dir / "ledger.db"

    @property
    def key_file(self) -> Path:
        return self.dir / "validator.key"


@dataclass
class LedgerCluster:
    """A running etcd cluster and its ledger replicas (all children of this process)."""

    dir: Path
    name: str
    members: list[EtcdMember] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    policy_file: Path | None = None
    """The first pricing policy, given to the governing key's replica (replica 0)."""

    @property
    def etcd_urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def urls(self) -> list[str]:
        """The replicas' ledger URLs: give them all to clients and node agents."""
        return [r.url for r in self.replicas]

    @property
    def validators(self) -> list[str]:
        """The replicas' keys (the genesis validator set, unless changed since)."""
        return [r.key for r in self.replicas]

    # ---- etcd -------------------------------------------------------------------------

    def start_member(self, member: EtcdMember, initial: str, state: str = "new") -> None:
        member.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = open(member.data_dir.parent / f"{member.name}.log", "ab")  # noqa: SIM115
        args = [
            shutil.which("etcd") or "/usr/bin/etcd", "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
            "--listen-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", f"zs-{self.name}",
            # a loaded machine: a slower heartbeat keeps elections rare
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--max-request-bytes", str(4 << 20), "--logger", "zap", "--log-level", "warn",
        ]
        member.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    # ---- replicas ---------------------------------------------------------------------

    def start_replica(self, replica: Replica, timeout: float = 60.0) -> None:
        """Start replica `replica` (again) and wait until it listens."""
        self.spawn_replica(replica)
        assert replica.proc is not None
        _wait_port(replica.port, replica.proc, timeout)

    def spawn_replica(self, replica: Replica) -> None:
        log = open(replica.dir / "replica.log", "ab")  # noqa: SIM115
        args = [sys.executable, "-m", "zerostack.cli.main", "ledger", "serve",
                "--db", str(replica.db), "--listen", f"127.0.0.1:{replica.port}",
                "--etcd", ",".join(self.etcd_urls), "--validator-key", str(replica.key_file),
                "--cluster", self.name]
        if self.policy_file is not None and replica.index == 0:
            args += ["--policy", str(self.policy_file)]
        replica.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def add_replica(self, port: int | None = None, timeout: float = 60.0) -> Replica:
        """Start one more replica with a new key: it follows and catches up, and its
        signature counts once a `validator.set` puts its key in the validator set."""
        i = len(self.replicas)
        rdir = self.dir / f"replica-{i}"
        rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ident = Identity.generate()
        save_identity(ident, rdir / "validator.key", f"ledger-validator-{i}")
        replica = Replica(i, rdir, port or free_port(), ident.public_hex)
        self.replicas.append(replica)
        self.start_replica(replica, timeout)
        return replica

    def kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        """kill -9 one process of the cluster (and its process group)."""
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop every replica (SIGTERM, then SIGKILL), then every etcd member."""
        for r in self.replicas:
            _terminate(r.proc)
        for m in self.members:
            _terminate(m.proc)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "etcd": [{"name": m.name, "url": m.url,
                      "pid": m.proc.pid if m.proc else None} for m in self.members],
            "replicas": [{"url": r.url, "key": r.key, "db": str(r.db),
                          "pid": r.proc.pid if r.proc else None} for r in self.replicas],
        }


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def start_cluster(directory: Path, *, replicas: int = 3, etcd_members: int = 3,
                  name: str = "default", ports: Sequence[int] | None = None,
                  timeout: float = 60.0, policy: dict[str, Any] | None = None,
                  ) -> LedgerCluster:
    """Start `etcd_members` etcd processes and `replicas` ledger replicas on 127.0.0.1,
    with their state under `directory`; write the cluster's genesis (the replicas' keys
    are the validators) unless etcd has one. `ports`: the replicas' HTTP ports (default:
    free ones). `policy`: the cluster's first pricing policy (with `"dev_faucet": true`
    for a development grid), which replica 0, the governing key's, submits through etcd
    once it runs; a cluster that has one keeps it. On any failure everything started is
    stopped. Call `.stop()` when done."""
    if not 1 <= replicas <= MAX_REPLICAS or not 1 <= etcd_members <= 7:
        raise LedgerError(f"1 to {MAX_REPLICAS} replicas and 1 to 7 etcd members")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster = LedgerCluster(directory, name)
    if policy is not None:
        cluster.policy_file = directory / "policy.json"
        fd = os.open(cluster.policy_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(policy, f)
    try:
        for i in range(etcd_members):
            cluster.members.append(EtcdMember(f"etcd-{i}", directory / f"etcd-{i}",
                                              free_port(), free_port()))
        initial = cluster.initial_cluster()
        for m in cluster.members:
            cluster.start_member(m, initial)
        for m in cluster.members:
            assert m.proc is not None
            _wait_port(m.client_port, m.proc, timeout)
        for i in range(replicas):
            rdir = directory / f"replica-{i}"
            rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_file = rdir / "validator.key"
            if key_file.exists():
                ident = load_identity(key_file)
            else:
                ident = Identity.generate()
                save_identity(ident, key_file, f"ledger-validator-{i}")
            port = ports[i] if ports is not None else free_port()
            cluster.replicas.append(Replica(i, rdir, port, ident.public_hex))
        init_genesis(cluster.etcd_urls, name, cluster.validators, timeout)
        for r in cluster.replicas:
            cluster.spawn_replica(r)
        for r in cluster.replicas:
            assert r.proc is not None
            _wait_port(r.port, r.proc, timeout)
        (directory / "cluster.json").write_text(json.dumps(cluster.describe(), indent=1))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def init_genesis(etcd_urls: list[str], name: str, validators: list[str],
                 timeout: float = 60.0) -> list[str]:
    """Write the cluster's genesis (etcd must have elected a leader: retried until
    `timeout`); returns the validator set in force."""
    from zerostack.ledger.etcd import EtcdLog
    from zerostack.ledger.replica import init_cluster

    etcd = EtcdLog(etcd_urls, name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return list(init_cluster(etcd, validators).validators)
        except LedgerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
