"""Container-to-container TCP throughput and round-trip time across a user network (two
nodes, WireGuard between them) against the same two nodes over their plain veth/bridge
link, in one run, as ratios; with the CPU the WireGuard daemons used. Needs root.

    python -m bench.network_bench [--megabytes 256] [--rounds 3] [--json]
                                  [--wireguard-go PATH ...] [--pin-daemons]

Each `--wireguard-go` build gets its own network between the same two nodes (its own
contract, range and port); the rounds take every network and the plain path in turn, so
builds are compared within one run. Without the option: the `wireguard-go` on PATH.

The CPU of each path is what the sender and the receiver (this process) and, across the
overlay, both WireGuard daemons used during its transfers, in core-seconds per gigabit;
the kernel's work for a packet counts to the process it ran in. `--pin-daemons` (a study
of scheduling, not something a node does) binds node 1's daemons to CPU 0 and node 2's to
CPU 1 for the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerostack.bot.mesh import keypair
from zerostack.grid.hosts import inside
from zerostack.node.network import resource
from zerostack.node.network.plan import NetworkResource, container_link_names, plan
from zerostack.node.provisioners import WorkloadID
from zerostack.workloads import NetworkWorkload

CHUNK = 1 << 20
PORT = 5201


@dataclass
class Side:
    ns: str  # the node's namespace
    wan_ip: str
    subnet: str
    key: tuple[str, str]
    res: list[NetworkResource] = field(default_factory=list)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _socket_in(ns: str) -> socket.socket:
    with inside(ns):
        return socket.socket()


def throughput(src_ns: str, dst_ns: str, address: str, size: int) -> float:
    """Bytes per second of one TCP stream from `src_ns` to `address` in `dst_ns`."""
    server = _socket_in(dst_ns)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, PORT))
    server.listen(1)
    got = [0]

    def receive() -> None:
        conn, _ = server.accept()
        buf = bytearray(CHUNK)
        with conn:
            while (n := conn.recv_into(buf)) > 0:
                got[0] += n

    t = threading.Thread(target=receive)
    t.start()
    client = _socket_in(src_ns)
    payload = b"\0" * CHUNK
    start = time.perf_counter()
    with client:
        client.connect((address, PORT))
        for _ in range(size // CHUNK):
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        t.join()
    elapsed = time.perf_counter() - start
    server.close()
    return got[0] / elapsed


def rtt(src_ns: str, dst_ns: str, address: str, count: int = 2000) -> float:
    """Median seconds of a 1-byte TCP request and answer."""
    server = _socket_in(dst_ns)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, PORT + 1))
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(1):
                conn.sendall(data)

    t = threading.Thread(target=echo)
    t.start()
    client = _socket_in(src_ns)
    times = []
    with client:
        client.connect((address, PORT + 1))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            client.sendall(b"x")
            client.recv(1)
            times.append(time.perf_counter() - start)
    t.join()
    server.close()
    return statistics.median(times)


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """This process's CPU (all threads: the sender and the receiver)."""
    t = os.times()
    return t.user + t.system


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pin(pid: int, cpu: int) -> None:
    """Bind every thread of process `pid` to `cpu` (the Go runtime's threads included)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except (ProcessLookupError, PermissionError):
            pass


def _wireguard_pids(binary: str, names: list[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and argv[0] == binary.encode() and argv[1].decode() in names:
                found.append(int(entry.name))
    return found


def _version(binary: str) -> str:
    """What the build says of itself, and its Debian package version when it is the
    package's (Debian's builds print an older version than the package's)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout.strip().splitlines() or ["?"])[0]
    owner = subprocess.run(["dpkg", "-S", os.path.realpath(shutil.which(binary) or binary)],
                           capture_output=True, text=True, check=False).stdout.split(":")[0]
    if owner:
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", owner],
                                 capture_output=True, text=True, check=False).stdout
        first += f" (Debian {owner} {version})"
    return f"{binary}: {first}"


