"""`zerostack ledger`: run the ledger server, verify a ledger file, and query a running ledger."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from zerostack.cli.output import console, fail, json_line, print_json, print_table

app = typer.Typer(help="The ledger (BCDB): serve, verify, query.", no_args_is_help=True,
                  rich_markup_mode=None)

DEFAULT_LISTEN = "127.0.0.1:7700"


def default_db() -> Path:
    home = Path(os.environ.get("ZEROSTACK_HOME", Path.home() / ".zerostack"))
    return home / "ledger.db"


def default_url() -> str:
    return os.environ.get("ZEROSTACK_LEDGER", f"http://{DEFAULT_LISTEN}")


LedgerUrl = typer.Option(None, "--ledger", help="Ledger URL, or a cluster's replica URLs "
                         "comma-separated (default $ZEROSTACK_LEDGER or "
                         f"http://{DEFAULT_LISTEN}).")
JsonOut = typer.Option(False, "--json", help="Print JSON.")


def _client(url: str | None) -> Any:
    from zerostack.ledger import LedgerClient

    return LedgerClient(url or default_url())


def operator_identity(key: Path, db: Path) -> Any:
    """The ledger operator's key from `key`, created there (mode 0600) when the ledger is
    new; a ledger that already has blocks never gets a fresh key: its blocks are signed."""
    from zerostack.crypto import CryptoError, Identity, load_identity, save_identity
    from zerostack.ledger import LedgerError, SqliteLog

    if key.exists():
        try:
            return load_identity(key)
        except (CryptoError, OSError) as exc:
            fail(f"operator key: {exc}")
    if db.exists():
        try:
            log = SqliteLog(db)
            height = log.head()[0]
            log.close()
        except LedgerError as exc:
            fail(str(exc))
        if height:
            fail(f"{db} has {height} blocks but its operator key {key} is missing: pass "
                 "--key with the key that signed them")
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    ident = Identity.generate()
    save_identity(ident, key, "ledger-operator")
    return ident


@app.command("serve")
def serve(
    db: Path = typer.Option(None, "--db", help="SQLite ledger file (default $ZEROSTACK_HOME/ledger.db)."),
    listen: str = typer.Option(DEFAULT_LISTEN, "--listen", help="HOST:PORT to listen on."),
    listen_fd: list[int] = typer.Option(
        [], "--listen-fd",
        help="Also accept on this inherited listening socket (repeatable): how a local "
             "grid gives its ledger an address inside the grid's own network namespace."),
    block_interval: float = typer.Option(0.0, "--block-interval",
                                         help="Minimum seconds between blocks (0: as soon as "
                                              "transactions wait)."),
    key: Path = typer.Option(None, "--key", help="The operator's key file, which signs every "
                             "block (default: ledger.key beside --db, created on first start, "
                             "mode 0600). It is also the grid's governing key."),
    dev_faucet: bool = typer.Option(False, "--dev-faucet", help="A development grid: anyone "
                                    "may mint money with `zerostack faucet`. Recorded in the "
                                    "grid's first pricing policy, for the grid's life."),
    policy_file: Path = typer.Option(None, "--policy", help="JSON pricing policy the grid "
                                     "starts with (see docs/billing.md); default with "
                                     "--dev-faucet: the development prices."),
    etcd: str = typer.Option(None, "--etcd", help="Run as a replica of a ledger cluster "
                             "ordered by this etcd cluster: http://HOST:PORT[,…] "
                             "(docs/ledger-cluster.md)."),
    validator_key: Path = typer.Option(None, "--validator-key", help="With --etcd: this "
                                       "replica's validator key file (signs every block)."),
    cluster: str = typer.Option("default", "--cluster", help="With --etcd: the cluster's "
                                "name (its keys in etcd)."),
) -> None:
    """Run the ledger's HTTP API, after checking the whole file (as `verify` does)."""
    from zerostack.ledger import LedgerError
    from zerostack.ledger.api import create_app
    from zerostack.ledger.api import serve as serve_app

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        fail(f"--listen must be HOST:PORT, got {listen!r}")
    path = db or default_db()
    policy = _policy(policy_file, dev_faucet)
    etcd_log = None
    if etcd is not None:
        from zerostack.crypto import CryptoError, load_identity
        from zerostack.ledger.etcd import EtcdLog

        if validator_key is None:
            fail("--etcd needs --validator-key FILE")
        try:
            operator = load_identity(validator_key)
            etcd_log = EtcdLog(etcd, cluster)
        except (CryptoError, OSError, LedgerError) as exc:
            fail(escape(f"--etcd/--validator-key: {exc}"))
    else:
        operator = operator_identity(key or path.parent / "ledger.key", path)
    try:
        application = create_app(path, operator, block_interval=block_interval, policy=policy,
                                 etcd=etcd_log)
    except LedgerError as exc:
        # the reason may quote bytes of the file: no console markup from it
        fail(escape(f"refusing to serve {path}: {exc}"))
    import socket

    try:
        extra = [socket.socket(fileno=fd) for fd in listen_fd]
    except OSError as exc:
        fail(f"--listen-fd: {exc}")
    if any(s.type != socket.SOCK_STREAM for s in extra):
        fail("--listen-fd must name listening TCP sockets")
    console.print(f"ledger {path} listening on http://{host}:{port} operator key "
                  f"{operator.public_hex}", highlight=False)
    for s in extra:
        addr = s.getsockname()
        console.print(f"ledger also listening on {addr[0]} port {addr[1]}", highlight=False)
    serve_app(application, host, int(port), extra)


