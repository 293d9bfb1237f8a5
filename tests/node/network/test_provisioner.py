"""The network workload through real node agents on grid hosts: a network across two
hosts on two sites, a busybox httpd container on host 1 fetched with wget by containers
on host 1 (by name) and host 3 (through the WireGuard tunnel), and cancellation that
leaves no namespace or wireguard-go process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_root, require_tool
from tests.flist.image import busybox_rootfs
from tests.node.network.test_resource import wireguard_processes
from zerostack.bot import ThreeBot
from zerostack.crypto import Identity, load_identity
from zerostack.flist import Hub, ImageConfig, LocalStore, SignedFlist, build_dir, push_flist
from zerostack.grid import GridNode, LocalGrid
from zerostack.grid.hosts import preexec
from zerostack.node.network import resource
from zerostack.node.network.plan import container_link_names, resource_names
from zerostack.node.provisioners import WorkloadID
from zerostack.node.runtime.logs import read_logs

PORT = 51820
HTTPD = ("mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && "
         "exec httpd -f -p 8080 -h /tmp/www")


def fetcher(url: str) -> str:
    return (f"trap 'exit 0' TERM; while true; do wget -q -O - {url} 2>&1; "
            "sleep 0.5 & wait; done")


def keypair() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                             check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    return private, public


def node_key(node: GridNode) -> str:
    return load_identity(node.data / "identity.key").public_hex


class Setup:
    def __init__(self, grid: LocalGrid, hub: str, flist: str, publisher: Identity) -> None:
        self.grid, self.hub, self.flist, self.publisher = grid, hub, flist, publisher
        self.made: list[tuple[GridNode, int, list[str]]] = []  # node, contract, containers

    def container(self, name: str, script: str, ip: str | None = None) -> dict[str, Any]:
        net: dict[str, Any] = {"network": "net"}
        if ip:
            net["ip"] = ip
        return {"type": "container", "name": name, "flist": f"{self.hub}/{self.flist}",
                "publishers": [self.publisher.public_hex], "memory": "32M",
                "args": [script], "network": net}

    def logs(self, node: GridNode, contract: int, name: str) -> str:
        cid = f"zs-{node_key(node)[:10]}-c{contract}-{name}"
        try:
            return "\n".join(read_logs(node.data / "containers", 50,
                                       beneath=("containers", cid, "logs")))
        except FileNotFoundError:
            return ""


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    require_root()
    for tool in ("runc", "nft", "wg", "wireguard-go"):
        require_tool(tool)
    publisher = Identity.generate()
    store = LocalStore(tmp_path / "store")
    manifest, _ = build_dir(busybox_rootfs(tmp_path / "img"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, publisher)
    g = LocalGrid(tmp_path / "grid", ledger_port=free_port(), netns=True,
                  status_port=free_port())
    s: Setup | None = None
    try:
        client = g.start_ledger()
        hub = g.start_hub(free_port())
        with g.on_wan(), Hub(hub) as h:
            push_flist(flist, store, h)
        for name, site in (("node1", 0), ("node3", 1)):
            g.start_node(client, name, "--hub", hub, "--flist-publisher",
                         publisher.public_hex, site=site)
        s = Setup(g, hub, flist.hash_hex, publisher)
        yield s
    finally:
        g.stop()
        # whatever a failed test left of what the nodes made (names are theirs alone)
        for node, contract, containers in s.made if s else []:
            key = node_key(node)
            for c in containers:
                resource.detach_container(container_link_names(key, WorkloadID(contract, c))
                                          .namespace)
            resource.remove(resource_names(key, WorkloadID(contract, "net")))


def network(subnet: str, key: str, peers: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {"type": "network", "name": "net", "ip_range": "10.40.0.0/16", "subnet": subnet,
            "wireguard_private_key": key, "wireguard_listen_port": PORT,
            "peers": [{"subnet": sub, "wireguard_public_key": pub, "endpoint": f"{ep}:{PORT}"}
                      for sub, pub, ep in peers]}


def test_containers_on_two_hosts_talk_through_the_network(setup: Setup) -> None:
    g = setup.grid
    n1, n3 = g.nodes
    k1, k3 = keypair(), keypair()
    with ThreeBot(g.url, g.identity("alice")) as bot:
        d1 = bot.build({"workloads": [
            network("10.40.1.0/24", k1[0], [("10.40.3.0/24", k3[1], n3.address)]),
            setup.container("web", HTTPD, ip="10.40.1.10"),
            setup.container("probe", fetcher("http://web:8080/"))]}, [], None)
        d3 = bot.build({"workloads": [
            network("10.40.3.0/24", k3[0], [("10.40.1.0/24", k1[1], n1.address)]),
            setup.container("client", fetcher("http://10.40.1.10:8080/"))]}, [], None)
        c1 = bot.deploy(d1, n1.node_id)
        setup.made.append((n1, c1, ["web", "probe"]))
        c3 = bot.deploy(d3, n3.node_id)
        setup.made.append((n3, c3, ["client"]))
        reports = {}
        for cid in (c1, c3):
            c = bot.wait(cid, lambda c: c["state"] in ("deployed", "error")
                         and bool(c.get("report")), timeout=180)
            assert c["state"] == "deployed", c["report"]
            reports[cid] = {w["name"]: w for w in c["report"]["workloads"]}
        r1 = reports[c1]
        assert r1["net"]["data"]["wireguard_public_key"] == k1[1]
        # which WireGuard carries it, as the interface's kind shows it in its namespace
        assert r1["net"]["data"]["wireguard_implementation"] == resource.implementation(
            resource_names(node_key(n1), WorkloadID(c1, "net"))) != ""
        assert r1["web"]["data"]["ip"] == "10.40.1.10"
        assert r1["probe"]["data"]["ip"] == "10.40.1.2"  # allocated: the lowest free
        assert reports[c3]["client"]["data"]["ip"] == "10.40.3.2"

        # by name on host 1, through the tunnel from host 3
        deadline = time.monotonic() + 60
        while not ("hello-from-web" in setup.logs(n1, c1, "probe")
                   and "hello-from-web" in setup.logs(n3, c3, "client")):
            assert time.monotonic() < deadline, (setup.logs(n1, c1, "probe"),
                                                 setup.logs(n3, c3, "client"))
            time.sleep(0.5)
        for cid in (c1, c3):
            wg = reports[cid]["net"]["data"]["wireguard_interface"]
            out = subprocess.run(["wg", "show", wg, "transfer"], capture_output=True,
                                 text=True, check=True).stdout.split()
            assert int(out[1]) > 0 and int(out[2]) > 0, out
            # the resource lives in its own namespace; the tunnel's socket on the host
            ns = reports[cid]["net"]["data"]["namespace"]
            assert Path(f"/run/netns/{ns}").exists()
            # what the node bills as the resource's traffic: its tunnel's bytes, both ways
            node = n1 if cid == c1 else n3
            billed = resource.counters(resource_names(node_key(node), WorkloadID(cid, "net")))
            assert billed["wireguard"][0] > 0 and billed["wireguard"][1] > 0, billed

        for cid in (c1, c3):
            bot.cancel(cid)
        for cid in (c1, c3):
            bot.wait(cid, lambda c: c["state"] == "deleted", timeout=120)
    for node, contract, containers in setup.made:
        key = node_key(node)
        names = resource_names(key, WorkloadID(contract, "net"))
        assert not Path(f"/run/netns/{names.namespace}").exists()
        assert not Path(f"/var/run/wireguard/{names.wireguard}.sock").exists()
        for c in containers:
            ns = container_link_names(key, WorkloadID(contract, c)).namespace
            assert not Path(f"/run/netns/{ns}").exists()
        assert not (node.data / "networks" / names.tag).exists()


def test_kill9_of_the_agent_mid_setup_converges_to_one_resource(setup: Setup) -> None:
    g = setup.grid
    n1, n3 = g.nodes
    assert n1.host is not None
    k1, k3 = keypair(), keypair()
    with ThreeBot(g.url, g.identity("alice")) as bot:
        d3 = bot.build({"workloads": [
            network("10.40.3.0/24", k3[0], [("10.40.1.0/24", k1[1], n1.address)])]}, [], None)
        d1 = bot.build({"workloads": [
            network("10.40.1.0/24", k1[0], [("10.40.3.0/24", k3[1], n3.address)])]}, [], None)
        c3 = bot.deploy(d3, n3.node_id)
        setup.made.append((n3, c3, []))
        c1 = bot.deploy(d1, n1.node_id)
        setup.made.append((n1, c1, []))
        names = resource_names(node_key(n1), WorkloadID(c1, "net"))
        deadline = time.monotonic() + 60
        while not Path(f"/run/netns/{names.namespace}").exists():
            assert time.monotonic() < deadline, g.log_tail("node1")
            time.sleep(0.002)
        # the agent, its Zero-DB and the WireGuard daemon it started: its whole group
        os.killpg(n1.proc.pid, signal.SIGKILL)
        n1.proc.wait()
        made = subprocess.run(["ip", "-n", names.namespace, "-o", "link"],
                              capture_output=True, text=True).stdout
        print("links when killed:", [line.split(":")[1].strip() for line in made.splitlines()])
        with open(g.root / "node1-again.log", "ab") as log:
            again = subprocess.Popen(list(n1.proc.args), stdout=log, stderr=log,
                                     start_new_session=True,
                                     preexec_fn=preexec(n1.host.namespace))
        try:
            c = bot.wait(c1, lambda c: c["state"] in ("deployed", "error")
                         and bool(c.get("report")), timeout=120)
            assert c["state"] == "deployed", c["report"]
            assert bot.wait(c3, lambda c: c["state"] == "deployed", 60)
            links = subprocess.run(["ip", "-n", names.namespace, "-o", "link"],
                                   capture_output=True, text=True, check=True).stdout
            assert sorted(line.split(":")[1].strip().split("@")[0]
                          for line in links.splitlines()) == sorted(
                ["lo", names.bridge, names.wireguard, names.uplink_inner])
            assert len(wireguard_processes(names.wireguard)) == 1
            assert subprocess.run(["ip", "netns", "exec", names.namespace, "busybox", "ping",
                                   "-c", "1", "-W", "3", "10.40.3.1"],
                                  capture_output=True).returncode == 0
        finally:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait()
