"""Plans the user's side builds from the webapp and batch-job templates over nodes
registered on a real ledger (no agents: nothing is created): networks, container
addresses, gateway proxies on distinct gateway nodes, prices, and the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bot.test_cli import zs
from tests.conftest import REPO, ProcessGroup
from tests.node.harness import Grid
from zerostack.bot import solutions as sol
from zerostack.bot.spec import BotError
from zerostack.contracts import load_text
from zerostack.crypto import Identity
from zerostack.workloads import GatewayNameProxyWorkload, NetworkWorkload

TEMPLATES = REPO / "examples" / "templates"
GiB = 1 << 30
CAP = {"cru": 4, "mru": 8 * GiB, "sru": 100 * GiB, "hru": 1000 * GiB}


def register(grid: Grid, n: int, country: str = "BE", public: bool = False) -> list[int]:
    out = []
    for i in range(n):
        ident = Identity.generate()
        grid.client.register_twin(ident)
        extra = {"public_ips": [f"198.18.7.{10 + len(out) + i}"]} if public else {}
        endpoint = f"198.18.{7 if public else 8}.{100 + i}:7000"
        nid = grid.client.register_node(ident, grid.farm, CAP, country,
                                        endpoint=endpoint, **extra)
        if public:  # the farmer makes it a gateway too
            grid.client.send(grid.farmer, "node.gateway", {
                "node": nid, "domain": f"gw{nid}.grid.test", "ipv4": f"198.18.7.{100 + i}/24"})
        out.append(nid)
    return out


def test_webapp_plan_has_its_network_and_two_gateways(procs: ProcessGroup,
                                                       tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    plain = register(grid, 2)
    user, _ = grid.user()
    with grid.bot(user) as bot:
        t = load_text((TEMPLATES / "webapp.yaml").read_text())
        with pytest.raises(BotError, match="no 2 nodes with a gateway"):
            sol.draft(bot, t, {"name": "shop"})
        public = register(grid, 2, public=True)
        d = sol.draft(bot, t, {"name": "shop", "image": "hub/abc"})
    assert d.names == ["shop"]
    proxies = {nid: w for nid, dep in d.deployments.items() for w in dep.workloads
               if isinstance(w, GatewayNameProxyWorkload)}
    assert sorted(proxies) == sorted(public)
    app_node = next(nid for nid, parts in d.parts_on.items() if "app-0" in parts)
    assert app_node in plain + public
    web = d.deployments[app_node].workload("shop-web")
    assert web is not None and web.network is not None  # type: ignore[union-attr]
    ip = web.network.ip  # type: ignore[union-attr]
    assert all(w.backends == [f"http://{ip}:8080"] and w.network == "shop-net"
               for w in proxies.values())
    # every node of the solution is on the network, gateways included
    for nid in {app_node, *public}:
        nets = [w for w in d.deployments[nid].workloads if isinstance(w, NetworkWorkload)]
        assert [n.name for n in nets] == ["shop-net"]
    # one requirement (the owner's) for every part
    assert len({dep.requirement() for dep in d.deployments.values()}) == 1


def test_dry_run_prints_the_plan_and_creates_nothing(procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    grid = Grid(procs, tmp_path)
    register(grid, 1)
    register(grid, 2, public=True)
    home = tmp_path / "home"
    zs(home, grid.url, "id", "new", "alice")
    for name in ("webapp", "batch-job"):
        out = zs(home, grid.url, "deploy", str(TEMPLATES / f"{name}.yaml"), "--dry-run",
                 "-i", "alice").stdout
        assert "dry run: nothing was created" in out and "per month" in out
    plan = json.loads(zs(home, grid.url, "deploy", str(TEMPLATES / "batch-job.yaml"),
                         "--dry-run", "--json", "-p", "cpu=2", "-p", "data=2G",
                         "-i", "alice").stdout)
    (node,) = plan["nodes"]
    assert node["resources"]["cru"] == 2 and node["resources"]["hru"] == 2 * GiB
    assert node["workloads"] == ["zdb:job-data", "container:job"]
    bad = zs(home, grid.url, "deploy", str(TEMPLATES / "batch-job.yaml"), "--dry-run",
             "-p", "cpu=64", "-i", "alice", ok=False)
    assert bad.returncode == 1 and "above the maximum 32" in bad.stderr
    assert grid.client.contracts() == [] and grid.client.solutions() == []


def test_a_tampered_template_is_refused(procs: ProcessGroup, tmp_path: Path) -> None:
    """The user's side re-hashes what the ledger serves: a body that is not what was
    published (a ledger that swapped it) is refused, by name and by hash."""
    grid = Grid(procs, tmp_path)
    expert, _ = grid.user()
    user, _ = grid.user()
    with grid.bot(expert) as bot:
        digest = sol.publish(bot, load_text((TEMPLATES / "archive.yaml").read_text()))
    with grid.bot(user) as bot:
        assert sol.load_template(bot, digest)[1] == digest
        served = bot.ledger.template(digest)
        assert served is not None
        body = {**served["body"], "spread": {"nodes": 1}}
        swapped = {**served, "body": body}
        bot.ledger.template = lambda _h: swapped  # type: ignore[method-assign]
        bot.ledger.templates = lambda **_kw: [swapped]  # type: ignore[method-assign]
        for ref in (digest, "archive"):
            with pytest.raises(BotError, match="tampered"):
                sol.load_template(bot, ref)