def _policy(path: Path | None, dev_faucet: bool) -> dict[str, Any] | None:
    """The pricing policy `serve` gives a grid that has none yet (None: leave it unpriced)."""
    import json

    from zerostack.ledger.pricing import DEV_POLICY

    if path is None:
        return {**DEV_POLICY, "dev_faucet": True} if dev_faucet else None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"--policy {path}: {exc}")
    if not isinstance(data, dict):
        fail(f"--policy {path}: a policy is a JSON object")
    return {**data, "dev_faucet": True} if dev_faucet else data


@app.command("policy")
def policy(
    file: Path = typer.Argument(..., help="JSON pricing policy (see docs/billing.md)."),
    key: Path = typer.Option(..., "--key", help="The ledger operator's key file: the grid's "
                             "governing key."),
    effective: int = typer.Option(None, "--effective", help="Unix time it takes effect "
                                  "(default: the block's time; never earlier)."),
    url: str = LedgerUrl,
    json_out: bool = JsonOut,
) -> None:
    """Set (or schedule) the grid's pricing policy, signed with the governing key."""
    from zerostack.crypto import CanonicalError, CryptoError, load_identity
    from zerostack.ledger.tx import sign_tx

    payload = _policy(file, False)
    assert payload is not None
    if effective is not None:
        payload["effective"] = effective
    try:
        operator = load_identity(key)
    except (CryptoError, OSError) as exc:
        fail(f"operator key: {exc}")
    client = _client(url)
    current = _run(client.policy)
    if current["governor"] != operator.public_hex:
        fail(f"{key} is not this grid's governing key ({current['governor']})")
    if current["policy"] is not None:
        payload.setdefault("dev_faucet", current["policy"]["dev_faucet"])
    try:
        tx = sign_tx(operator, "grid.policy", operator.public_hex, current["governor_nonce"],
                     payload)
    except CanonicalError as exc:
        fail(f"--policy {file}: {exc}")
    result = _run(lambda: client.submit(tx))
    if json_out:
        print_json(result)
    else:
        console.print(f"pricing policy effective from {result['receipt']['policy']} (block "
                      f"{result['height']})", highlight=False)


