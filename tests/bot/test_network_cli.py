"""`zerostack network add | deploy | access | remove | extend` against a grid on hosts:
three nodes on two sites, one behind NAT, get a network; containers on them exchange
pages (busybox httpd and wget) through the tunnels; a namespace playing the user's
laptop brings up the printed configuration with wireguard-go and reaches every node's
network through node 1."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_root, require_tool, zerostack_cmd
from tests.flist.image import busybox_rootfs
from tests.node.network.test_resource import wireguard_processes
from zerostack.crypto import Identity, load_identity
from zerostack.flist import Hub, ImageConfig, LocalStore, SignedFlist, build_dir, push_flist
from zerostack.grid import GridNode, LocalGrid
from zerostack.grid.hosts import preexec
from zerostack.grid.topology import Site
from zerostack.node.network import resource
from zerostack.node.network.plan import container_link_names, resource_names
from zerostack.node.provisioners import WorkloadID
from zerostack.node.runtime.logs import read_logs


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[LocalGrid]:
    require_root()
    for tool in ("nft", "wg", "wireguard-go", "busybox"):
        require_tool(tool)
    g = LocalGrid(tmp_path / "grid", ledger_port=free_port(), netns=True,
                  status_port=free_port())
    try:
        client = g.start_ledger()
        g.start_node(client, "node1")
        g.start_node(client, "node2", hidden=True)
        g.start_node(client, "node3", site=1)
        g.identity("alice")
        yield g
    finally:
        g.stop()


@pytest.fixture
def hub_grid(tmp_path: Path) -> Iterator[tuple[LocalGrid, str]]:
    """node1 and node3 on two sites, node2 behind NAT on site 0, with a hub serving a
    signed busybox image."""
    require_root()
    for tool in ("nft", "wg", "wireguard-go", "busybox", "runc"):
        require_tool(tool)
    publisher = Identity.generate()
    store = LocalStore(tmp_path / "store")
    manifest, _ = build_dir(busybox_rootfs(tmp_path / "img"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, publisher)
    g = LocalGrid(tmp_path / "grid", ledger_port=free_port(), netns=True,
                  status_port=free_port())
    try:
        client = g.start_ledger()
        hub = g.start_hub(free_port())
        with g.on_wan(), Hub(hub) as h:
            push_flist(flist, store, h)
        for name, site, hidden in (("node1", 0, False), ("node2", 0, True),
                                   ("node3", 1, False)):
            g.start_node(client, name, "--hub", hub, "--flist-publisher",
                         publisher.public_hex, site=site, hidden=hidden)
        g.identity("alice")
        yield g, f"{hub}/{flist.hash_hex}"
    finally:
        g.stop()


def cli(g: LocalGrid, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZEROSTACK_HOME": str(g.home), "ZEROSTACK_LEDGER": g.url,
           "ZEROSTACK_IDENTITY": "alice", "COLUMNS": "200"}
    return subprocess.run([*zerostack_cmd(), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def pings(ns: str, address: str, tries: int = 5) -> bool:
    """A reply within `tries` pings (the first packets to a hidden node wait for its
    handshake: it dials the others)."""
    for _ in range(tries):
        if subprocess.run(["ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W",
                           "2", address], capture_output=True, timeout=30).returncode == 0:
            return True
    return False


def test_network_add_and_access_from_a_laptop(grid: LocalGrid) -> None:
    n1, n2, n3 = grid.nodes
    assert grid.topology is not None
    out = cli(grid, "network", "add", "net", "--nodes",
              f"{n1.node_id},{n2.node_id},{n3.node_id}", "--range", "10.50.0.0/16", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert set(record["states"].values()) == {"deployed"}
    assert record["nodes"][str(n1.node_id)]["subnet"] == "10.50.1.0/24"
    assert record["nodes"][str(n2.node_id)]["endpoint"] == ""  # hidden: it dials
    assert record["nodes"][str(n3.node_id)]["endpoint"] == n3.address
    made = [(load_identity(n.data / "identity.key").public_hex,
             int(record["nodes"][str(n.node_id)]["contract"])) for n in (n1, n2, n3)]
    names = [resource_names(key, WorkloadID(cid, "net")) for key, cid in made]
    # no key of the network is kept on the user's side
    assert "PrivateKey" not in (grid.home / "networks" / "net.json").read_text()
    assert "private" not in (grid.home / "networks" / "net.json").read_text()
    # every node reaches every other through the tunnels, the hidden one included
    for src, dst in ((0, "10.50.3.1"), (0, "10.50.2.1"), (2, "10.50.2.1"), (1, "10.50.1.1"),
                     (1, "10.50.3.1")):
        assert pings(names[src].namespace, dst), (src, dst)

    tag = secrets.token_hex(3)
    lap, wg = f"zt{tag}-lap", f"zt{tag}w"
    outer = f"zt{tag}l"
    try:
        subprocess.run(["ip", "netns", "add", lap], check=True)
        subprocess.run(["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                        "netns", lap], check=True)
        subprocess.run(["ip", "link", "set", outer, "master",
                        Site(grid.topology.grid, 0).bridge, "up"], check=True)
        for cmd in (["addr", "add", "198.18.0.250/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", lap, *cmd], check=True)

        out = cli(grid, "network", "access", "net")
        assert out.returncode == 0, out.stderr
        config = out.stdout
        assert f"Endpoint = {n1.address}:{record['port']}" in config
        assert record["port"] in range(20000, 30000)  # picked: no --port given
        address = next(line.split(" = ")[1] for line in config.splitlines()
                       if line.startswith("Address"))
        assert address == "10.50.4.1/24"
        subprocess.run(["wireguard-go", wg], check=True, capture_output=True,
                       preexec_fn=preexec(lap),
                       env={k: v for k, v in os.environ.items()
                            if k not in ("WG_PROCESS_FOREGROUND", "LOG_LEVEL")})
        stripped = "\n".join(line for line in config.splitlines()
                             if not line.startswith("Address")) + "\n"
        subprocess.run(["wg", "setconf", wg, "/dev/stdin"], input=stripped, text=True,
                       check=True)
        for cmd in (["addr", "add", address, "dev", wg], ["link", "set", wg, "up"],
                    ["route", "add", "10.50.0.0/16", "dev", wg]):
            subprocess.run(["ip", "-n", lap, *cmd], check=True)
        # every node's network, node 2's and 3's through node 1, which forwards for it
        for dst in ("10.50.1.1", "10.50.2.1", "10.50.3.1"):
            assert pings(lap, dst), dst
        # the update of the nodes' networks kept the tunnels between the nodes
        assert pings(names[0].namespace, "10.50.3.1")
        assert pings(names[2].namespace, "10.50.2.1")

        # node 2 leaves: 1 and 3 (and the laptop) keep working, its resource goes
        out = cli(grid, "network", "remove", "net", "--node", str(n2.node_id))
        assert out.returncode == 0, out.stderr
        assert not Path(f"/run/netns/{names[1].namespace}").exists()
        assert not wireguard_processes(names[1].wireguard)
        route = subprocess.run(["ip", "-n", names[0].namespace, "route"], capture_output=True,
                               text=True, check=True).stdout
        assert "10.50.3.0/24" in route and "10.50.2.0/24" not in route
        assert pings(names[0].namespace, "10.50.3.1") and pings(lap, "10.50.3.1")
        assert not pings(names[0].namespace, "10.50.2.1", tries=1)

        # and joins again: a new contract, its /24 free again, the others keep going
        out = cli(grid, "network", "extend", "net", "--nodes", str(n2.node_id))
        assert out.returncode == 0, out.stderr
        again = json.loads((grid.home / "networks" / "net.json").read_text())["nodes"]
        assert again[str(n2.node_id)]["subnet"] == "10.50.2.0/24"
        rejoined = resource_names(made[1][0], WorkloadID(int(again[str(n2.node_id)]["contract"]),
                                                         "net"))
        names.append(rejoined)
        assert pings(rejoined.namespace, "10.50.1.1") and pings(rejoined.namespace, "10.50.3.1")
        assert pings(names[2].namespace, "10.50.2.1") and pings(lap, "10.50.2.1")

        for cid in (made[0][1], made[2][1], int(again[str(n2.node_id)]["contract"])):
            assert cli(grid, "cancel", str(cid)).returncode == 0
        for n in names:
            deadline = time.monotonic() + 60
            while Path(f"/run/netns/{n.namespace}").exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not Path(f"/run/netns/{n.namespace}").exists()
        # and on no host a link, a process, a route or a table of theirs
        for n in names:
            assert not wireguard_processes(n.wireguard)
            assert not Path(f"/var/run/wireguard/{n.wireguard}.sock").exists()
        for node in grid.nodes:
            assert node.host is not None
            for what in (["ip", "-o", "link"], ["ip", "route"], ["nft", "list", "tables"]):
                out = subprocess.run(["ip", "netns", "exec", node.host.namespace, *what],
                                     capture_output=True, text=True, check=True).stdout
                assert not any(n.tag in out for n in names), (node.name, out)
                assert "100.127." not in out, (node.name, out)
    finally:
        for pid in wireguard_processes(wg):
            os.kill(pid, signal.SIGKILL)
        Path(f"/var/run/wireguard/{wg}.sock").unlink(missing_ok=True)  # left by kill -9
        subprocess.run(["ip", "netns", "delete", lap], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", outer], capture_output=True, check=False)
        for n in names:
            resource.remove(n)


def httpd(text: str) -> str:
    return (f"mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && "
            "exec httpd -f -p 8080 -h /tmp/www")


def container_logs(node: GridNode, contract: int, name: str) -> str:
    key = load_identity(node.data / "identity.key").public_hex
    try:
        return "\n".join(read_logs(node.data / "containers", 50,
                                   beneath=("containers", f"zs-{key[:10]}-c{contract}-{name}",
                                            "logs")))
    except FileNotFoundError:
        return ""


def test_containers_on_three_hosts_and_a_laptop_exchange_pages_over_the_network(
        hub_grid: tuple[LocalGrid, str], tmp_path: Path) -> None:
    grid, flist = hub_grid
    n1, n2, n3 = grid.nodes
    assert grid.topology is not None
    out = cli(grid, "network", "add", "web", "--nodes", f"{n1.node_id},{n2.node_id},{n3.node_id}",
              "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    contract = {n.node_id: int(record["nodes"][str(n.node_id)]["contract"]) for n in grid.nodes}
    names = [resource_names(load_identity(n.data / "identity.key").public_hex,
                            WorkloadID(contract[n.node_id], "web")) for n in grid.nodes]

    def deploy(node: GridNode, *workloads: tuple[str, str]) -> dict[str, Any]:
        spec = tmp_path / f"{node.name}.yaml"
        spec.write_text(json.dumps({"workloads": [{
            "type": "container", "name": name, "flist": flist, "memory": "32M",
            "network": {"network": "web"}, "args": [script]} for name, script in workloads]}))
        out = cli(grid, "network", "deploy", "web", str(spec), "--node", str(node.node_id),
                  "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        return {w["name"]: w for w in json.loads(out.stdout)["report"]["workloads"]}

    ctrs = [container_link_names(load_identity(n.data / "identity.key").public_hex,
                                 WorkloadID(contract[n.node_id], c)).namespace
            for n, c in ((n3, "site"), (n2, "hid"), (n1, "client"))]
    # httpd on host 3 (second site) and on host 2 (behind NAT); wget from host 1
    assert deploy(n3, ("site", httpd("hello-laptop")))["site"]["data"]["ip"] == "10.20.3.2"
    assert deploy(n2, ("hid", httpd("hello-hidden")))["hid"]["data"]["ip"] == "10.20.2.2"
    before = {n: sum(a + b for a, b in resource.transfer(n).values()) for n in names}
    fetch = ("trap 'exit 0' TERM; while true; do for u in http://10.20.3.2:8080/ "
             "http://10.20.2.2:8080/; do wget -q -O - $u 2>&1; done; sleep 0.5 & wait; done")
    deploy(n1, ("client", fetch))
    deadline = time.monotonic() + 60
    while not {"hello-laptop", "hello-hidden"} <= set(
            container_logs(n1, contract[n1.node_id], "client").split()):
        assert time.monotonic() < deadline, container_logs(n1, contract[n1.node_id], "client")
        time.sleep(0.5)
    # the pages went through the tunnels: host 1's and both servers' counters moved
    for n in names:
        assert sum(a + b for a, b in resource.transfer(n).values()) > before[n] + 100, n

    tag = secrets.token_hex(3)
    lap, wg, outer = f"zt{tag}-lap", f"zt{tag}w", f"zt{tag}l"
    try:
        subprocess.run(["ip", "netns", "add", lap], check=True)
        subprocess.run(["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                        "netns", lap], check=True)
        subprocess.run(["ip", "link", "set", outer, "master",
                        Site(grid.topology.grid, 0).bridge, "up"], check=True)
        for cmd in (["addr", "add", "198.18.0.250/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", lap, *cmd], check=True)
        out = cli(grid, "network", "access", "web")
        assert out.returncode == 0, out.stderr
        address = next(line.split(" = ")[1] for line in out.stdout.splitlines()
                       if line.startswith("Address"))
        subprocess.run(["wireguard-go", wg], check=True, capture_output=True,
                       preexec_fn=preexec(lap),
                       env={k: v for k, v in os.environ.items()
                            if k not in ("WG_PROCESS_FOREGROUND", "LOG_LEVEL")})
        subprocess.run(["wg", "setconf", wg, "/dev/stdin"], text=True, check=True,
                       input="\n".join(line for line in out.stdout.splitlines()
                                       if not line.startswith("Address")) + "\n")
        for cmd in (["addr", "add", address, "dev", wg], ["link", "set", wg, "up"],
                    ["route", "add", "10.20.0.0/16", "dev", wg]):
            subprocess.run(["ip", "-n", lap, *cmd], check=True)
        page = ""
        deadline = time.monotonic() + 30
        while "hello-laptop" not in page and time.monotonic() < deadline:
            page = subprocess.run(["ip", "netns", "exec", lap, "busybox", "wget", "-q", "-O",
                                   "-", "http://10.20.3.2:8080/"], capture_output=True,
                                  text=True, timeout=30).stdout
        assert "hello-laptop" in page
        transfer = subprocess.run(["wg", "show", wg, "transfer"], capture_output=True,
                                  text=True, check=True).stdout.split()
        assert int(transfer[1]) > 0 and int(transfer[2]) > 0
        # the grid stops with the contracts running: its teardown removes what the nodes
        # recorded (the resources and the container's namespace)
        made = [n.namespace for n in names] + ctrs
        assert all(Path(f"/run/netns/{ns}").exists() for ns in made)
        grid.stop()
        assert not any(Path(f"/run/netns/{ns}").exists() for ns in made)
        assert not any(wireguard_processes(n.wireguard) for n in names)
    finally:
        for pid in wireguard_processes(wg):
            os.kill(pid, signal.SIGKILL)
        Path(f"/var/run/wireguard/{wg}.sock").unlink(missing_ok=True)  # left by kill -9
        subprocess.run(["ip", "netns", "delete", lap], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", outer], capture_output=True, check=False)
        for n in names:
            resource.remove(n)
        for ns in ctrs:
            resource.detach_container(ns)
