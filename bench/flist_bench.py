"""Images and containers benchmark.

1. Materializing an image from the hub (manifest fetch, signature check, every chunk
   fetched and its hash verified, files written, cache sealed) vs `tar -x` of a tarball of
   the same files, in the same run. Ratio = tar time / our time (target >= 0.5).
2. Container start latency with a warm image cache: the container provisioner's
   `provision` (cached manifest's signature re-checked against the allowed publishers,
   cache seal checked, OCI config written, shim and runc started) until the container
   runs and is reported `ok` (target p50 <= 1 s).

    .venv/bin/python -m bench.flist_bench [--files 3000] [--mib 200] [--starts 20] [--json]

Needs root (runc, mounts). Starts its own `zerostack zdb` hub on loopback.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import approve_until_ok, percentile, wait_node
from zerostack.crypto import Identity
from zerostack.flist import (
    Hub,
    ImageCache,
    ImageConfig,
    LocalStore,
    SignedFlist,
    build_dir,
    push_flist,
)
from zerostack.grid import remove_tree
from zerostack.node.provisioners import NodeContext, WorkloadID
from zerostack.node.provisioners.container import ContainerProvisioner
from zerostack.workloads import ContainerWorkload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_hub(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).parent / "zerostack"
    proc = subprocess.Popen([str(exe), "zdb", "--listen", "127.0.0.1", "--port", str(port),
                             "--data", str(workdir / "hub-data"), "--index", str(workdir / "hub-index")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the hub did not start")


def make_tree(root: Path, files: int, total_mib: int, seed: int = 7) -> int:
    """An image-like tree: mostly small files, some medium, a few large; incompressible."""
    rng = random.Random(seed)
    budget = total_mib << 20
    sizes = []
    for i in range(files):
        r = rng.random()
        sizes.append(rng.randint(100, 16 << 10) if r < 0.8 else
                     rng.randint(16 << 10, 512 << 10) if r < 0.98 else rng.randint(1 << 20, 8 << 20))
        if i == files - 1:
            break
    scale = budget / sum(sizes)
    written = 0
    for i, size in enumerate(sizes):
        d = root / f"d{i % 60:02d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        n = max(1, int(size * scale))
        (d / f"f{i}.bin").write_bytes(rng.randbytes(n))
        written += n
    shutil.copy2("/bin/busybox", root / "busybox")
    (root / "bin").mkdir(exist_ok=True)
    os.symlink("../busybox", root / "bin" / "sh")
    os.symlink("../busybox", root / "bin" / "sleep")
    return written


def drop_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def bench_materialize(tmp: Path, hub: str, rounds: int, files: int, mib: int,
                      reference_hub: str = "") -> dict[str, Any]:
    src = tmp / "src"
    size = make_tree(src, files, mib)
    ident = Identity.generate()
    store = LocalStore(tmp / "store")
    manifest, _ = build_dir(src, store, ImageConfig(entrypoint=("/bin/sh",)))
    flist = SignedFlist.sign(manifest, ident)
    hubs = {"zdb": hub, **({"redis": reference_hub} if reference_hub else {})}
    for address in hubs.values():
        with Hub(address) as h:
            push_flist(flist, store, h)
    tarball = tmp / "image.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(src), "."], check=True)
    times: dict[str, list[float]] = {"tar": [], **{name: [] for name in hubs}}
    check = 0.0
    def run_tar(i: int) -> None:
        dest = tmp / f"tar-{i}"
        dest.mkdir()
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)
        times["tar"].append(time.perf_counter() - t0)
        drop_dir(dest)

    for i in range(rounds):
        # Alternate who goes first, and flush dirty pages before each timed step, so
        # neither pays for the other's write-back.
        if i % 2 == 0:
            run_tar(i)
        for name, address in hubs.items():
            cache = ImageCache(tmp / f"cache-{name}-{i}")
            os.sync()
            t0 = time.perf_counter()
            with Hub(address) as h:
                cache.fetch(h, flist.hash_hex, [ident.public_hex])
            times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cache.check(flist.hash_hex)
            check = time.perf_counter() - t0
            drop_dir(tmp / f"cache-{name}-{i}")
        if i % 2 == 1:
            run_tar(i)
    med = {name: statistics.median(v) for name, v in times.items()}
    out: dict[str, Any] = {
        "files": len(manifest.entries), "bytes": size, "chunks": len(manifest.chunk_hashes()),
        "ours_s": times["zdb"], "tar_s": times["tar"], "ours_median_s": med["zdb"],
        "tar_median_s": med["tar"], "ours_mib_s": size / med["zdb"] / (1 << 20),
        "tar_mib_s": size / med["tar"] / (1 << 20),
        "ratio_tar_over_ours": med["tar"] / med["zdb"], "seal_check_s": check}
    if "redis" in med:
        out.update({"redis_hub_s": times["redis"], "redis_hub_median_s": med["redis"],
                    "ratio_tar_over_ours_redis_hub": med["tar"] / med["redis"]})
    return out


def bench_start(tmp: Path, hub: str, starts: int) -> dict[str, Any]:
    from tests.flist.image import busybox_rootfs  # the same tiny image the tests use

    ident = Identity.generate()
    store = LocalStore(tmp / "store-bb")
    manifest, _ = build_dir(busybox_rootfs(tmp / "bb"), store, ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, ident)
    with Hub(hub) as h:
        push_flist(flist, store, h)
    prov = ContainerProvisioner(NodeContext(tmp / "node", Identity.generate()))
    spec = ContainerWorkload(name="bench", flist=f"{hub}/{flist.hash_hex}",
                             publishers=[ident.public_hex],
                             args=["trap 'exit 0' TERM; sleep 1000 & wait"])
    prov.provision(WorkloadID(0, "warm"), spec, None)  # warms the cache
    prov.deprovision(WorkloadID(0, "warm"), spec)
    times: list[float] = []
    for i in range(starts):
        wid = WorkloadID(1, f"c{i}")
        t0 = time.perf_counter()
        done = prov.provision(wid, spec, None)
        times.append(time.perf_counter() - t0)
        assert done.data["state"] == "ok", done.data
        prov.deprovision(wid, spec)
    times.sort()
    return {"starts": starts, "times_s": times, "p50_s": statistics.median(times),
            "p90_s": percentile(times, 90), "max_s": times[-1], "min_s": times[0]}


def bench_contract(tmp: Path, hub: str, contracts: int) -> dict[str, Any]:
    """Approval completing the quorum -> the node's signed report with the container `ok`,
    through a real ledger and node agent, image already in the node's cache."""
    from tests.flist.image import busybox_rootfs

    from zerostack.bot import ThreeBot
    from zerostack.ledger import LedgerClient
    from zerostack.node.runtime import ContainerRuntime

    publisher = Identity.generate()
    store = LocalStore(tmp / "store-c")
    manifest, _ = build_dir(busybox_rootfs(tmp / "bbc"), store,
                            ImageConfig(entrypoint=("/bin/sh", "-c")))
    flist = SignedFlist.sign(manifest, publisher)
    with Hub(hub) as h:
        push_flist(flist, store, h)
    cli = [sys.executable, "-m", "zerostack.cli.main"]
    lport = free_port()
    url = f"http://127.0.0.1:{lport}"
    procs: list[subprocess.Popen[bytes]] = []
    runtime = ContainerRuntime(tmp / "cnode" / "containers")
    try:
        log = open(tmp / "ledger.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen([*cli, "ledger", "serve", "--db", str(tmp / "l.db"),
                                       "--listen", f"127.0.0.1:{lport}"],
                                      stdout=log, stderr=log, start_new_session=True))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", lport), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client = LedgerClient(url)
        farmer, owner, holder = Identity.generate(), Identity.generate(), Identity.generate()
        client.register_twin(farmer)
        farm = client.create_farm(farmer, "flistbench")
        client.register_twin(owner)
        holder_twin = client.register_twin(holder)
        nlog = open(tmp / "node.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [*cli, "node", "run", "--ledger", url, "--farm", str(farm), "--data",
             str(tmp / "cnode"), "--zdb-port", str(free_port()), "--resync", "30"],
            stdout=nlog, stderr=nlog, start_new_session=True))
        node = wait_node(client, farm, timeout=60)
        bot = ThreeBot(url, owner)
        holder_bot = ThreeBot(url, holder)
        latencies: list[float] = []
        for i in range(contracts + 1):  # the first one warms the image cache
            dep = bot.build({"workloads": [{
                "type": "container", "name": "app", "flist": f"{hub}/{flist.hash_hex}",
                "publishers": [publisher.public_hex], "memory": "32M",
                "args": ["trap 'exit 0' TERM; sleep 1000 & wait"]}]},
                [f"{holder_twin}:1:required"], None)
            cid = bot.deploy(dep, node)
            took = approve_until_ok(client, holder_bot, cid, dep.hash(), timeout=30)
            if i:
                latencies.append(took)
            client.cancel(owner, cid)
        bot.close()
        holder_bot.close()
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for cid_left in runtime.ids():
            runtime.delete(cid_left)
        with open("/proc/self/mountinfo") as f:
            for point in [ln.split()[4] for ln in f if str(tmp) in ln.split()[4]]:
                subprocess.run(["umount", "-l", point], check=False)
    latencies.sort()
    return {"contracts": contracts, "latencies_s": latencies,
            "p50_s": statistics.median(latencies),
            "p90_s": percentile(latencies, 90), "max_s": max(latencies)}


