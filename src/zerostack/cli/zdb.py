"""`zerostack zdb`: run a Zero-DB server with the reference 0-db's flags; `zerostack demo`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from zerostack.cli.output import console, fail, print_json, print_table, styled

if TYPE_CHECKING:
    from zerostack.zdb.server import ServerConfig

app = typer.Typer(
    help="Run a Zero-DB server (Redis protocol, always-append, compatible with 0-db v2).",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, option: str) -> int:
    """Bytes from `4096`, `1M`, `256M`, `1G` (binary units, optional `B`/`iB`)."""
    match = _SIZE.match(text)
    if match is None:
        fail(f"{option}: invalid size {text!r} (use bytes or a unit: 64K, 1M, 256M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@app.callback()
def serve(
    ctx: typer.Context,
    listen: str = typer.Option("0.0.0.0", "--listen", help="Address to listen on (TCP)."),
    port: int = typer.Option(9900, "--port", help="TCP port to listen on."),
    socket_path: Path | None = typer.Option(
        None, "--socket", help="Listen on this unix socket instead of TCP."),
    data: Path = typer.Option(Path("./zdb-data"), "--data", help="Data files directory."),
    index: Path = typer.Option(Path("./zdb-index"), "--index", help="Index files directory."),
    mode: str = typer.Option(
        "mix", "--mode", help="user (own keys), seq (server-assigned keys) or mix (per namespace)."),
    datasize: str = typer.Option(
        "256M", "--datasize", help="Rotate to a new data/index file pair past this size."),
    admin: str | None = typer.Option(
        None, "--admin", envvar="ZEROSTACK_ZDB_ADMIN", show_envvar=True,
        help="Admin password; without it every client is admin."),
    protect: bool = typer.Option(
        False, "--protect", help="Guard 'default' with the admin password (read-only otherwise)."),
    maxsize: str | None = typer.Option(
        None, "--maxsize", help="Default size limit of new namespaces (e.g. 1G)."),
    sync: bool = typer.Option(False, "--sync", help="fsync every write before answering."),
    synctime: int = typer.Option(
        0, "--synctime", help="fsync at most every SECS seconds (instead of --sync)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every client connection."),
    replica_of: str | None = typer.Option(
        None, "--replica-of", help="Follow the primary at HOST:PORT (read-only until promoted)."),
    primary_auth: str | None = typer.Option(
        None, "--primary-auth", envvar="ZEROSTACK_ZDB_PRIMARY_AUTH", show_envvar=True,
        help="The primary's admin password (with --replica-of)."),
    replication_password: str | None = typer.Option(
        None, "--replication-password", envvar="ZEROSTACK_ZDB_REPLICATION_PASSWORD",
        show_envvar=True,
        help="Password replicas and peers authenticate with (besides --admin); also used "
             "to reach the primary when --primary-auth is not given."),
    peers: str | None = typer.Option(
        None, "--peers",
        help="The other nodes of the replica set, HOST:PORT[,HOST:PORT...]: PROMOTE needs "
             "a majority of them and this node."),
    advertise: str | None = typer.Option(
        None, "--advertise",
        help="HOST:PORT the other nodes reach this one at (default: --listen:--port)."),
    min_replicas: str = typer.Option(
        "0", "--min-replicas",
        help="Acknowledge writes only once N replicas hold them; 'majority': half the "
             "replica set (--peers), rounded down."),
    min_replicas_timeout: float = typer.Option(
        10.0, "--min-replicas-timeout",
        help="Seconds to wait for --min-replicas before answering a write with an error."),
    failover_etcd: str | None = typer.Option(
        None, "--failover-etcd",
        help="Automatic failover: etcd URLs http://HOST:PORT[,...]. The primary holds an "
             "etcd lease and takes writes only while it holds it; when it expires, the most "
             "advanced live node takes over by vote. Needs --peers."),
    failover_ttl: int = typer.Option(
        2, "--failover-ttl", help="Seconds of the etcd lease (2 to 300)."),
    failover_margin: float = typer.Option(
        0.5, "--failover-margin",
        help="Seconds before its lease could end that the primary stops taking writes."),
    failover_name: str = typer.Option(
        "default", "--failover-name",
        help="Name of the replica set in etcd (the same on each of its nodes)."),
    client_output_pause: str = typer.Option(
        "1M", "--client-output-pause",
        help="Stop running a client's requests while this many reply bytes wait to be sent "
             "to it; go on as it reads them."),
    client_output_limit: str = typer.Option(
        "64M", "--client-output-limit",
        help="Disconnect a client once this many reply bytes wait for it (0: never)."),
) -> None:
    """Run a Zero-DB server until Ctrl-C, SIGTERM or STOP."""
    if ctx.invoked_subcommand is not None:
        return
    from zerostack.zdb.engine import EngineConfig, Mode
    from zerostack.zdb.replication import ReplicationConfig
    from zerostack.zdb.server import ServerConfig

    modes = {"user": Mode.USER, "seq": Mode.SEQ, "mix": Mode.MIXED, "mixed": Mode.MIXED}
    if mode.lower() not in modes:
        fail(f"--mode: expected user, seq or mix, got {mode!r}")
    if sync and synctime:
        fail("--sync and --synctime exclude each other: choose one sync policy")
    if synctime < 0:
        fail("--synctime must be a positive number of seconds")
    if protect and not admin:
        fail("--protect needs --admin: the default namespace is guarded by the admin password")
    if not 0 <= port <= 65535:
        fail(f"--port {port} is not a TCP port")
    majority = min_replicas.strip().lower() == "majority"
    if not majority and not min_replicas.strip().isdigit():
        fail(f"--min-replicas: expected a number or 'majority', got {min_replicas!r}")
    replicas_needed = 0 if majority else int(min_replicas)
    if min_replicas_timeout <= 0:
        fail("--min-replicas must be >= 0 and --min-replicas-timeout > 0")
    peer_list = [_host_port(p.strip(), "--peers") for p in (peers or "").split(",") if p.strip()]
    if len(peer_list) > 64:
        fail("--peers: at most 64 nodes")
    if majority and not peer_list:
        fail("--min-replicas majority needs --peers (the replica set)")
    if advertise:
        _host_port(advertise, "--advertise")
    elif socket_path is None:
        advertise = f"{listen if listen not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    output_pause = parse_size(client_output_pause, "--client-output-pause")
    output_limit = parse_size(client_output_limit, "--client-output-limit")
    if output_pause <= 0:
        fail("--client-output-pause must be more than 0 bytes")
    if output_limit and output_limit < output_pause:
        fail("--client-output-limit must be 0 (no limit) or at least --client-output-pause")
    primary = _host_port(replica_of, "--replica-of") if replica_of else None
    if primary_auth and not primary:
        fail("--primary-auth goes with --replica-of")
    engine = EngineConfig(
        data_dir=data, index_dir=index, mode=modes[mode.lower()],
        datasize=parse_size(datasize, "--datasize"), sync=sync, synctime=synctime,
        maxsize=parse_size(maxsize, "--maxsize") if maxsize else 0,
    )
    failover = None
    if failover_etcd:
        from zerostack.zdb.replication.failover import (
            FailoverConfig,
            FailoverError,
            parse_urls,
        )
        try:
            failover = FailoverConfig(urls=parse_urls(failover_etcd), ttl=failover_ttl,
                                      margin=failover_margin, name=failover_name)
            failover.check()
        except FailoverError as exc:
            fail(str(exc))
        if not peer_list:
            fail("--failover-etcd needs --peers: the new primary is elected by a majority "
                 "of the replica set")
        if socket_path is not None:
            fail("--failover-etcd needs a TCP address (--listen/--port) the peers reach")
    replication = ReplicationConfig(password=replication_password or None, peers=peer_list,
                                    advertise=advertise or "", majority=majority,
                                    failover=failover)
    config = ServerConfig(engine=engine, listen=listen, port=port, socket_path=socket_path,
                          admin_password=admin or None, protect=protect, replica_of=primary,
                          primary_auth=primary_auth or None, min_replicas=replicas_needed,
                          replication=replication,
                          min_replicas_timeout=min_replicas_timeout,
                          output_pause=output_pause, output_limit=output_limit)
    _run(config, verbose)


def _host_port(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"{option}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _run(config: ServerConfig, verbose: bool) -> None:
    from zerostack.zdb.engine import ZdbError
    from zerostack.zdb.server import run_forever, setup_logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    try:
        run_forever(config)
    except ZdbError as exc:
        fail(f"cannot open the Zero-DB data: {exc}")
    except OSError as exc:
        fail(f"cannot start Zero-DB: {exc}")
    except KeyboardInterrupt:
        pass


@app.command("demo")
def demo(
    port: int = typer.Option(9900, "--port", help="TCP port on 127.0.0.1."),
    home: Path = typer.Option(Path("./var/zdb"), "--dir", help="Where the demo keeps its data."),
) -> None:
    """Start a local Zero-DB (data under ./var/zdb) and show how to talk to it."""
    from zerostack.zdb.engine import EngineConfig, Mode
    from zerostack.zdb.server import ServerConfig

    data, index = home / "data", home / "index"
    console.print(styled(
        ("Zero-DB", "bold"), " on ", (f"127.0.0.1:{port}", "cyan"),
        f", data in {data}, index in {index}\n\n"
        f"  redis-cli -p {port} SET hello world\n"
        f"  redis-cli -p {port} GET hello\n"
        f"  redis-cli -p {port} NSNEW photos\n\n"
        "  python: import redis\n"
        f"          r = redis.Redis(port={port})\n"
        "          r.set('hello', 'world'); print(r.get('hello'))\n\n"
        "Ctrl-C stops it; the data stays for the next run."),
        highlight=False,
    )
    engine = EngineConfig(data_dir=data, index_dir=index, mode=Mode.MIXED)
    _run(ServerConfig(engine=engine, listen="127.0.0.1", port=port), verbose=False)


# -- operating a running server ------------------------------------------------------------

HOST = typer.Option("127.0.0.1", "--host", help="Server address.")
PORT = typer.Option(9900, "--port", help="Server TCP port.")
PASSWORD = typer.Option(None, "--password", envvar="ZEROSTACK_ZDB_ADMIN", show_envvar=True,
                        help="Admin password of the server.")


def _client(host: str, port: int, password: str | None) -> Any:
    import redis

    r = redis.Redis(host=host, port=port, socket_timeout=30)
    r.response_callbacks.clear()
    try:
        if password:
            r.execute_command("AUTH", password)
        r.execute_command("PING")
    except redis.RedisError as exc:
        fail(f"cannot talk to Zero-DB at {host}:{port}: {exc}")
    return r


def parse_info(text: str) -> dict[str, dict[str, str]]:
    """INFO text -> {section: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    section = out.setdefault("", {})
    for line in text.splitlines():
        if line.startswith("# "):
            section = out.setdefault(line[2:].strip(), {})
        elif ": " in line:
            key, value = line.split(": ", 1)
            section[key] = value
    return out


def replication_status(info: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The `# replication` section of INFO as structured data (for `status --json`)."""
    rep = info.get("replication", {})
    status: dict[str, Any] = {"role": rep.get("role", "primary"), "replicas": []}
    if status["role"] == "replica":
        status["primary"] = rep.get("primary")
        status["link"] = rep.get("link")
        status["lag_bytes"] = int(rep.get("lag_bytes", "-1"))
        status["lag_seconds"] = float(rep.get("lag_seconds", "-1"))
        status["positions"] = {k[len("position_"):]: v for k, v in rep.items()
                               if k.startswith("position_")}
        if "link_error" in rep:
            status["link_error"] = rep["link_error"]
    for key, value in rep.items():
        if key.startswith("replica") and key[7:].isdigit():
            fields = dict(part.split("=", 1) for part in value.split() if "=" in part)
            status["replicas"].append({
                "name": fields.get("name"), "peer": fields.get("peer"),
                "lag_bytes": int(fields.get("lag_bytes", "0")),
                "lag_seconds": float(fields.get("lag_seconds", "0")),
                "last_ack_age": float(fields.get("last_ack_age", "0")),
                "acked": fields.get("acked", ""),
            })
    status["min_replicas"] = int(rep.get("min_replicas", "0"))
    status["term"] = int(rep.get("term", "0"))
    if "fenced" in rep:
        status["fenced"] = rep["fenced"]
    if "writes_held" in rep:
        status["writes_held"] = rep["writes_held"]
    if "failover" in rep:  # --failover-etcd
        status["etcd"] = {"key_holder": rep.get("etcd_key_holder", "-"),
                          "holding": rep.get("etcd_holding") == "yes",
                          "failovers": int(rep.get("failovers", "0") or 0)}
    return status


@app.command()
def status(
    host: str = HOST, port: int = PORT, password: str | None = PASSWORD,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a server's replication role, its replicas or primary, positions and lag."""
    r = _client(host, port, password)
    info = parse_info(r.execute_command("INFO").decode())
    st = replication_status(info)
    if as_json:
        print_json(st)
        return
    if st["role"] == "replica":
        print_table(f"Zero-DB {host}:{port}: replica of {st['primary']}",
                    ["link", "lag bytes", "lag seconds", "positions"],
                    [[st["link"], st["lag_bytes"], f"{st['lag_seconds']:.3f}",
                      " ".join(f"{k}@{v}" for k, v in st["positions"].items())]])
        if st.get("link_error"):
            console.print(f"last link error: {st['link_error']}", highlight=False)
        return
    if st.get("fenced"):
        console.print(f"fenced (refuses writes): {st['fenced']}", highlight=False,
                      markup=False)
    if st.get("writes_held"):
        console.print(f"writes held: {st['writes_held']}", highlight=False, markup=False)
    if st.get("etcd"):
        console.print(f"etcd key held by {st['etcd']['key_holder']}", highlight=False,
                      markup=False)
    print_table(f"Zero-DB {host}:{port}: primary of term {st['term']}, "
                f"{len(st['replicas'])} replica(s)"
                f"{', min-replicas ' + str(st['min_replicas']) if st['min_replicas'] else ''}",
                ["replica", "peer", "lag bytes", "lag seconds", "last ack (s ago)"],
                [[x["name"], x["peer"], x["lag_bytes"], f"{x['lag_seconds']:.3f}",
                  f"{x['last_ack_age']:.1f}"] for x in st["replicas"]])


@app.command()
def promote(
    host: str = HOST, port: int = PORT, password: str | None = PASSWORD,
    force: bool = typer.Option(
        False, "--force", help="Promote without a majority of the replica set: writes "
        "acknowledged by the old primary may be lost."),
) -> None:
    """Turn a replica into the primary of a new term, once a majority of the replica set
    (--peers) agrees; it stops following and accepts writes."""
    import redis

    from zerostack.zdb.replication.handshake import Unproven, call, escape

    request = (b"PROMOTE", *([b"FORCE"] if force else []))
    if password:  # the admin or the replication password, proven by the REPLAUTH handshake
        try:
            said = call(host, port, password, request, timeout=30)[0]
        except (OSError, Unproven) as exc:
            fail(f"{host}:{port} was not promoted: {escape(str(exc))}")
        if isinstance(said, Exception):
            fail(f"{host}:{port} was not promoted: {escape(str(said))}")
    else:
        r = _client(host, port, None)
        try:
            r.execute_command(*request)
        except redis.RedisError as exc:
            fail(f"{host}:{port} was not promoted: {exc}")
    console.print(f"{host}:{port} is now a primary", highlight=False)


@app.command()
def compact(
    data: Path = typer.Option(..., "--data", help="Data files directory (server stopped)."),
    index: Path = typer.Option(..., "--index", help="Index files directory (server stopped)."),
    namespace: list[str] = typer.Option(
        [], "--namespace", help="Namespace to compact (repeatable; default: all user-mode ones)."),
    keep_history: int | None = typer.Option(
        None, "--keep-history", help="Keep the live value and at most N older versions "
        "(default: keep all history, drop only deleted keys)."),
    datasize: str = typer.Option("256M", "--datasize", help="The server's --datasize."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rewrite namespaces of a stopped server keeping live data, and show the space reclaimed.

    For a running server use the admin command `COMPACT ns [keep]`."""
    from zerostack.zdb.engine import ZdbError
    from zerostack.zdb.engine.compact import compact_namespace
    from zerostack.zdb.engine.format import MODE_SEQ, parse_index_header

    if keep_history is not None and keep_history < 0:
        fail("--keep-history must be >= 0")
    if not index.is_dir():
        fail(f"{index} is not an index directory")
    names = namespace or sorted(p.name for p in index.iterdir() if (p / "i0").exists())
    size = parse_size(datasize, "--datasize")
    reports = []
    skipped = []
    for name in names:
        i0 = index / name / "i0"
        if not namespace and i0.exists():
            with open(i0, "rb") as f:
                try:
                    if parse_index_header(f.read(29), str(i0))[1] == MODE_SEQ:
                        skipped.append(name)
                        continue
                except ZdbError:
                    pass
        try:
            reports.append(compact_namespace(index, data, name, keep_history, size))
        except ZdbError as exc:
            fail(f"namespace {name}: {exc}")
    _new_generations(data, index, size, [r.namespace for r in reports])
    rows: list[dict[str, Any]] = [{"namespace": r.namespace, "keys": r.keys, "versions": r.versions,
             "bytes_before": r.bytes_before, "bytes_after": r.bytes_after,
             "reclaimed_bytes": r.reclaimed_bytes, "seconds": round(r.seconds, 3)}
            for r in reports]
    if as_json:
        print_json({"namespaces": rows, "skipped_sequential": skipped})
        return
    print_table("Zero-DB compaction", ["namespace", "keys", "versions", "before", "after",
                                       "reclaimed", "seconds"],
                [[x["namespace"], x["keys"], x["versions"], _human(x["bytes_before"]),
                  _human(x["bytes_after"]), _human(x["reclaimed_bytes"]), x["seconds"]]
                 for x in rows])
    total = sum(x["reclaimed_bytes"] for x in rows)
    console.print(f"reclaimed {_human(total)} ({total} bytes)", highlight=False)
    if skipped:
        console.print(f"skipped sequential namespaces (their keys are positions): "
                      f"{', '.join(skipped)}", highlight=False)


def _new_generations(data: Path, index: Path, datasize: int, names: list[str]) -> None:
    """A node of a replica set (it has a replication term file): each rewritten namespace
    starts a new generation of its log, as with an online COMPACT, so that votes never
    compare positions in the rewritten files with positions in a replica's older ones."""
    from zerostack.zdb.engine import Engine, EngineConfig
    from zerostack.zdb.replication.terms import TERM_FILE, TermError, Terms

    if not names or not (index / TERM_FILE).exists():
        return
    try:
        terms = Terms(index)
        engine = Engine(EngineConfig(data_dir=data, index_dir=index, datasize=datasize))
        try:
            for name in names:
                end = engine.namespace(name).position()
                terms.set_generation(name, terms.generation(name)[0] + 1, end)
        finally:
            engine.close()
    except TermError as exc:
        fail(f"compacted, but the replication term file was not updated: {exc}")


@app.command()
def check(
    data: Path = typer.Option(..., "--data", help="Data files directory (server stopped)."),
    index: Path = typer.Option(..., "--index", help="Index files directory (server stopped)."),
    namespace: str | None = typer.Option(None, "--namespace", help="Only this namespace."),
    repair: bool = typer.Option(
        False, "--repair", help="Cut torn tails and rebuild lost or damaged indexes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Verify every CRC and that index and data agree; say what is wrong in plain words."""
    from zerostack.zdb.engine import ZdbError
    from zerostack.zdb.engine.check import check_files

    try:
        report = check_files(index, data, namespace, repair)
    except ZdbError as exc:
        fail(str(exc))
    if as_json:
        print_json({"ok": report.ok, "namespaces": report.namespaces,
                    "data_entries": report.data_entries, "index_entries": report.index_entries,
                    "index_rebuilt": report.index_rebuilt,
                    "repaired": sum(f.repaired for f in report.findings),
                    "harmless": sum(f.harmless and not f.repaired for f in report.findings),
                    "findings": [{"namespace": f.namespace, "file": f.file, "offset": f.offset,
                                  "problem": f.problem, "repaired": f.repaired}
                                 for f in report.findings]})
    else:
        console.print(f"checked {len(report.namespaces)} namespace(s): "
                      f"{report.data_entries} data entries, {report.index_entries} index entries",
                      highlight=False)
        for finding in report.findings:
            console.print(f"  {finding}", highlight=False, markup=False, soft_wrap=True)
        console.print(check_summary(report, repair), highlight=False)
    if not report.ok:
        if not as_json:
            fail("problems remain" + ("" if repair else "; run again with --repair to fix them"))
        raise typer.Exit(1)


def check_summary(report: Any, repair: bool) -> str:
    """One line saying exactly what `check` found and what it changed."""
    found = report.findings
    if not found:
        return "everything is consistent"
    repaired = sum(1 for f in found if f.repaired)
    harmless = sum(1 for f in found if f.harmless and not f.repaired)
    broken = len(found) - repaired - harmless
    parts = [f"{len(found)} finding(s): {repaired} repaired, {harmless} harmless (left as "
             f"they are), {broken} not repaired"]
    if not repaired:
        parts.append("no file was changed" + ("" if repair else " (without --repair "
                                                                "nothing is)"))
    return "; ".join(parts)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