@app.command("verify")
def verify(
    db: Path = typer.Option(None, "--db", help="SQLite ledger file (default $ZEROSTACK_HOME/ledger.db)."),
    operator_key: str = typer.Option(None, "--operator-key", help="The operator's public key "
                                     "(hex) every block must be signed by (default: the key "
                                     "that signed block 1, printed for you to compare)."),
    json_out: bool = JsonOut,
) -> None:
    """Replay the log from genesis, re-checking every hash, signature and transition."""
    from zerostack.ledger import BadBlock, LedgerError, SqliteLog, verify_log

    path = db or default_db()
    if not path.exists():
        fail(f"{path} does not exist")
    if operator_key is not None and not re.fullmatch(r"[0-9a-f]{64}", operator_key):
        fail("--operator-key must be a public key: 64 lowercase hex characters")
    try:
        log = SqliteLog(path)
        try:
            result = verify_log(log, operator_key)
        finally:
            log.close()
    except BadBlock as exc:
        if json_out:
            print_json({"ok": False, "bad_block": exc.height, "reason": exc.reason})
            raise typer.Exit(1) from None
        fail(escape(f"first bad block is {exc.height}: {exc.reason}"))
    except LedgerError as exc:
        fail(str(exc))
    summary = {"ok": True, "height": result.height, "hash": result.hash, "txs": result.txs,
               "twins": len(result.state.twins), "nodes": len(result.state.nodes),
               "contracts": len(result.state.contracts), "operator_key": result.operator_key}
    if json_out:
        print_json(summary)
    else:
        whose = ("" if operator_key or not result.operator_key else
                 " (the key that signed block 1: compare it with the operator's)")
        console.print(f"ok: {result.height} blocks, {result.txs} transactions, head "
                      f"{result.hash}, signed by operator key {result.operator_key}{whose}",
                      highlight=False)


def _run(fn: Any) -> Any:
    from zerostack.ledger import LedgerError

    try:
        return fn()
    except LedgerError as exc:
        fail(str(exc))


def _one(fn: Any, missing: str) -> Any:
    """The object `fn` gets from the ledger, or a failure saying it is `missing`."""
    data = _run(fn)
    if data is None:
        fail(missing)
    return data


def _print_list(data: list[dict[str, Any]], json_out: bool, title: str, columns: list[str],
                row: Callable[[dict[str, Any]], list[Any]]) -> None:
    """A list command's output: the JSON list, or a table with one row per object."""
    if json_out:
        print_json(data)
    else:
        print_table(title, columns, [row(d) for d in data])


