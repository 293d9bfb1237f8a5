"""`zerostack gateway name | release | set | pool`: gateway names on the ledger (users),
and gateway nodes and farm public address pools (farmers)."""

from __future__ import annotations

from typing import Any

import typer

from zerostack.cli.bot import IDENTITY, JSON, LEDGER, LEDGER_KEY, _session
from zerostack.cli.output import clean, fail, print_json, print_table

app = typer.Typer(help="Zero-GW: gateway names, gateway nodes and public address pools.",
                  no_args_is_help=True, rich_markup_mode=None)


def _send(ledger: str, identity: str, ledger_key: str | None, ttype: str,
          payload: dict[str, Any], json_out: bool, done: str) -> None:
    with _session(ledger, identity, ledger_key) as bot:
        result = bot.ledger.send(bot.identity, ttype, payload)
    receipt = dict(result.get("receipt") or {})
    if json_out:
        print_json(receipt)
    else:
        print(clean(done))  # names and domains the ledger accepted: printable ASCII


@app.command("name")
def name(
    gateway_name: str = typer.Argument(..., metavar="NAME",
                                       help="The name to own, served as NAME.<gateway domain>."),
    ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Register NAME to you (name.register): unique on the grid."""
    _send(ledger, identity, ledger_key, "name.register", {"name": gateway_name}, json_out,
          f"name {gateway_name} is yours")


@app.command("release")
def release(
    gateway_name: str = typer.Argument(..., metavar="NAME"),
    ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Give NAME back (name.release): its routes go at the gateways' next pass."""
    _send(ledger, identity, ledger_key, "name.release", {"name": gateway_name}, json_out,
          f"name {gateway_name} released")


@app.command("set")
def set_gateway(
    node: int = typer.Argument(..., min=1, help="The node to make a gateway."),
    domain: str = typer.Option(..., "--domain", help="Its domain, e.g. gw1.grid.test "
                               "('' to make it an ordinary node again)."),
    ipv4: str = typer.Option("", "--ipv4", help="Its public IPv4 with prefix: 198.18.0.10/24."),
    ipv6: str = typer.Option("", "--ipv6", help="Its public IPv6 with prefix."),
    ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Make NODE a gateway (node.gateway; sent by the node's farmer)."""
    _send(ledger, identity, ledger_key, "node.gateway",
          {"node": node, "domain": domain, "ipv4": ipv4, "ipv6": ipv6}, json_out,
          f"node {node} is gateway {domain}" if domain else f"node {node} is no gateway")


@app.command("pool")
def pool(
    farm: int = typer.Argument(..., min=1),
    add: list[str] = typer.Option([], "--add", help="ADDRESS/PREFIX=GATEWAY, e.g. "
                                  "198.18.0.200/24=198.18.0.1 (repeatable)."),
    remove: list[str] = typer.Option([], "--remove", help="ADDRESS/PREFIX (repeatable)."),
    ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """List FARM's public pool, or add addresses to it or remove free ones
    (farm.public_ips)."""
    entries = []
    for item in add:
        ip, sep, gw = item.partition("=")
        if not sep or not ip or not gw:
            fail(f"--add {item[:60]!r} is not ADDRESS/PREFIX=GATEWAY")
        entries.append({"ip": ip, "gateway": gw})
    if not entries and not remove:
        with _session(ledger, identity, ledger_key) as bot:
            rows = bot.ledger.farm_pool(farm)
        if json_out:
            print_json(rows)
        else:
            print_table(f"farm {farm}'s public pool", ["address", "gateway", "contract"],
                        [[str(r.get("ip")), str(r.get("gateway")),
                          str(r.get("contract") or "free")] for r in rows])
        return
    _send(ledger, identity, ledger_key, "farm.public_ips",
          {"farm": farm, "add": entries, "remove": list(remove)}, json_out,
          f"farm {farm}: {len(entries)} added, {len(remove)} removed")


@app.command("names")
def names(
    owner: int | None = typer.Option(None, "--owner", help="Only this twin's names."),
    ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """List registered gateway names."""
    with _session(ledger, identity, ledger_key) as bot:
        rows = bot.ledger.names(**({"owner": owner} if owner else {}))
    if json_out:
        print_json(rows)
    else:
        print_table("gateway names", ["name", "owner"],
                    [[str(r["name"]), str(r["owner"])] for r in rows])