def run(megabytes: int, rounds: int, binaries: list[str], pin: bool = False) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    wan = f"zb{tag}-wan"
    sides = [Side(f"zb{tag}-n{i}", f"198.18.250.{i}", "", keypair()) for i in (1, 2)]
    made: list[str] = [wan]
    container = [[container_link_names(s.ns.ljust(64, "0"), WorkloadID(k + 1, "c"))
                  for k in range(len(binaries))] for s in sides]
    try:
        _ip("netns", "add", wan)
        _ip("-n", wan, "link", "add", "name", "wanbr", "type", "bridge")
        _ip("-n", wan, "link", "set", "wanbr", "up")
        for i, s in enumerate(sides, 1):
            _ip("netns", "add", s.ns)
            made.append(s.ns)
            _ip("-n", s.ns, "link", "set", "lo", "up")
            _ip("link", "add", f"zb{tag}e{i}", "netns", s.ns, "type", "veth", "peer", "name",
                f"zb{tag}w{i}", "netns", wan)
            _ip("-n", wan, "link", "set", f"zb{tag}w{i}", "master", "wanbr", "up")
            _ip("-n", s.ns, "addr", "add", f"{s.wan_ip}/24", "dev", f"zb{tag}e{i}")
            _ip("-n", s.ns, "link", "set", f"zb{tag}e{i}", "up")
        for k, binary in enumerate(binaries):
            resource.WIREGUARD_GO = binary
            for j, (s, other) in enumerate(((sides[0], sides[1]), (sides[1], sides[0]))):
                spec = NetworkWorkload.model_validate({
                    "name": "net", "ip_range": f"10.{60 + k}.0.0/16",
                    "subnet": f"10.{60 + k}.{j + 1}.0/24",
                    "wireguard_private_key": s.key[0], "wireguard_listen_port": 51820 + k,
                    "peers": [{"subnet": f"10.{60 + k}.{2 - j}.0/24",
                               "wireguard_public_key": other.key[1],
                               "endpoint": f"{other.wan_ip}:{51820 + k}"}]})
                res = plan(s.ns.ljust(64, "0"), WorkloadID(k + 1, "net"), spec)
                s.res.append(res)
                with inside(s.ns):
                    resource.ensure(res)
                links = container[j][k]
                made.append(links.namespace)
                resource.attach_container(res.names, res.bridge_address, links.namespace,
                                          links.outer, links.inner, f"10.{60 + k}.{j + 1}.2")
        resource.WIREGUARD_GO = "wireguard-go"
        pids = [_wireguard_pids(b, [s.res[k].names.wireguard for s in sides])
                for k, b in enumerate(binaries)]
        if pin:
            for k in range(len(binaries)):
                for cpu, s in enumerate(sides):
                    for pid in _wireguard_pids(binaries[k], [s.res[k].names.wireguard]):
                        _pin(pid, cpu % (os.cpu_count() or 1))
        size = megabytes << 20
        gbit = size * 8 / 1e9
        load_before = os.getloadavg()
        results: dict[str, list[float]] = {"plain_bps": [], "plain_rtt": [], "plain_cpu": []}
        for k in range(len(binaries)):
            # the handshake and warm-up
            throughput(container[0][k].namespace, container[1][k].namespace,
                       f"10.{60 + k}.2.2", 8 << 20)
            for key in ("overlay_bps", "overlay_rtt", "wg_cores", "wg_cpu", "overlay_cpu"):
                results[f"{key}{k}"] = []
        for _ in range(rounds):
            for k in range(len(binaries)):
                a, b = container[0][k].namespace, container[1][k].namespace
                cpu0, own0, t0 = _cpu_seconds(pids[k]), _own_cpu_seconds(), time.perf_counter()
                results[f"overlay_bps{k}"].append(throughput(a, b, f"10.{60 + k}.2.2", size))
                wg = _cpu_seconds(pids[k]) - cpu0
                results[f"wg_cores{k}"].append(wg / (time.perf_counter() - t0))
                results[f"wg_cpu{k}"].append(wg / gbit)
                results[f"overlay_cpu{k}"].append((wg + _own_cpu_seconds() - own0) / gbit)
                results[f"overlay_rtt{k}"].append(rtt(a, b, f"10.{60 + k}.2.2"))
            own0 = _own_cpu_seconds()
            results["plain_bps"].append(throughput(sides[0].ns, sides[1].ns, sides[1].wan_ip,
                                                   size))
            results["plain_cpu"].append((_own_cpu_seconds() - own0) / gbit)
            results["plain_rtt"].append(rtt(sides[0].ns, sides[1].ns, sides[1].wan_ip))
        med = {k: statistics.median(v) for k, v in results.items()}
        out: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_before_after": [round(load_before[0], 1),
                                          round(os.getloadavg()[0], 1)],
            "cpus": os.cpu_count(), "daemons_pinned": pin,
            "megabytes": megabytes, "rounds": rounds, "mtu": resource.WIREGUARD_MTU,
            "plain_mbit_s": round(med["plain_bps"] * 8 / 1e6, 1),
            "plain_rtt_us": round(med["plain_rtt"] * 1e6, 1),
            "plain_core_seconds_per_gbit": round(med["plain_cpu"], 3),
            "wireguard": [],
        }
        for k, binary in enumerate(binaries):
            out["wireguard"].append({
                "implementation": _version(binary),
                "overlay_mbit_s": round(med[f"overlay_bps{k}"] * 8 / 1e6, 1),
                "throughput_ratio": round(med[f"overlay_bps{k}"] / med["plain_bps"], 3),
                "overlay_rtt_us": round(med[f"overlay_rtt{k}"] * 1e6, 1),
                "rtt_ratio": round(med[f"overlay_rtt{k}"] / med["plain_rtt"], 2),
                "wireguard_cores_during_transfer": round(med[f"wg_cores{k}"], 2),
                "wireguard_core_seconds_per_gbit": round(med[f"wg_cpu{k}"], 3),
                "overlay_core_seconds_per_gbit": round(med[f"overlay_cpu{k}"], 3),
                # what the plain path needs per bit over what the overlay needs: the
                # throughput ratio where the CPU, all of it for the transfer, is the limit
                "cpu_cost_ratio": round(med["plain_cpu"] / med[f"overlay_cpu{k}"], 3),
                "wireguard_peak_rss_mib": round(max(_peak_rss_mib(p) for p in pids[k]), 1),
            })
        return out
    finally:
        resource.WIREGUARD_GO = "wireguard-go"
        for s in sides:
            for res in s.res:
                with inside(s.ns):
                    resource.remove(res.names)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pin-daemons", action="store_true",
                        help="bind node 1's WireGuard daemons to CPU 0, node 2's to CPU 1")
    parser.add_argument("--wireguard-go", action="append", metavar="PATH",
                        help="a wireguard-go build to measure (repeat to compare builds)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("network_bench needs root (it makes network namespaces)")
    out = run(args.megabytes, args.rounds, args.wireguard_go or ["wireguard-go"],
              args.pin_daemons)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k != "wireguard":
                print(f"{k:42} {v}")
        for impl in out["wireguard"]:
            for k, v in impl.items():
                print(f"  {k:40} {v}")


if __name__ == "__main__":
    main()
