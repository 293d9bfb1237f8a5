"""Hostile log requests against a real node agent running real runc containers: traversal
names, links planted by a container in its writable layer and volume, links and FIFOs in
place of the log files, and a log past the read bound."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProcessGroup, free_port, wait_for_port, zerostack_cmd
from tests.node.harness import Grid
from tests.node.runtime.conftest import Env
from tests.node.runtime.test_provisioner import _unmount_under
from zerostack.crypto import Identity, open_sealed, save_identity
from zerostack.node.runtime import ContainerRuntime, encode_request, sign_log_request
from zerostack.node.runtime.logs import READ_MAX

RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (stdout|stderr|shim) .*")
CHATTY_LINES = 120_000  # ~4.5 MB of records: past the bound and past one rotation


@dataclass
class Tenants:
    """One node; Alice runs a hostile `box` (plus a volume) and a `chatty` container, Bob
    runs `other`. `secret` is a root-only host file outside the node."""

    grid: Grid
    url: str
    data: Path
    runtime: ContainerRuntime
    alice: Identity
    alice_cid: int
    bob_cid: int
    secret: Path
    secret_text: str
    tmp: Path

    def container(self, cid: int, name: str) -> str:
        public = json.loads((self.data / "identity.key").read_text())["public"]
        return f"zs-{public[:10]}-c{cid}-{name}"

    def ask(self, workload: str, tail: int = 200, cid: int | None = None
            ) -> tuple[int, dict[str, Any], str | None]:
        """Alice's signed `GET /logs`: (status, body, opened text or None)."""
        req = sign_log_request(self.alice, self.alice_cid if cid is None else cid, workload,
                               tail)
        resp = httpx.get(f"{self.url}/logs", params={"request": encode_request(req)},
                         timeout=60)
        body = resp.json()
        text = None
        if "sealed" in body:
            text = open_sealed(self.alice, base64.b64decode(body["sealed"])).decode()
        return resp.status_code, body, text


