"""Zero-DB failover under real network partitions: a harness anyone can run longer.

usage (root): .venv/bin/python -m bench.zdb_partition
        [--modes async,min1,majority,lease,lease-async]
        [--scenarios primary-cut,primary-cut-one,primary-isolated,replica-isolated,
        double-failover,compact-failover,etcd-cut]
        [--rounds N] [--load-seconds S] [--nodes 3] [--json]

Each mode gets a replica set of real `zerostack zdb` processes, each in its own network
namespace on a bridge (namespaces, links and 10.x addresses are made for the run and
removed at the end, whatever happens). Writer processes in a client namespace write
without pause, go to whichever node accepts writes, and record every acknowledged write
with the times it was sent and acknowledged. Partitions are real: nftables drops between
namespaces, or a node's link taken down. In modes async, min1 and majority the operator's
part (PROMOTE) is done by the harness, without FORCE. In the lease modes (`lease`: with
--min-replicas majority, `lease-async`: without) etcd runs in a namespace of its own and
the nodes fail over by themselves (--failover-etcd); nobody calls PROMOTE.

Scenarios (each ends healed, with every node's data and index files byte-identical):
  primary-cut       the primary is cut from every replica (clients still reach it; in the
                    lease modes from etcd too); a replica is promoted; the old primary
                    heals into the new term
  primary-cut-one   the primary is cut from one of its replicas only: it keeps a majority,
                    nobody is promoted
  primary-isolated  the primary is cut from everything (link down); same as primary-cut
  replica-isolated  one replica is cut off under load, then heals
  double-failover   primary-cut twice in a row (two terms)
  compact-failover  the primary compacts the writers' namespace online (grown by 8 MB of
                    overwritten values first; its link limited to 16 Mbit/s from then on)
                    and is cut from every replica the moment COMPACT returns, while the
                    replicas copy the rewritten namespace; a replica is promoted; the old
                    primary heals into the new term
  etcd-cut          (lease modes) the primary is cut from etcd only: it stops taking
                    writes, a replica takes over, the old primary follows it

Checks: no acknowledged write lost (modes min1, majority and lease; async and lease-async
report their losses), no key ever acknowledged with two different values (sequential keys
included), files identical after healing, one primary of the newest term; in the lease
modes also that no two nodes acknowledged writes in overlapping periods (each node's last
acknowledgement came before the next node's first write was sent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ZEROSTACK = [str(Path(sys.executable).parent / "zerostack")]
if not Path(ZEROSTACK[0]).exists():
    ZEROSTACK = [sys.executable, "-m", "zerostack.cli.main"]
PORT = 9900
PASSWORD = "partition-harness"
MODES = {"async": [], "min1": ["--min-replicas", "1"], "majority": ["--min-replicas", "majority"],
         "lease": ["--min-replicas", "majority", "--failover-ttl", "2",
                   "--failover-margin", "0.5"],
         "lease-async": ["--failover-ttl", "2", "--failover-margin", "0.5"]}
SCENARIOS = ("primary-cut", "primary-cut-one", "primary-isolated", "replica-isolated",
             "double-failover", "compact-failover")
LEASE_ONLY = ("etcd-cut",)
"""Scenarios of the lease modes only (they need etcd)."""
ADMIN = "partition-admin"
FILLER = (80, 100_000)  # compact-failover: values written twice before compacting
COPY_RATE = "16mbit"    # compact-failover: what the primary sends from COMPACT to the cut
GUARANTEED = {"min1", "majority", "lease"}
ETCD_PORT = 2379
TERM_FILE = "replication-term"


def etcd_command(data_dir: Path, host: str, client_port: int, peer_port: int) -> list[str]:
    """A one-member etcd (Debian's etcd-server) for a replica set's failover key."""
    client, peer = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
    return [shutil.which("etcd") or "/usr/bin/etcd", "--name", "zdb", "--data-dir",
            str(data_dir), "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"zdb={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-level", "warn"]


def etcd_ready(url: str) -> bool:
    """True once etcd at `url` answers a read (it has a leader)."""
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(
                f"{url}/v3/kv/range", data=b'{"key": "eg=="}', method="POST"),
                timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


class Net:
    """A hub namespace with a bridge, one namespace per node plus one for clients; every
    name carries a token unique to this run."""

    def __init__(self, nodes: int, etcd: bool = False) -> None:
        self.token = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
        self.hub = f"zdbp{self.token}h"
        self.subnet = f"10.{random.randint(64, 127)}.{random.randint(0, 255)}"
        self.names = [f"zdbp{self.token}n{i}" for i in range(nodes)] + [f"zdbp{self.token}c"]
        self.client_index = nodes
        self.etcd_index = nodes + 1 if etcd else -1
        if etcd:
            self.names.append(f"zdbp{self.token}e")
        self.created: list[str] = []

    @property
    def client(self) -> str:
        return self.names[self.client_index]

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def up(self) -> None:
        run("ip", "netns", "add", self.hub)
        self.created.append(self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
            run("ip", "-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            run("ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0")
            run("ip", "-n", self.hub, "link", "set", f"v{i}", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "nft", "add table inet zdbpart; "
                "add chain inet zdbpart input { type filter hook input priority 0; }; "
                "add chain inet zdbpart output { type filter hook output priority 0; }")

    def down(self) -> None:
        for ns in reversed(self.created):
            run("ip", "netns", "delete", ns, check=False)
        self.created.clear()

    def cut(self, i: int, others: list[int]) -> None:
        """Drop every packet between node i and the nodes `others` (both ways)."""
        for j in others:
            for a, b in ((i, j), (j, i)):
                ns, peer = self.names[a], self.address(b)
                run("ip", "netns", "exec", ns, "nft",
                    f"add rule inet zdbpart input ip saddr {peer} drop; "
                    f"add rule inet zdbpart output ip daddr {peer} drop")

    def slow(self, i: int, rate: str) -> None:
        """Limit what node i sends to `rate` (tc tbf on its link), until heal()."""
        run("ip", "netns", "exec", self.names[i], "tc", "qdisc", "replace", "dev", "eth0",
            "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")

    def isolate(self, i: int) -> None:
        run("ip", "-n", self.hub, "link", "set", f"v{i}", "down")

    def heal(self) -> None:
        for i, ns in enumerate(self.names):
            run("ip", "-n", self.hub, "link", "set", f"v{i}", "up")
            run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                check=False)
            run("ip", "netns", "exec", ns, "nft", "flush chain inet zdbpart input; "
                "flush chain inet zdbpart output")


@dataclass
class Node:
    index: int
    address: str
    root: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def log(self) -> Path:
        return self.root / "zdb.log"


class Cluster:
    """A replica set of `count` nodes in `net`: node 0 starts as the primary."""

    def __init__(self, net: Net, root: Path, count: int, mode: str) -> None:
        self.net = net
        self.mode = mode
        self.root = root
        self.nodes: list[Node] = []
        self.etcd: subprocess.Popen[bytes] | None = None
        lease = []
        if mode.startswith("lease"):
            lease = ["--failover-etcd", self.etcd_url, "--failover-name", f"h{net.token}"]
        for i in range(count):
            peers = ",".join(f"{net.address(j)}:{PORT}" for j in range(count) if j != i)
            args = ["--listen", net.address(i), "--port", str(PORT), "--data",
                    str(root / f"n{i}" / "data"), "--index", str(root / f"n{i}" / "index"),
                    "--replication-password", PASSWORD, "--admin", ADMIN, "--peers", peers,
                    "--advertise",
                    f"{net.address(i)}:{PORT}", "--min-replicas-timeout", "2",
                    "--datasize", "256K", *MODES[mode], *lease]
            if i:
                args += ["--replica-of", f"{net.address(0)}:{PORT}"]
            self.nodes.append(Node(i, net.address(i), root / f"n{i}", args))

    @property
    def etcd_url(self) -> str:
        return f"http://{self.net.address(self.net.etcd_index)}:{ETCD_PORT}"

    def start_etcd(self) -> None:
        """etcd in its own namespace, for the lease mode."""
        net = self.net
        data = self.root / "etcd"
        data.mkdir(parents=True, mode=0o700, exist_ok=True)
        host = net.address(net.etcd_index)
        with open(self.root / "etcd.log", "ab") as out:
            self.etcd = subprocess.Popen(
                ["ip", "netns", "exec", net.names[net.etcd_index],
                 *etcd_command(data, host, ETCD_PORT, ETCD_PORT + 1)],
                stdout=out, stderr=out, start_new_session=True)
        wait(lambda: run("ip", "netns", "exec", net.client, "etcdctl", "--endpoints",
                         self.etcd_url, "--command-timeout=1s", "endpoint", "health",
                         check=False).returncode == 0, 30, "etcd up")

    def start(self) -> None:
        if self.mode.startswith("lease"):
            self.start_etcd()
        for node in self.nodes:
            node.root.mkdir(parents=True, exist_ok=True)
            with open(node.log, "ab") as out:
                node.proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.net.names[node.index], *ZEROSTACK, "zdb",
                     *node.args], stdout=out, stderr=out, start_new_session=True)
        for node in self.nodes:
            wait(lambda n=node: self.call(n, "PING") == "PONG", 30, f"node {node.index} up")
        wait(lambda: self.info(self.nodes[0]).get("connected_replicas") ==
             str(len(self.nodes) - 1), 30, "replicas attached")
        if self.mode.startswith("lease"):
            wait(lambda: self.info(self.nodes[0]).get("etcd_holding") == "yes", 30,
                 "the primary holds the etcd key")

    def stop(self) -> None:
        for proc in [n.proc for n in self.nodes] + [self.etcd]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def await_failover(self, old: Node, term: int, timeout: float = 30) -> Node:
        """Lease mode: wait until another node than `old` is the primary of a term newer
        than `term` and takes writes (nobody calls PROMOTE)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node is old:
                    continue
                info = self.info(node)
                if info.get("role") == "primary" and "fenced" not in info and \
                        "writes_held" not in info and int(info.get("term", "0")) > term:
                    return node
            time.sleep(0.1)
        raise AssertionError(f"no node took over from node {old.index} in {timeout}s")

    def call(self, node: Node, *args: str, timeout: float = 5) -> str:
        """One command's reply; "" when the node did not answer in time (a node busy
        catching up on a loaded machine: the callers wait and ask again)."""
        try:
            out = subprocess.run(
                ["ip", "netns", "exec", self.net.client, "redis-cli", "-h", node.address,
                 "-p", str(PORT), *args],
                capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def script(self, node: Node, lines: list[str], timeout: float = 60) -> list[str]:
        """Commands for redis-cli on its standard input (one per line); its output lines."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.net.client, "redis-cli", "-h", node.address, "-p",
             str(PORT)], input="\n".join(lines) + "\n", capture_output=True, text=True,
            timeout=timeout)
        return out.stdout.splitlines()

    def fill(self, node: Node, count: int, size: int) -> None:
        """Write `count` values of `size` bytes into namespace default, then overwrite
        them (filler keys the writers never use; compaction drops the first values)."""
        said = self.script(node, [f"SET filler-{i} {letter * size}" for letter in "fg"
                                  for i in range(count)], timeout=120)
        if said.count("filler-0") != 2:
            raise AssertionError(f"filler not written: {said[:3]}")

    def info(self, node: Node) -> dict[str, str]:
        text = self.call(node, "INFO")
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    def role(self, node: Node) -> tuple[str, int]:
        return role_in(self.info(node))

    def primary(self) -> Node:
        best: tuple[int, Node] | None = None
        for node in self.nodes:
            role, term = self.role(node)
            if role == "primary" and (best is None or term > best[0]):
                best = (term, node)
        if best is None:
            raise AssertionError("no primary")
        return best[1]

    def promote(self, candidates: list[Node]) -> Node:
        """PROMOTE (never FORCE) on each candidate until one wins a majority."""
        deadline = time.monotonic() + 40
        said = ""
        while time.monotonic() < deadline:
            for node in candidates:
                out = subprocess.run(
                    ["ip", "netns", "exec", self.net.client, "redis-cli", "-h", node.address,
                     "-p", str(PORT)], input=f"AUTH {ADMIN}\nPROMOTE\n",
                    capture_output=True, text=True, timeout=20)
                said = out.stdout.strip()
                if said.endswith("OK\nOK") or said == "OK\nOK":
                    return node
            time.sleep(0.3)
        raise AssertionError(f"no candidate won a term: {said}")

    def converged(self, timeout: float = 60, identical: bool = True) -> float:
        """Wait until one primary of the newest term leads, every other node follows it
        online, and (with `identical`) all files are byte-identical; returns the seconds
        it took."""
        started = time.monotonic()
        deadline = started + timeout
        last = ""
        while time.monotonic() < deadline:
            infos = [self.info(n) for n in self.nodes]  # {} from a node that did not answer
            roles = [role_in(i) for i in infos]
            terms = {t for _r, t in roles}
            primaries = [r for r, _t in roles if r == "primary"]
            if len(primaries) == 1 and len(terms) == 1 and all(
                    r in ("primary", "replica") for r, _t in roles) and all(
                    i.get("link", "online") == "online" for i in infos):
                if not identical:
                    return time.monotonic() - started
                trees = [files(n) for n in self.nodes]
                if all(t == trees[0] for t in trees[1:]):
                    return time.monotonic() - started
                last = f"files differ: {differ(trees[0], trees[1:])}"
            else:
                last = f"roles {roles}"
            time.sleep(0.3)
        raise AssertionError(f"not converged after {timeout}s: {last}")


def role_in(info: dict[str, str]) -> tuple[str, int]:
    """A node's role (primary, primary-fenced, replica; ? when unknown) and term."""
    return info.get("role", "?") + ("-fenced" if "fenced" in info else ""), \
        int(info.get("term", "0"))


def files(node: Node) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for kind, root in (("data", node.data), ("index", node.index_dir)):
        for p in sorted(root.rglob("*")):
            try:
                if p.is_file() and p.name != TERM_FILE and not p.name.endswith(".tmp"):
                    out[f"{kind}/{p.relative_to(root)}"] = p.read_bytes()
            except FileNotFoundError:
                continue
    return out


def differ(a: dict[str, bytes], others: list[dict[str, bytes]]) -> list[str]:
    return sorted({k for o in others for k in set(a) | set(o) if a.get(k) != o.get(k)})[:5]


def wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


# -- writers (run inside the client namespace) ----------------------------------------------

def writer(nodes: list[str], seconds: float, out: Path, prefix: str, stop: Path) -> None:
    """Write unique user keys and sequential values without pause to whichever node takes
    them, until `stop` exists (or `seconds` passed); append every acknowledged write to
    `out` as JSON lines. While `stop`.pause exists, hold (and touch `stop`.held)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # no retries inside redis-py (newer versions retry a timeout 3 times with backoff): a
    # node that does not answer is left for the next one at once
    once = Retry(NoBackoff(), 0)
    deadline = time.monotonic() + seconds
    pause, held = stop.with_suffix(".pause"), stop.with_suffix(f".held-{prefix}")

    def going() -> bool:
        while pause.exists() and time.monotonic() < deadline and not stop.exists():
            held.touch()
            time.sleep(0.05)
        held.unlink(missing_ok=True)
        return time.monotonic() < deadline and not stop.exists()

    current = 0
    counter = 0
    with open(out, "a") as log:
        while going():
            host, port = nodes[current].rsplit(":", 1)
            try:
                r = redis.Redis(host=host, port=int(port), socket_timeout=3,
                                socket_connect_timeout=1, retry=once)
                r.response_callbacks.clear()
                seq = redis.Redis(host=host, port=int(port), socket_timeout=3,
                                  socket_connect_timeout=1, retry=once)
                seq.response_callbacks.clear()
                seq.execute_command("SELECT", "seq")
                while going():
                    counter += 1
                    t0 = time.time()
                    key, value = f"{prefix}-{counter}", f"{prefix}-v{counter}-{t0:.3f}"
                    if r.execute_command("SET", key, value) == key.encode():
                        log.write(json.dumps({"ns": "default", "key": key, "value": value,
                                              "node": nodes[current], "t0": t0,
                                              "t1": time.time()}) + "\n")
                    sval = f"{prefix}-s{counter}"
                    t0 = time.time()
                    skey = seq.execute_command("SET", "", sval)
                    log.write(json.dumps({"ns": "seq", "key": bytes(skey).hex(),
                                          "value": sval, "node": nodes[current], "t0": t0,
                                          "t1": time.time()}) + "\n")
                    log.flush()
            except (redis.RedisError, OSError):
                current = (current + 1) % len(nodes)
                time.sleep(0.05)


class Writers:
    def __init__(self, cluster: Cluster, root: Path, count: int = 2) -> None:
        self.cluster = cluster
        self.files = [root / f"writer{i}.jsonl" for i in range(count)]
        self.stop_file = root / "writers.stop"
        self.lost_before = 0       # figures of the checks so far (they are cumulative)
        self.conflicts_before = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def written(self) -> int:
        return sum(len(p.read_bytes().splitlines()) for p in self.files if p.exists())

    def pause(self) -> None:
        """Hold every writer between two writes (their acknowledged writes are recorded)."""
        self.stop_file.with_suffix(".pause").touch()
        wait(lambda: len(list(self.stop_file.parent.glob("writers.held-*"))) == len(self.procs),
             30, "writers held")

    def resume(self) -> None:
        self.stop_file.with_suffix(".pause").unlink(missing_ok=True)

    def start(self, seconds: float = 600) -> None:
        self.stop_file.unlink(missing_ok=True)
        nodes = ",".join(f"{n.address}:{PORT}" for n in self.cluster.nodes)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), *sys.path])
        for i, path in enumerate(self.files):
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.cluster.net.client, sys.executable, "-m",
                 "bench.zdb_partition", "writer", "--nodes", nodes, "--seconds", str(seconds),
                 "--out", str(path), "--prefix", f"w{i}-{secrets.token_hex(3)}", "--stop",
                 str(self.stop_file)], env=env, start_new_session=True))
        before = self.written()
        wait(lambda: self.written() > before + 20, 60, "writers acknowledged")

    def join(self) -> None:
        self.stop_file.touch()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def acked(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for path in self.files:
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue  # a writer killed mid-line: that write was not recorded
        return out


# -- scenarios ------------------------------------------------------------------------------

@dataclass
class Result:
    mode: str
    scenario: str
    acked: int = 0
    lost: int = 0
    conflicting_keys: int = 0
    converge_seconds: float = 0.0
    token: str = ""  # in the names of this run's network namespaces
    # lease mode: writes acknowledged by two nodes in overlapping periods (must be 0), and
    # seconds from each cut to the first write the next primary acknowledged
    overlaps: int = 0
    failover_seconds: tuple[float, ...] = ()
    # lease mode: writes the cut primary still acknowledged after its cut (what the
    # overlap check had to tell apart from the next primary's)
    acked_after_cut: int = 0

    @property
    def ok(self) -> bool:
        return self.conflicting_keys == 0 and self.overlaps == 0 and (
            self.lost == 0 or self.mode not in GUARANTEED)


def scenario(cluster: Cluster, writers: Writers, name: str, load: float) -> list[float]:
    """Run one scenario; returns the times of its cuts (time.time())."""
    net = cluster.net
    cuts: list[float] = []
    old = cluster.primary()
    replicas = [n for n in cluster.nodes if n is not old]
    writers.resume()
    progress(writers)
    if name in ("replica-isolated", "primary-cut-one"):
        victim = random.choice(replicas)
        if name == "primary-cut-one":  # the primary keeps a majority: no failover
            net.cut(old.index, [victim.index])
        else:
            net.isolate(victim.index)
        time.sleep(load)
        net.heal()
        progress(writers)
        return cuts
    rounds = 2 if name == "double-failover" else 1
    for _ in range(rounds):
        old = cluster.primary()
        replicas = [n for n in cluster.nodes if n is not old]
        if name == "compact-failover":
            # A namespace big enough that copying it again takes a while; every replica
            # holds it before the compaction starts.
            cluster.fill(old, *FILLER)
            said = cluster.script(old, [f"AUTH {ADMIN}",
                                        f"REPLWAIT {len(replicas)} 30000"])
            if said[-1:] != [str(len(replicas))]:
                raise AssertionError(f"replicas did not confirm the filler: {said}")
            # Copying the rewritten namespace again takes seconds, not milliseconds: the
            # cut lands while the replicas copy it.
            net.slow(old.index, COPY_RATE)
            said = cluster.script(old, [f"AUTH {ADMIN}", "COMPACT default 0"], timeout=120)
            if not any(line.startswith("reclaimed_bytes") for line in said):
                raise AssertionError(f"COMPACT failed: {said}")
        _role, term = cluster.role(old)
        cuts.append(time.time())
        if name == "primary-isolated":
            net.isolate(old.index)
        elif name == "etcd-cut":  # lease mode: the primary loses etcd, not its replicas
            net.cut(old.index, [net.etcd_index])
        elif cluster.mode.startswith("lease"):  # cut from its replicas and from etcd
            net.cut(old.index, [n.index for n in replicas] + [net.etcd_index])
        else:
            net.cut(old.index, [n.index for n in replicas])
        if cluster.mode.startswith("lease"):  # nobody promotes: the etcd lease decides
            cluster.await_failover(old, term)
            progress(writers)
        else:
            time.sleep(load / 2)
            cluster.promote(replicas)
        time.sleep(load / 2)
        net.heal()
        cluster.converged(identical=False)  # writes go on: files are compared at the end
        progress(writers)
    return cuts


def handovers(writes: list[dict[str, str]], cuts: list[float]
              ) -> tuple[int, list[float], int]:
    """Lease mode: acknowledged writes sorted by acknowledgement, in runs per node. Each
    run must end (its last acknowledgement) before the next run's first write was sent:
    otherwise two nodes took writes at once (counted). Also the seconds from each cut to
    the first acknowledgement by a node other than the one acknowledging at the cut, and
    how many writes that node still acknowledged after the cut."""
    timed = sorted((float(w["t1"]), float(w["t0"]), w["node"]) for w in writes if "t1" in w)
    overlaps = 0
    runs: list[tuple[str, float, float, float]] = []  # node, first t0, last t1, first t1
    for t1, t0, node in timed:
        if runs and runs[-1][0] == node:
            n, first, _last, ack = runs[-1]
            runs[-1] = (n, min(first, t0), t1, ack)
        else:
            runs.append((node, t0, t1, t1))
    for a, b in itertools.pairwise(runs):
        if a[2] >= b[1]:
            overlaps += 1
    seconds = []
    late = 0
    for cut in cuts:
        before = [r for r in runs if r[3] <= cut]
        after = [r for r in runs if r[3] > cut and (not before or r[0] != before[-1][0])]
        if after:
            seconds.append(round(after[0][3] - cut, 3))
        if before:
            late += sum(1 for t1, _t0, node in timed
                        if node == before[-1][0] and cut < t1 and (
                            not after or t1 < after[0][3]))
    return overlaps, seconds, late


def progress(writers: Writers) -> None:
    """Wait until the writers got some more writes acknowledged."""
    n = writers.written()
    wait(lambda: writers.written() > n + 20, 60, "writes go on")


def check(cluster: Cluster, writers: Writers, result: Result,
          before: list[dict[str, str]]) -> None:
    """Every acknowledged write so far against the primary; the scenario's figures are
    what changed since `before` (the check before it)."""
    acked = writers.acked()
    result.acked = len(acked) - len(before)
    seen: dict[tuple[str, str], str] = {}
    for w in acked:
        k = (w["ns"], w["key"])
        if k in seen and seen[k] != w["value"]:
            result.conflicting_keys += 1
        seen[k] = w["value"]
    primary = cluster.primary()
    # read from the files' owner through the client namespace: one redis-cli per batch
    lost = 0
    for ns in ("default", "seq"):
        keys = [(k, v) for (n, k), v in seen.items() if n == ns]
        for i in range(0, len(keys), 500):
            batch = keys[i:i + 500]
            script = [f"AUTH {ADMIN}", f"SELECT {ns}"] + [
                f"GET {k}" if ns == "default" else f'GET "{_escaped(k)}"' for k, _v in batch]
            out = subprocess.run(
                ["ip", "netns", "exec", cluster.net.client, "redis-cli", "-h", primary.address,
                 "-p", str(PORT)], input="\n".join(script) + "\n", capture_output=True,
                text=True, timeout=60).stdout.splitlines()[2:]
            for (_k, v), got in zip(batch, out, strict=False):
                if got != v:
                    lost += 1
            lost += max(0, len(batch) - len(out))
    result.lost, writers.lost_before = lost - writers.lost_before, lost
    result.conflicting_keys, writers.conflicts_before = (
        result.conflicting_keys - writers.conflicts_before, result.conflicting_keys)


def _escaped(hexkey: str) -> str:
    return "".join(f"\\x{hexkey[i:i + 2]}" for i in range(0, len(hexkey), 2))


def run_schedule(modes: list[str], scenarios: list[str], rounds: int = 1, load: float = 1.0,
                 nodes: int = 3, keep: bool = False) -> list[Result]:
    results: list[Result] = []
    for mode in modes:
        net = Net(nodes, etcd=mode.startswith("lease"))
        root = Path(tempfile.mkdtemp(prefix=f"zdbpart-{mode}-"))
        cluster = Cluster(net, root, nodes, mode)
        writers = Writers(cluster, root)
        try:
            net.up()
            cluster.start()
            cluster.script(cluster.nodes[0], [f"AUTH {ADMIN}", "NSNEW seq",
                                              "NSSET seq mode seq"])
            # the writers stop by themselves after this long, in case nobody else stops
            # them: long enough for the whole schedule on a loaded machine (a fixed ten
            # minutes ended them in the middle of longer runs)
            writers.start(seconds=600 + 300 * rounds * len(scenarios))
            for _ in range(rounds):
                for name in scenarios:
                    if name in LEASE_ONLY and not mode.startswith("lease"):
                        continue
                    result = Result(mode, name, token=net.token)
                    before = writers.acked()
                    cuts = scenario(cluster, writers, name, load)
                    writers.pause()
                    result.converge_seconds = round(cluster.converged(), 2)
                    check(cluster, writers, result, before)
                    if mode.startswith("lease"):
                        result.overlaps, seconds, result.acked_after_cut = handovers(
                            writers.acked()[len(before):], cuts)
                        result.failover_seconds = tuple(seconds)
                    results.append(result)
        finally:
            writers.stop()
            cluster.stop()
            net.down()
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("writer")
    w.add_argument("--nodes", required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--prefix", required=True)
    w.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS + LEASE_ONLY))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--load-seconds", type=float, default=1.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the files of the run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "writer":
        writer(args.nodes.split(","), args.seconds, args.out, args.prefix, args.stop)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    started = time.time()
    results = run_schedule(args.modes.split(","), args.scenarios.split(","), args.rounds,
                           args.load_seconds, args.nodes, args.keep)
    rows = [{"mode": r.mode, "scenario": r.scenario, "acked": r.acked, "lost": r.lost,
             "conflicting_keys": r.conflicting_keys, "converge_seconds": r.converge_seconds,
             "overlaps": r.overlaps, "failover_seconds": list(r.failover_seconds),
             "acked_after_cut": r.acked_after_cut,
             "ok": r.ok} for r in results]
    if args.json:
        print(json.dumps({"results": rows, "seconds": round(time.time() - started, 1),
                          "load": os.getloadavg()[0]}, indent=2))
    else:
        for row in rows:
            print(" ".join(f"{k}={v}" for k, v in row.items()))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