@app.command("head")
def head(url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """Show the last block of a running ledger."""
    data = _run(lambda: _client(url).head())
    if json_out:
        print_json(data)
    else:
        console.print(f"height {data['height']} hash {data['hash']} time {data['time']}",
                      highlight=False)


@app.command("nodes")
def nodes(
    url: str = LedgerUrl,
    country: str = typer.Option(None, help="Only nodes in this country."),
    farm: int = typer.Option(None, help="Only nodes of this farm."),
    free_mru: int = typer.Option(0, "--free-mru", help="Minimum free memory (bytes)."),
    free_cru: int = typer.Option(0, "--free-cru", help="Minimum free CPU cores."),
    status: str = typer.Option(None, help="up or down."),
    json_out: bool = JsonOut,
) -> None:
    """List nodes, filtered."""
    data = _run(lambda: _client(url).nodes(country=country, farm=farm, free_mru=free_mru,
                                           free_cru=free_cru, status=status, limit=1000))
    _print_list(data, json_out, "nodes",
                ["id", "twin", "farm", "country", "city", "free cru", "free mru", "status"],
                lambda n: [n["id"], n["twin"], n["farm"], n["location"]["country"],
                           n["location"]["city"], n["free"]["cru"], n["free"]["mru"],
                           n["status"]])


@app.command("contracts")
def contracts(
    url: str = LedgerUrl,
    owner: int = typer.Option(None, help="Only contracts of this owner twin."),
    node: int = typer.Option(None, help="Only contracts on this node."),
    state: str = typer.Option(None, help="Only contracts in this state."),
    json_out: bool = JsonOut,
) -> None:
    """List contracts, filtered."""
    data = _run(lambda: _client(url).contracts(owner=owner, node=node, state=state, limit=1000))
    _print_list(data, json_out, "contracts",
                ["id", "owner", "node", "state", "version", "approvals"],
                lambda c: [c["id"], c["owner"], c["node"], c["state"], c["version"],
                           ",".join(c["approvals"])])


@app.command("contract")
def contract(contract_id: int, url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """Show one contract."""
    data = _one(lambda: _client(url).contract(contract_id), f"contract {contract_id} does not exist")
    if json_out:
        print_json(data)
        return
    data = {k: v for k, v in data.items() if k != "instructions"}
    if data.get("active"):
        data["active"] = {k: v for k, v in data["active"].items() if k != "instructions"}
    print_json(data)


@app.command("tx")
def tx(tx_hash: str, url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """Show a committed transaction."""
    data = _one(lambda: _client(url).tx(tx_hash), f"transaction {tx_hash} is not in the ledger")
    print_json(data)


@app.command("register-twin")
def register_twin(name: str, url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """Register identity NAME (see `zerostack id new`) as a twin; prints its twin id."""
    from zerostack.cli.identity import load_named

    ident = load_named(name)
    twin_id = _run(lambda: _client(url).register_twin(ident))
    if json_out:
        print_json({"name": name, "twin": twin_id, "public": ident.public_hex})
    else:
        console.print(f"{name} is twin {twin_id}", highlight=False)


@app.command("block")
def block(height: int, url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """Show a block: header, hash and transactions."""
    data = _one(lambda: _client(url).block(height), f"block {height} does not exist")
    if json_out:
        print_json(data)
        return
    console.print(f"block {data['height']} hash {data['hash']} time {data['time']} "
                  f"prev {data['prev_hash']}", highlight=False)
    print_table(f"{data['tx_count']} transactions", ["type", "sender", "nonce"],
                [[t["type"], t["sender"], t["nonce"]] for t in data["txs"]])


@app.command("twins")
def twins(url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """List twins."""
    data = _run(lambda: _client(url).twins(limit=10000))
    _print_list(data, json_out, "twins", ["id", "public key", "next nonce"],
                lambda t: [t["id"], t["public_key"], t["nonce"]])


@app.command("farms")
def farms(url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """List farms."""
    data = _run(lambda: _client(url).farms(limit=10000))
    _print_list(data, json_out, "farms", ["id", "name", "owner"],
                lambda f: [f["id"], f["name"], f["owner"]])


@app.command("templates")
def templates(url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """List published templates."""
    data = _run(lambda: _client(url).templates(limit=10000))
    _print_list(data, json_out, "templates", ["hash", "name", "version", "author"],
                lambda t: [t["hash"], t["name"], t["version"], t["author"]])


@app.command("names")
def names(url: str = LedgerUrl, json_out: bool = JsonOut) -> None:
    """List registered gateway names."""
    data = _run(lambda: _client(url).names(limit=10000))
    _print_list(data, json_out, "names", ["name", "owner"], lambda n: [n["name"], n["owner"]])


@app.command("events")
def events(
    since: str = typer.Option("0", help="Start after this cursor: a block height H, or "
                              "H.I (after event I of block H)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep waiting for new blocks."),
    node: int = typer.Option(None, help="Only events about this node."),
    contract: int = typer.Option(None, help="Only events about this contract."),
    url: str = LedgerUrl,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per line."),
) -> None:
    """Print committed transactions after a height (with --follow, as they come)."""
    import orjson

    client = _client(url)

    def show(batch: dict[str, Any]) -> None:
        for e in batch["events"]:
            if json_out:
                json_line(e)
            else:
                console.print(f"{e['height']:>6} {e['type']:<18} sender {e['sender']} "
                              f"{orjson.dumps(e['receipt']).decode()}", highlight=False)

    cursor = since
    while True:
        batch = _run(lambda c=cursor: client.events(c, timeout=25.0 if follow else 0.0,
                                                    node=node, contract=contract))
        show(batch)
        if not follow and batch["next"] == str(batch["head"]):
            return
        cursor = batch["next"]


def _register_cluster_commands() -> None:
    from zerostack.cli.ledger_cluster import cluster_app
    from zerostack.cli.ledger_cluster import status as cluster_status_command

    app.add_typer(cluster_app, name="cluster")
    app.command("status")(cluster_status_command)


_register_cluster_commands()
