"""An old primary rejoining after divergence: it holds entries past the point where the new
primary's log continues differently; once it follows the new primary its files are byte for
byte the new primary's, down to the previous-entry link of the first entry after the cut,
and `zerostack zdb check` on them finds nothing and changes nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import ProcessGroup, free_port
from tests.zdb.conftest import ZdbProcess, ZdbStarter
from tests.zdb.replication.helpers import REPL_AUTH, files, info, wait_identical, wait_until
from tests.zdb.replication.test_terms import promote, restart
from zerostack.cli.zdb import app
from zerostack.zdb.engine.format import DATA_ENTRY, data_name
from zerostack.zdb.engine.raw import DHEAD


def entries(path: Path) -> list[tuple[int, int]]:
    """(offset, previous-entry link) of every entry of a data file."""
    raw = path.read_bytes()
    out, off = [], DHEAD
    while off + DATA_ENTRY.size <= len(raw):
        kl, ln, prev, _crc, _flags, _ts = DATA_ENTRY.unpack_from(raw, off)
        out.append((off, prev))
        off += DATA_ENTRY.size + kl + ln
    return out


def position(node: ZdbProcess, ns: str) -> tuple[int, int]:
    fid, off = info(node)[f"position_{ns}"].split(":")
    return int(fid), int(off)


def test_old_primary_rejoins_byte_identical_and_check_is_clean(
        zdb_start: ZdbStarter, procs: ProcessGroup) -> None:
    ports = [free_port(), free_port()]
    common = ["--datasize", "64K", *REPL_AUTH]
    p = zdb_start("--peers", f"127.0.0.1:{ports[1]}", "--advertise", f"127.0.0.1:{ports[0]}",
                  *common, port=ports[0])
    r = zdb_start("--replica-of", f"127.0.0.1:{ports[0]}", "--peers", f"127.0.0.1:{ports[0]}",
                  "--advertise", f"127.0.0.1:{ports[1]}", *common, port=ports[1])
    wait_until(lambda: info(p).get("connected_replicas") == "1", 20, "replica attached")
    cp = p.client()
    cp.execute_command("NSNEW", "big")
    cp.execute_command("NSNEW", "seq")
    cp.execute_command("NSSET", "seq", "mode", "seq")
    cs = p.client()
    cs.execute_command("SELECT", "seq")
    for i in range(10):
        cs.execute_command("SET", "", f"s{i}")
    cs.execute_command("DEL", (3).to_bytes(8, "little"))
    # The common part ends with an overwrite in default, in the middle of a data file in
    # big (its tails cross into further files), and with a delete in seq.
    for i in range(20):
        cp.execute_command("SET", f"k{i}", f"v{i}")
    cp.execute_command("DEL", "k3")
    cp.execute_command("SET", "k1", "again")
    cp.execute_command("SELECT", "big")
    for i in range(45):
        cp.execute_command("SET", f"b{i}", b"%d" % i * 700)
    wait_identical(p, r)
    cut = {ns: position(r, ns) for ns in ("default", "big", "seq")}
    r.proc.kill()
    r.proc.wait(10)
    # The old primary goes on alone: these entries are past the cut.
    cp = p.client()
    cp.execute_command("SET", "k1", "old-primary")
    cp.execute_command("DEL", "k2")
    cp.execute_command("SET", "old-only", "x")
    cp.execute_command("SELECT", "big")
    for i in range(30):
        cp.execute_command("SET", f"b{i}", b"old" * 600)
    cp.execute_command("SELECT", "seq")
    for i in range(5):
        cp.execute_command("SET", "", f"old{i}")
    os.kill(p.proc.pid, signal.SIGSTOP)
    try:
        r = restart(procs, r)
        assert promote(r, "FORCE") == b"OK"  # alone of two: only FORCE promotes
        cr = r.client()
        cr.execute_command("SET", "k2", "new-primary")
        cr.execute_command("DEL", "k1")
        cr.execute_command("SELECT", "big")
        for i in range(12):
            cr.execute_command("SET", f"n{i}", b"new" * 500)
        cr.execute_command("SELECT", "seq")  # (the promotion skipped sequential keys)
        for i in range(3):
            cr.execute_command("SET", "", f"new{i}")
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    # The new primary announces its term: the old one is fenced, cuts its tail, follows.
    wait_until(lambda: info(p).get("role") == "replica" and info(p).get("link") == "online",
               30, "the old primary follows the new one")
    wait_identical(p, r)
    assert "entries_dropped" in p.log.read_text()
    for ns, (fid, off) in cut.items():
        path = p.data / ns / data_name(fid)
        found = entries(path)
        after = [prev for o, prev in found if o == off]
        assert after, f"{ns}: no entry starts at the cut {fid}:{off}"
        before = [o for o, _prev in found if o < off]
        expected = before[-1] if before else 0
        assert after[0] == expected, (ns, after[0], expected)
        assert path.read_bytes() == (r.data / ns / data_name(fid)).read_bytes()
    assert p.client().execute_command("GET", "k1") is None
    assert p.client().execute_command("GET", "k2") == b"new-primary"
    assert p.client().execute_command("GET", "old-only") is None
    # Stopped: check finds nothing on either node, and without --repair changes nothing.
    for node in (p, r):
        node.proc.terminate()
        node.proc.wait(20)
    for node in (p, r):
        snapshot = files(node)
        out = CliRunner().invoke(app, ["check", "--data", str(node.data), "--index",
                                       str(node.index)])
        assert out.exit_code == 0, out.output
        assert "everything is consistent" in out.stdout, out.stdout
        assert files(node) == snapshot
