"""LocalGrid: start a ledger server and node agents as child processes, on loopback or
with every node on a host of its own (a network namespace on a simulated WAN).

Every part is the real program (`zerostack ledger serve`, `zerostack node run`, each node
with its own Zero-DB); the grid only starts them, waits until they answer, and stops
them together with what its nodes run (containers, mounts, cgroups, the hosts' network).
The processes it started are listed in `<root>/grid.pids` and its namespaces and links
follow from `<root>/grid.json`, so a later grid on the same folder removes what a crashed
one left. Used by `zerostack demo` and by anyone who wants a grid to try contracts on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zerostack.crypto import Identity, load_identity, save_identity
from zerostack.grid import hosts
from zerostack.grid.errors import GridError
from zerostack.grid.teardown import release, remove_tree
from zerostack.grid.topology import Host, Topology, new_grid_id
from zerostack.ledger import LedgerClient, LedgerError
from zerostack.ledger.cluster import MAX_REPLICAS, LedgerCluster, start_cluster

PIDS = "grid.pids"
STOP_WAIT = 10.0


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "zerostack"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zerostack.cli.main"]


def _port_open(port: int, host: str = "127.0.0.1", netns: str | None = None) -> bool:
    """Whether something accepts on `host`:`port` (as seen from inside `netns`)."""
    try:
        if netns is None:
            conn = socket.create_connection((host, port), timeout=0.3)
        else:
            with hosts.inside(netns):
                conn = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            conn.settimeout(0.3)
            try:
                conn.connect((host, port))
            except OSError:
                conn.close()
                raise
    except OSError:
        return False
    conn.close()
    return True


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), or None when there is none:
    with the pid, it names one process for good (a pid alone may be reused)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def _signal_group(pid: int, sig: int) -> None:
    # Every grid process leads its own session and process group (its Zero-DB is in it);
    # one that does not lead a group is signalled alone.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class GridNode:
    name: str
    data: Path
    zdb_port: int
    proc: subprocess.Popen[bytes]
    node_id: int = 0
    host: Host | None = None  # its host, when the grid runs nodes on hosts

    @property
    def address(self) -> str:
        """Where its Zero-DB and status listen (inside its host's namespace, if any)."""
        return self.host.address if self.host else "127.0.0.1"


@dataclass
class LocalGrid:
    """A ledger on `ledger_port` and nodes whose Zero-DBs listen from `zdb_base_port` up.

    With `netns`, each node runs on a host of its own (see `zerostack.grid.topology`):
    its agent, Zero-DB and status endpoint live in the host's network namespace, every
    Zero-DB on `zdb_base_port` and every status endpoint on `status_port` of its host's
    address; the ledger answers on 127.0.0.1 for this machine and on the WAN address
    198.18.0.1 for the hosts. Needs root.

    Identities live under `<home>/identities` as ordinary key files, so the `zerostack`
    CLI works against the grid with ZEROSTACK_HOME=<home> and ZEROSTACK_LEDGER=<url>.
    """

    root: Path
    ledger_port: int = 7700
    zdb_base_port: int = 9901
    netns: bool = False
    sites: int = 2
    status_port: int = 9800
    topology: Topology | None = None
    nodes: list[GridNode] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    farm: int = 0
    ledger_replicas: int = 0
    """0: one ledger process; N: an etcd cluster and N ledger replicas (`start_cluster`),
    on ports `ledger_port` to `ledger_port + N - 1` (loopback only)."""
    cluster: LedgerCluster | None = None

    @property
    def url(self) -> str:
        """The ledger's URL; with replicas, every replica's URL, comma-separated."""
        if self.ledger_replicas:
            return ",".join(f"http://127.0.0.1:{self.ledger_port + i}"
                            for i in range(self.ledger_replicas))
        return f"http://127.0.0.1:{self.ledger_port}"

    @property
    def wan_url(self) -> str:
        """The ledger's URL as the nodes reach it (on the WAN when they run on hosts)."""
        if self.topology is None:
            return self.url
        return f"http://{self.topology.ledger_address}:{self.ledger_port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def _track(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Stop `proc` with the grid, and list it in grid.pids for a later reclaim()."""
        self._procs.append(proc)
        with open(self.root / PIDS, "a") as f:
            f.write(f"{proc.pid} {_start_time(proc.pid)} {name}\n")

    def _start(self, name: str, args: list[str], netns: str | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen([*_cli(), *args], stdout=log, stderr=log,
                                start_new_session=True, pass_fds=pass_fds,
                                preexec_fn=hosts.preexec(netns) if netns else None)
        self._track(name, proc)
        return proc

    def log_tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _wait(self, what: str, name: str, proc: subprocess.Popen[bytes], ready: object,
              timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GridError(f"{what} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if callable(ready) and ready():
                return
            time.sleep(0.05)
        raise GridError(f"{what} did not come up in {timeout:.0f}s:\n{self.log_tail(name)}")

    def identity(self, name: str) -> Identity:
        """The grid's identity NAME, created (mode 0600) on first use."""
        path = self.home / "identities" / f"{name}.key"
        if path.exists():
            return load_identity(path)
        ident = Identity.generate()
        save_identity(ident, path, name)
        return ident

    def reclaim(self) -> None:
        """Stop what an earlier grid on this folder left running after a crash: the
        processes it listed in grid.pids (only those still the very same processes),
        then its nodes' containers, mounts and cgroups, then the namespaces and links
        its grid.json names."""
        path = self.root / PIDS
        stale: list[tuple[int, int]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                fields = line.split()
                if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
                    continue
                pid, started = int(fields[0]), int(fields[1])
                if pid != os.getpid() and _start_time(pid) == started:
                    stale.append((pid, started))
        for pid, _ in stale:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while any(_start_time(p) == s for p, s in stale) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid, started in stale:
            if _start_time(pid) == started:
                _signal_group(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
        problems = release(self.root)
        if problems:
            raise GridError(f"{self.root}: what an earlier grid left cannot be stopped: "
                            + "; ".join(problems))

    def reset(self) -> None:
        """reclaim(), then delete the folder (never through a mount point)."""
        self.reclaim()
        remove_tree(self.root)

    def start_ledger(self) -> LedgerClient:
        self.reclaim()
        for port in range(self.ledger_port, self.ledger_port + max(1, self.ledger_replicas)):
            if _port_open(port):
                raise GridError(f"port {port} is taken: is another grid running?")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.ledger_replicas:
            self._start_cluster()
        else:
            self._start_single()
        client = LedgerClient(self.url)
        farmer = self.identity("farmer")
        client.register_twin(farmer)
        self.farm = client.create_farm(farmer, "demo-farm")
        return client

    def _start_cluster(self) -> None:
        """An etcd cluster (3 members, 1 for fewer than 3 replicas) and the replicas, in
        `<root>/ledger-cluster`; their processes stop with the grid like the others."""
        if self.netns:
            raise GridError("a grid with ledger replicas runs its nodes on loopback: the "
                            "replicas listen on 127.0.0.1 only")
        if not 1 <= self.ledger_replicas <= MAX_REPLICAS:
            raise GridError(f"1 to {MAX_REPLICAS} ledger replicas")
        try:
            cluster = start_cluster(
                self.root / "ledger-cluster", replicas=self.ledger_replicas,
                etcd_members=3 if self.ledger_replicas >= 3 else 1,
                ports=[self.ledger_port + i for i in range(self.ledger_replicas)])
        except LedgerError as exc:
            raise GridError(f"the ledger cluster did not start: {exc}") from exc
        self.cluster = cluster
        # etcd first in the list: stop() signals in reverse, so the replicas stop first
        for m in cluster.members:
            assert m.proc is not None
            self._track(f"ledger-{m.name}", m.proc)
        for r in cluster.replicas:
            assert r.proc is not None
            self._track(f"ledger-replica-{r.index}", r.proc)

    def _start_single(self) -> None:
        args = ["ledger", "serve", "--db", str(self.root / "ledger.db"),
                "--listen", f"127.0.0.1:{self.ledger_port}"]
        wan: list[socket.socket] = []
        if self.netns:
            wan = self._make_wan()
            args += [a for s in wan for a in ("--listen-fd", str(s.fileno()))]
        try:
            proc = self._start("ledger", args, pass_fds=tuple(s.fileno() for s in wan))
        finally:
            for s in wan:
                s.close()  # the ledger holds its own copies
        self._wait("the ledger", "ledger", proc, lambda: _port_open(self.ledger_port))

    def on_wan(self) -> contextlib.AbstractContextManager[None]:
        """A block whose new sockets are on the grid's WAN (in the router's namespace),
        to reach hosts from this process; without hosts, a block like any other."""
        return hosts.inside(self.topology.router) if self.topology else contextlib.nullcontext()

    def start_hub(self, port: int) -> str:
        """Start a flist hub (a Zero-DB, files in `<root>/hub`) that every node reaches:
        on 127.0.0.1, or on the WAN at the ledger's address. Returns its HOST:PORT;
        push flists to it inside `on_wan()`. It stops with the grid."""
        address = self.topology.ledger_address if self.topology else "127.0.0.1"
        netns = self.topology.router if self.topology else None
        if _port_open(port, address, netns):
            raise GridError(f"port {port} for the hub is taken")
        proc = self._start("hub", ["zdb", "--listen", address, "--port", str(port),
                                   "--data", str(self.root / "hub" / "data"),
                                   "--index", str(self.root / "hub" / "index")], netns)
        self._wait("the hub", "hub", proc, lambda: _port_open(port, address, netns))
        return f"{address}:{port}"

    def _make_wan(self) -> list[socket.socket]:
        """The grid's WAN (recorded before it is made) and the ledger's sockets on it."""
        if os.geteuid() != 0:
            raise GridError("a grid with hosts makes network namespaces: it needs root")
        self.topology = Topology(new_grid_id(), self.sites)
        hosts.save(self.root, self.topology)
        hosts.apply(self.topology.wan_steps())
        sockets: list[socket.socket] = []
        try:
            for address in (self.topology.ledger_address, self.topology.ledger_address6):
                sockets.append(hosts.listen_socket(self.topology.router, address,
                                                   self.ledger_port))
        except OSError as exc:
            for s in sockets:
                s.close()
            raise GridError(f"the ledger cannot listen on the grid's WAN: {exc}") from exc
        return sockets

    def _add_host(self, name: str, site: int, hidden: bool) -> Host:
        if self.topology is None:
            raise GridError("start_ledger() makes the WAN hosts join: call it first")
        host = self.topology.add_host(name, site, hidden)
        hosts.save(self.root, self.topology)
        hosts.apply(self.topology.host_steps(host))
        return host

    def start_node(self, client: LedgerClient, name: str, *extra: str, site: int = 0,
                   hidden: bool = False) -> GridNode:
        """Start node agent `name` and wait until it is registered. On a grid with hosts,
        it runs on a new host on WAN `site`, or behind NAT there when `hidden`."""
        data = self.root / name
        args = ["node", "run", "--farm", str(self.farm), "--data", str(data),
                "--heartbeat", "5", "--resync", "5"]
        host = None
        if self.netns:
            host = self._add_host(name, site, hidden)
            port = self.zdb_base_port
            args += ["--ledger", self.wan_url, "--zdb-port", str(port),
                     "--zdb-listen", host.address, "--endpoint", host.endpoint,
                     "--status-port", str(self.status_port), "--status-listen", host.address]
        else:
            port = self.zdb_base_port + len(self.nodes)
            if _port_open(port):
                raise GridError(f"port {port} for {name}'s Zero-DB is taken")
            args += ["--ledger", self.url, "--zdb-port", str(port)]
        proc = self._start(name, [*args, *extra], host.namespace if host else None)
        node = GridNode(name, data, port, proc, host=host)

        def registered() -> bool:
            key = data / "identity.key"
            if not key.exists():
                return False
            twin = client.twin_by_key(load_identity(key).public_hex)
            found = client.nodes(twin=twin["id"]) if twin else []
            if found:
                node.node_id = int(found[0]["id"])
            # its Zero-DB answers soon after the registration: a node is ready with both
            return bool(found) and _port_open(port, node.address,
                                              host.namespace if host else None)

        self._wait(f"node {name}", name, proc, registered)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after a grace period), then what the
        nodes run: containers, mounts, cgroups. Raises GridError naming what stays."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in self._logs:
            log.close()
        self._procs.clear()
        self._logs.clear()
        # Containers outlive their agent by design (an agent restart keeps them); the
        # grid started them, so the grid stops them.
        problems = release(self.root)
        if problems:
            raise GridError("the grid stopped, but these stay: " + "; ".join(problems))
        (self.root / PIDS).unlink(missing_ok=True)
        self.topology = None
        self.cluster = None

    def __enter__(self) -> LocalGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