def print_materialize(mat: dict[str, Any]) -> None:
    print(f"materialize {mat['files']} paths, {mat['bytes'] / (1 << 20):.0f} MiB, "
          f"{mat['chunks']} chunks (median of {len(mat['ours_s'])}):")
    print(f"  zerostack fetch+verify: {mat['ours_median_s']:.2f} s ({mat['ours_mib_s']:.0f} MiB/s)")
    print(f"  tar -x:                 {mat['tar_median_s']:.2f} s ({mat['tar_mib_s']:.0f} MiB/s)")
    print(f"  ratio tar/ours: {mat['ratio_tar_over_ours']:.2f} (target >= 0.5); "
          f"seal check {mat['seal_check_s'] * 1000:.0f} ms")
    if "redis_hub_median_s" in mat:
        print(f"  same client, redis-server as hub: {mat['redis_hub_median_s']:.2f} s, "
              f"ratio {mat['ratio_tar_over_ours_redis_hub']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--contracts", type=int, default=10)
    ap.add_argument("--reference-hub", action="store_true",
                    help="Also materialize from a redis-server hub, to separate the hub's "
                         "speed from the client's.")
    ap.add_argument("--containers-only", action="store_true",
                    help="Skip the materialize figures (what bench.isolation_bench runs).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (runc, mounts)")
    tmp = Path(tempfile.mkdtemp(prefix="zs-flist-bench-"))
    hub_proc, hub = start_hub(tmp)
    ref_proc: subprocess.Popen[bytes] | None = None
    ref_hub = ""
    if args.reference_hub:
        port = free_port()
        ref_proc = subprocess.Popen(["redis-server", "--save", "", "--port", str(port),
                                     "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        ref_hub = f"127.0.0.1:{port}"
    try:
        mat = ({} if args.containers_only else
               bench_materialize(tmp, hub, args.rounds, args.files, args.mib, ref_hub))
        start = bench_start(tmp, hub, args.starts)
        contract = bench_contract(tmp, hub, args.contracts)
    finally:
        for p in (hub_proc, ref_proc):
            if p is not None:
                p.kill()
                p.wait()
        remove_tree(tmp)  # stops what a failed round left running; never through a mount
    if args.json:
        sys.stdout.write(orjson.dumps({"materialize": mat, "start": start, "contract": contract},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if mat:
        print_materialize(mat)
    print(f"container start, warm cache ({start['starts']} starts): p50 {start['p50_s'] * 1000:.0f} ms, "
          f"p90 {start['p90_s'] * 1000:.0f} ms, max {start['max_s'] * 1000:.0f} ms (target p50 <= 1 s)")
    print(f"approval -> report ok, warm cache ({contract['contracts']} contracts): "
          f"p50 {contract['p50_s'] * 1000:.0f} ms, p90 {contract['p90_s'] * 1000:.0f} ms, "
          f"max {contract['max_s'] * 1000:.0f} ms (target p50 <= 1 s)")


if __name__ == "__main__":
    main()
