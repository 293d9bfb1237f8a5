"""`zerostack balance | transfer | faucet | bill | price | payouts`: money on the grid.

Amounts are integers in the grid's base unit, printed as they are (never as floats).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from zerostack.cli.bot import IDENTITY, JSON, LEDGER, LEDGER_KEY, _session
from zerostack.cli.output import console, fail, print_json, print_table
from zerostack.ledger.pricing import HOURS_PER_MONTH

if TYPE_CHECKING:
    from zerostack.ledger import LedgerClient

MAX_AMOUNT = 2**53 - 1
"""The largest amount any JSON client reads exactly: the ledger's bound on integers."""


def _when(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def _reader(ledger: str, identity: str, ledger_key: str | None,
            twin: int | None = None) -> Iterator[tuple[LedgerClient, int]]:
    """A client on a ledger that extends the last header this user saw, and the twin a
    command is about: `twin`, or the identity's own (only then is an identity needed)."""
    from zerostack.bot import BotError
    from zerostack.cli.identity import zerostack_home
    from zerostack.ledger import LedgerClient, LedgerError
    from zerostack.ledger.pin import HeaderPin, pin_path

    if twin is None:
        with _session(ledger, identity, ledger_key) as bot:
            yield bot.ledger, int(bot.twin_id(register=False))
        return
    try:
        pin = HeaderPin(pin_path(zerostack_home(), ledger), ledger_key)
        with LedgerClient(ledger) as client:
            pin.check(client)
            yield client, twin
    except (BotError, LedgerError) as exc:
        fail(str(exc))


def balance(
    twin: int | None = typer.Option(None, "--twin", help="Twin id (default: yours)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Show a twin's balance (base units), what it was paid, and its contracts in grace."""
    with _reader(ledger, identity, ledger_key, twin) as (client, tid):
        account = client.account(tid)
        if account is None:
            fail(f"twin {tid} is not registered")
        if json_out:
            print_json(account)
            return
        console.print(f"twin {tid}: balance {account['balance']}, paid out "
                      f"{account['paid_out']}, contracts in grace {account['in_grace']}",
                      highlight=False)


def transfer(
    to: int = typer.Argument(..., help="Twin id to pay."),
    amount: int = typer.Argument(..., min=1, max=MAX_AMOUNT,
                                 help="Amount in base units (1 to 2^53 - 1)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Send AMOUNT base units from your twin to twin TO."""
    with _session(ledger, identity, ledger_key) as bot:
        result = bot.ledger.transfer(bot.identity, to, amount)
        receipt = result["receipt"]
        if json_out:
            print_json(result)
            return
        console.print(f"sent {receipt['amount']} to twin {receipt['to']} (block "
                      f"{result['height']})", highlight=False)
        for cid in receipt.get("resumed", []):
            console.print(f"contract {cid} left grace", highlight=False)


def faucet(
    amount: int = typer.Argument(..., min=1, max=MAX_AMOUNT,
                                 help="Amount in base units (1 to 2^53 - 1)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Mint AMOUNT base units to your twin (only on a ledger served with --dev-faucet)."""
    with _session(ledger, identity, ledger_key) as bot:
        bot.twin_id()
        result = bot.ledger.faucet(bot.identity, amount)
        if json_out:
            print_json(result)
            return
        console.print(f"twin {result['receipt']['twin']} received {amount}", highlight=False)
        for cid in result["receipt"].get("resumed", []):
            console.print(f"contract {cid} left grace", highlight=False)


def bill(
    contract: int = typer.Argument(..., help="Contract id."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Show what a contract was charged so far: per period and per resource."""
    from zerostack.ledger.pricing import RESOURCES

    with _reader(ledger, identity, ledger_key, 0) as (client, _):
        data = client.bill(contract)
        if data is None:
            fail(f"contract {contract} does not exist")
        if json_out:
            print_json(data)
            return
        b = data["billing"]
        if b is None:
            console.print(f"contract {contract} is not billed (created before the grid had "
                          "a pricing policy)", highlight=False)
            return
        console.print(f"contract {contract} ({data['state']}): charged {b['charged']}, "
                      f"unpaid {b['unpaid']}, due {b['due']}", highlight=False)
        if data["state"] == "grace":
            console.print(f"in grace until {_when(b['grace_until'])} UTC: top up twin "
                          f"{data['owner']} with at least {b['due']}", highlight=False)
        print_table(f"charges of contract {contract}",
                    ["from (UTC)", "to (UTC)", *RESOURCES, "total", "status"],
                    [[_when(r["start"]), _when(r["end"]),
                      *(r["amounts"][k] for k in RESOURCES), r["total"], r["status"]]
                     for r in data["charges"]])
        print_table("totals", list(RESOURCES), [[b["totals"][k] for k in RESOURCES]])


def price_of(data: dict[str, Any], prices: dict[str, int]) -> dict[str, Any]:
    """What the workloads of deployment file `data` cost at `prices`: per resource, per
    hour and per month (base units, rounded down)."""
    from pydantic import TypeAdapter, ValidationError

    from zerostack.bot import BotError
    from zerostack.ledger.pricing import HOUR, RESERVED, Prices, amounts, usage
    from zerostack.workloads import Workload, priced_units, total_resources

    try:
        workloads = TypeAdapter(list[Workload]).validate_python(data.get("workloads") or [])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BotError(f"workloads.{where}: {err['msg']}") from None
    cap = total_resources(workloads).to_dict()
    units_map = {**cap, **priced_units(workloads)}
    units = tuple(units_map[r] for r in RESERVED)
    p = Prices.of(prices)
    hour = amounts(p, usage(units, HOUR), 0)
    month = amounts(p, usage(units, HOUR * HOURS_PER_MONTH), 0)
    return {
        "units": units_map,
        "prices": p.to_dict(),
        "per_hour": hour,
        "per_month": month,
        "total_per_hour": sum(hour.values()),
        "total_per_month": sum(month.values()),
        "traffic_per_gib": p.traffic,
    }


def price(
    file: Path | None = typer.Argument(None, help="Deployment YAML (as for `zerostack "
                                       "deploy`)."),
    template: str | None = typer.Option(None, "--template", metavar="HASH",
                                        help="Price a published template's workloads "
                                        "instead of a file."),
    node: int | None = typer.Option(None, "--node", help="Price it on this node's farm "
                                    "(default: the grid's prices)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Show what a deployment (or a published template) would cost per hour and per
    month, before deploying it."""
    from zerostack.bot import load_deployment_file
    from zerostack.ledger.pricing import RESERVED

    if (file is None) == (template is None):
        fail("give a deployment FILE or --template HASH (one of them)")
    with _reader(ledger, identity, ledger_key, 0) as (client, _):
        if file is not None:
            data, title, share = load_deployment_file(file), file.name, 0
        else:
            assert template is not None
            tpl = client.template(template)
            if tpl is None:
                fail(f"template {template[:64]!r} is not published")
            data = tpl.get("body") or {}
            if not isinstance(data.get("workloads"), list):
                fail(f"template {template[:16]}… has no workloads list to price")
            title = f"template {tpl.get('name', '')} {tpl.get('version', '')}".strip()
            share = int(tpl.get("author_share", 0))
        if node is not None:
            found = client.node_prices(node)
            if found is None:
                fail(f"node {node} does not exist")
            prices = found["prices"]
        else:
            policy = client.policy()["policy"]
            prices = policy["prices"] if policy else None
        if prices is None:
            fail("this grid has no pricing policy: nothing is priced")
        result = price_of(data, prices)
        if node is not None:
            result["node"] = node
        if template is not None:
            result["template"] = template
            result["author_share"] = share
        if json_out:
            print_json(result)
            return
        print_table(f"price of {title}" + (f" on node {node}" if node else ""),
                    ["resource", "units", "price per unit-hour", "per hour", "per month"],
                    [[r, result["units"][r], result["prices"][r], result["per_hour"][r],
                      result["per_month"][r]] for r in RESERVED])
        console.print(f"total: {result['total_per_hour']} per hour, "
                      f"{result['total_per_month']} per month ({HOURS_PER_MONTH} h), plus "
                      f"{result['traffic_per_gib']} per GiB of traffic", highlight=False)
        if template is not None:
            console.print(f"of which the template's author asks {result['author_share']} "
                          "basis points (capped by the grid's policy): part of the price, "
                          "not on top of it", highlight=False)


def payouts(
    twin: int | None = typer.Option(None, "--twin", help="Twin id (default: yours)."),
    ledger: str = LEDGER,
    identity: str = IDENTITY,
    json_out: bool = JSON,
    ledger_key: str | None = LEDGER_KEY,
) -> None:
    """Show what a farmer (or template author) was paid, per billing block."""
    with _reader(ledger, identity, ledger_key, twin) as (client, tid):
        data = client.payouts(tid)
        if data is None:
            fail(f"twin {tid} is not registered")
        if json_out:
            print_json(data)
            return
        console.print(f"twin {tid}: paid {data['total']} in all", highlight=False)
        print_table(f"payouts of twin {tid}", ["time (UTC)", "role", "amount", "contracts"],
                    [[_when(r["time"]), r["role"], r["amount"], r["contracts"]]
                     for r in data["payouts"]])