def _wait(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def tenants(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    tmp = tmp_path_factory.mktemp("logpaths")
    procs = ProcessGroup()
    grid = Grid(procs, tmp)
    port = free_port()
    proc, _, data = grid.start_node("lnode", "--status-port", str(port), "--cpu", "8")
    runtime = ContainerRuntime(data / "containers")
    secret_text = f"HOST-SECRET-{uuid.uuid4().hex}"
    secret = tmp / "host-secret"
    secret.write_text(secret_text + "\n")
    secret.chmod(0o600)
    try:
        node = grid.node_id(data, proc)
        wait_for_port(port, proc=proc)
        alice, alice_twin = grid.user()
        bob, bob_twin = grid.user()
        image = {"flist": f"{env.hub}/{env.image.hash}", "publishers": [env.publisher.public_hex],
                 "memory": "32M"}
        # The links a hostile process can plant: in its own writable layer (`/logs`, which
        # is `<container dir>/layer/upper/logs` on the host) and in its volume.
        plant = (f"mkdir -p /logs /data/logs; ln -s {secret} /logs/container.log; "
                 f"ln -s {data}/identity.key /logs/container.log.1; "
                 f"ln -s {secret} /data/logs/container.log; ")
        alice_cid, _ = grid.deploy(alice, alice_twin, [
            {"type": "volume", "name": "vol", "size": "20M"},
            {"type": "container", "name": "box", **image,
             "mounts": [{"volume": "vol", "mountpoint": "/data"}],
             "args": [plant + "echo box-own-line; trap 'exit 0' TERM; sleep 100000 & wait"]},
            {"type": "container", "name": "chatty", **image,
             "args": [f"seq 1 {CHATTY_LINES}; trap 'exit 0' TERM; sleep 100000 & wait"]},
        ], node)
        bob_cid, _ = grid.deploy(bob, bob_twin, [
            {"type": "container", "name": "other", **image,
             "args": ["echo bob-private-line; trap 'exit 0' TERM; sleep 100000 & wait"]},
        ], node)
        for cid in (alice_cid, bob_cid):
            c = grid.wait_contract(cid, {"deployed", "error"}, timeout=90)
            assert c["state"] == "deployed", c["report"]
        t = Tenants(grid, f"http://127.0.0.1:{port}", data, runtime, alice, alice_cid,
                    bob_cid, secret, secret_text, tmp)
        _wait(lambda: any(line.endswith("box-own-line")
                          for line in runtime.logs(t.container(alice_cid, "box"))), "box")
        _wait(lambda: (data / "containers" / "containers" / t.container(alice_cid, "box")
                       / "layer" / "upper" / "logs" / "container.log").is_symlink(),
              "the planted link")
        yield t
    finally:
        procs.stop_all()
        for left in runtime.ids():
            runtime.delete(left)
        _unmount_under(data)


TRAVERSALS = {
    "other-tenant": "{box}/../{other}",
    "writable-layer": "box/layer/upper",  # `/logs` of the container itself
    "volume": "box/../../../volumes/c{alice}-vol",
    "dotdot": "../..",
    "absolute": "/etc",
    "trailing-slash": "box/",
    "nul": "box\x00",
    "newline": "box\n",
    "overlong": "a" * 64,  # one past the name pattern's length
    "huge": "a" * 5000,
    "empty": "",
    "uppercase": "Box",
}


@pytest.mark.parametrize("template", list(TRAVERSALS.values()), ids=list(TRAVERSALS))
def test_a_traversal_name_is_refused_and_reads_nothing(tenants: Tenants, template: str) -> None:
    t = tenants
    workload = template.format(box="box", other=t.container(t.bob_cid, "other"),
                               alice=t.alice_cid)
    status, body, text = t.ask(workload)
    assert status == 400, body
    assert "invalid workload name" in body["error"] and text is None
    # The same request for the real name works: the refusal was the name's.
    ok_status, _, own = t.ask("box")
    assert ok_status == 200 and own is not None and "box-own-line" in own
    assert t.secret_text not in own


def test_the_cli_refuses_a_traversal_to_another_tenant(tenants: Tenants) -> None:
    t = tenants
    home = t.tmp / "home"
    save_identity(t.alice, home / "identities" / "alice.key", "alice")
    name = f"box/../{t.container(t.bob_cid, 'other')}"
    proc = subprocess.run([*zerostack_cmd(), "logs", str(t.alice_cid), name, "--node", t.url,
                           "--identity", "alice"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ZEROSTACK_HOME": str(home), "COLUMNS": "300"})
    assert proc.returncode != 0 and "invalid workload name" in proc.stderr
    assert "bob-private-line" not in proc.stdout + proc.stderr


def test_links_and_fifos_in_place_of_log_files_are_not_followed(tenants: Tenants) -> None:
    """As if a container could reach its log directory: what sits at the log names is
    never followed; the owner gets an error, never the host file."""
    t = tenants
    logs = t.data / "containers" / "containers" / t.container(t.alice_cid, "box") / "logs"
    kept = logs.with_name("logs.kept")
    fake = t.tmp / "fake-logs"
    fake.mkdir(mode=0o700, exist_ok=True)
    (fake / "container.log").write_text(t.secret_text + "\n")

    def refused(why: str) -> None:
        status, body, text = t.ask("box")
        assert status == 403 and text is None, (why, body)
        assert t.secret_text not in json.dumps(body)

    os.rename(logs / "container.log", logs / "kept.log")
    try:
        os.symlink(t.secret, logs / "container.log")
        refused("current log file is a link")
        os.unlink(logs / "container.log")
        os.mkfifo(logs / "container.log", 0o600)
        refused("current log file is a FIFO")  # and answered: the node did not block
        os.unlink(logs / "container.log")
    finally:
        if os.path.lexists(logs / "container.log"):
            os.unlink(logs / "container.log")
        os.rename(logs / "kept.log", logs / "container.log")
    os.symlink(t.data / "identity.key", logs / "container.log.1")
    try:
        refused("a rotated log file is a link to the node's key")
    finally:
        os.unlink(logs / "container.log.1")
    os.rename(logs, kept)
    try:
        os.symlink(fake, logs)
        refused("the log directory is a link")
    finally:
        if logs.is_symlink():
            os.unlink(logs)
        os.rename(kept, logs)
    status, _, text = t.ask("box")
    assert status == 200 and text is not None and "box-own-line" in text


def test_a_log_past_the_bound_is_cut_from_its_start(tenants: Tenants) -> None:
    t = tenants

    def complete() -> str | None:
        status, _, text = t.ask("chatty", tail=0)
        assert status == 200
        return text if text and text.endswith(f"stdout {CHATTY_LINES}") else None

    text = _wait(complete, "all of chatty's lines")
    logs = t.data / "containers" / "containers" / t.container(t.alice_cid, "chatty") / "logs"
    on_disk = sum(p.stat().st_size for p in logs.iterdir())
    assert on_disk > 3 * READ_MAX and (logs / "container.log.1").exists()
    assert READ_MAX - 100 < len(text.encode()) <= READ_MAX
    lines = text.split("\n")
    assert all(RECORD.fullmatch(line) for line in lines), "a cut line was returned"
    numbers = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert numbers == list(range(numbers[0], CHATTY_LINES + 1)) and numbers[0] > 1
    status, _, last = t.ask("chatty", tail=3)
    assert status == 200 and last is not None
    assert [int(x.rsplit(" ", 1)[1]) for x in last.split("\n")] == [
        CHATTY_LINES - 2, CHATTY_LINES - 1, CHATTY_LINES]
