"""`zerostack template lint|publish|list|show`, `zerostack solution
status|approve|cancel|retry|list`, and `zerostack deploy TEMPLATE -p K=V`: the IT
expert's and the user's side of templates and solutions."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from zerostack.cli.bot import IDENTITY, JSON, LEDGER, LEDGER_KEY, _session
from zerostack.cli.output import console, fail, print_json, print_table, styled

if TYPE_CHECKING:
    from zerostack.bot import ThreeBot
    from zerostack.bot.solutions import Draft
    from zerostack.contracts import Template

template_app = typer.Typer(help="IT contract templates: lint, publish, list, show.",
                           no_args_is_help=True, rich_markup_mode=None)
solution_app = typer.Typer(help="Solutions: the contracts one template deployment made.",
                           no_args_is_help=True, rich_markup_mode=None)

MAX_FILE = 256 * 1024
GiB = 1 << 30


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    if len(data) > MAX_FILE:
        fail(f"{path} is larger than {MAX_FILE} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")


def _load_file(path: Path) -> Template:
    from zerostack.contracts import TemplateError, load_text

    try:
        return load_text(_read(path))
    except TemplateError as exc:
        fail(exc.render(str(path)))


@template_app.command("lint")
def lint(file: Path = typer.Argument(..., help="Template YAML."),
         param: list[str] = typer.Option([], "--param", "-p", help="KEY=VALUE to expand with "
                                         "(default: the parameters' defaults)."),
         json_out: bool = JSON) -> None:
    """Check a template: structure, expression syntax and sandbox rules, and an expansion
    with the defaults (or -p values). Errors name the file, line and column."""
    from zerostack.contracts import TemplateError, expand

    t = _load_file(file)
    try:
        plan = expand(t, _params(param))
    except TemplateError as exc:
        fail(exc.render(str(file)))
    if json_out:
        print_json({"ok": True, "name": t.name, "version": t.spec.version,
                    "parts": [p.key for p in plan.parts]})
        return
    console.print(styled((f"{file}", "bold"), f": ok ({t.name} {t.spec.version}, "
                         f"{len(plan.parts)} part copies with the defaults)"), highlight=False)


@template_app.command("publish")
def publish(file: Path = typer.Argument(..., help="Template YAML."),
            ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
            ledger_key: str | None = LEDGER_KEY) -> None:
    """Publish a template signed by your identity (its author). Its id is the hash of its
    content; a changed template is a new version, published again."""
    from zerostack.bot import solutions

    t = _load_file(file)
    with _session(ledger, identity, ledger_key) as bot:
        digest = solutions.publish(bot, t)
    if json_out:
        print_json({"template": digest, "name": t.name, "version": t.spec.version})
    else:
        console.print(styled("published ", (f"{t.name} {t.spec.version}", "bold"), " as ",
                             digest), highlight=False)


@template_app.command("list")
def list_templates(name: str | None = typer.Option(None, "--name", help="Only this name."),
                   ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
                   ledger_key: str | None = LEDGER_KEY) -> None:
    """Published templates, newest last."""
    with _session(ledger, identity, ledger_key) as bot:
        filters: dict[str, Any] = {"limit": 1000}
        if name:
            filters["name"] = name
        rows = bot.ledger.templates(**filters)
    if json_out:
        print_json([{k: v for k, v in r.items() if k != "body"} for r in rows])
        return
    print_table("templates", ["name", "version", "author", "hash", "description"],
                [(r["name"], r["version"], r["author"], r["hash"][:16] + "…",
                  r["description"][:60]) for r in rows])


@template_app.command("show")
def show(ref: str = typer.Argument(..., help="Template name (latest) or hash."),
         ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
         ledger_key: str | None = LEDGER_KEY) -> None:
    """A template's parameters (type, default, bounds, help), stakeholder roles and parts."""
    from zerostack.bot import solutions

    with _session(ledger, identity, ledger_key) as bot:
        t, digest = solutions.load_template(bot, ref)
    spec = t.spec
    params = {n: p.model_dump(exclude_none=True) for n, p in spec.parameters.items()}
    if json_out:
        print_json({"hash": digest, "name": spec.name, "version": spec.version,
                    "author": spec.author, "description": spec.description,
                    "parameters": params,
                    "stakeholders": [s.model_dump() for s in spec.stakeholders],
                    "parts": [p.name for p in spec.parts]})
        return
    console.print(styled((f"{spec.name} {spec.version}", "bold"), f"  {digest}"),
                  highlight=False)
    if spec.description:
        console.print(spec.description.strip(), highlight=False)
    print_table("parameters", ["name", "type", "default", "bounds", "help"],
                [(n, p.type, "" if p.default is None else p.default, _bounds(p), p.help)
                 for n, p in spec.parameters.items()])
    if spec.stakeholders:
        print_table("stakeholders", ["role", "weight", "required", "help"],
                    [(s.role, s.weight, "yes" if s.required else "no", s.help)
                     for s in spec.stakeholders])


def _bounds(p: Any) -> str:
    if p.values:
        return " | ".join(map(str, p.values))
    if p.pattern:
        return p.pattern
    lo, hi = p.minimum, p.maximum
    if lo is None and hi is None:
        return ""
    return f"{'' if lo is None else lo}..{'' if hi is None else hi}"


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"parameter {item[:64]!r} must be KEY=VALUE")
        if key in out:
            fail(f"parameter {key[:64]!r} is given twice")
        out[key] = value
    return out


def _roles(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        role, sep, twin = item.partition("=")
        if not sep or not twin.isdigit():
            fail(f"stakeholder {item[:64]!r} must be ROLE=TWIN (a role of the template and a "
                 "twin id)")
        out[role] = int(twin)
    return out


def _size(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def _print_plan(d: Draft) -> None:
    s = d.summary()
    console.print(styled("plan for ", (f"{s['template']} {s['version']}", "bold"), ": ",
                         ", ".join(f"{k}={v}" for k, v in s["parameters"].items())),
                  highlight=False)
    print_table("parts", ["node", "parts", "workloads", "cpu", "memory", "ssd", "hdd",
                          "per hour"],
                [(n["node"], ", ".join(n["parts"]), ", ".join(n["workloads"]),
                  n["resources"]["cru"], _size(n["resources"]["mru"]),
                  _size(n["resources"]["sru"]), _size(n["resources"]["hru"]), n["per_hour"])
                 for n in s["nodes"]])
    console.print(f"price: {s['per_hour']} per hour, {s['per_month']} per month (base units)",
                  highlight=False)
    for r in s["stakeholders"]:
        console.print(f"signer twin {r['twin']} weight {r['weight']}"
                      f"{' required' if r['required'] else ''}", highlight=False)


def deploy_template(target: str, param: list[str], stakeholder: list[str], dry_run: bool,
                    wait: float, ledger: str, identity: str, json_out: bool,
                    ledger_key: str | None) -> None:
    """The template route of `zerostack deploy` (see bot.deploy)."""
    from zerostack.bot import solutions

    params, roles = _params(param), _roles(stakeholder)
    with _session(ledger, identity, ledger_key) as bot:
        path = Path(target)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            t, digest = _load_file(path), None
        else:
            t, digest = solutions.load_template(bot, target)
        d = solutions.draft(bot, t, params, roles, digest)
        if dry_run:
            if json_out:
                print_json({**d.summary(), "dry_run": True})
            else:
                _print_plan(d)
                console.print("dry run: nothing was created", highlight=False)
            return
        if not json_out:
            _print_plan(d)
        sid = solutions.create(bot, d)
        st = solutions.status(bot, sid)
        if not json_out:
            console.print(styled("solution ", (sid, "bold"), f": {len(st['parts'])} contracts "
                                 "created and approved by you"), highlight=False)
        _adopt_networks(d, st, json_out)
        if st["waiting_for"]:
            if json_out:
                print_json(st)
            else:
                console.print(f"waiting for twins {', '.join(map(str, st['waiting_for']))}: "
                              f"each runs `zerostack solution approve {sid} -i NAME`",
                              highlight=False)
            return
        if wait > 0:
            st = follow(bot, sid, wait, quiet=json_out)
        if json_out:
            print_json(st)
        else:
            print_result(st)
        if any(p["state"] == "error" for p in st["parts"]):
            raise typer.Exit(1)


def _adopt_networks(d: Draft, st: dict[str, Any], quiet: bool) -> None:
    """Record the solution's user networks on this machine, so that `zerostack network
    access NAME` can add it to them."""
    from zerostack.bot import networks
    from zerostack.cli.identity import zerostack_home

    contract_on = {int(p["node"]): int(p["contract"]) for p in st["parts"]}
    for name, (ip_range, layout) in d.networks.items():
        nodes = {nid: (subnet, endpoint, contract_on[nid])
                 for nid, (subnet, endpoint) in layout.items()}
        if networks.adopt(zerostack_home(), name, ip_range, nodes, d.ports[name]):
            if not quiet:
                console.print(f"network {name}: `zerostack network access {name}` adds this "
                              "machine and prints its WireGuard configuration",
                              highlight=False)
        elif not quiet:
            console.print(f"network {name}: you already have a network of that name here; "
                          "this one is not recorded", highlight=False)


def follow(bot: ThreeBot, sid: int, timeout: float, quiet: bool = False) -> dict[str, Any]:
    """Poll the solution until every part is deployed or one failed, showing progress."""
    from zerostack.bot import solutions

    deadline = time.monotonic() + timeout
    with console.status("waiting for the nodes…") as spinner:
        while True:
            st = solutions.status(bot, sid)
            states = [p["state"] for p in st["parts"]]
            ok = sum(1 for s in states if s == "deployed")
            if not quiet:
                spinner.update(f"{ok}/{len(states)} parts deployed "
                               f"({', '.join(sorted(set(states)))})")
            if ok == len(states) or "error" in states or st["waiting_for"]:
                return st
            if time.monotonic() > deadline:
                fail(f"solution {sid}: {ok}/{len(states)} parts deployed after {timeout:.0f}s")
            time.sleep(0.3)


def print_result(st: dict[str, Any]) -> None:
    """What the user got: each part's state, the node's reason for a failure, and the
    endpoints (Zero-DB, gateway URLs, addresses) the nodes reported."""
    rows = []
    for p in st["parts"]:
        rows.append((p["contract"], p["node"], p["state"], p["error"],
                     ", ".join(f"{w['name']}={w['state']}" for w in p["workloads"])))
    print_table(f"solution {st['id']}", ["contract", "node", "state", "node's reason",
                                          "workloads"], rows)
    for p in st["parts"]:
        for w in p["workloads"]:
            d = w.get("data") or {}
            if w["type"] == "zdb" and w["state"] == "ok" and "port" in d:
                of = d.get("replica_of") if isinstance(d.get("replica_of"), dict) else None
                note = (f" (read-only replica of {of.get('workload')} on node {of.get('node')})"
                        if of else "")
                console.print(f"zdb {w['name']}: redis-cli -h {d.get('host')} -p {d['port']} "
                              f"then SELECT {d.get('namespace')}{note}", highlight=False)
            elif w["type"] == "gateway_name_proxy" and w["state"] == "ok":
                console.print(f"gateway {w['name']}: {d.get('url') or d.get('fqdn') or d}",
                              highlight=False)
            elif w["type"] == "container" and w["state"] == "ok" and d.get("ip"):
                console.print(f"container {w['name']}: {d['ip']}", highlight=False)
        if p["state"] == "error":
            console.print(f"part contract {p['contract']} failed on node {p['node']}: "
                          f"{p['error'] or 'see its workloads'}; move it with `zerostack "
                          f"solution retry {st['id']} {p['contract']}`", highlight=False)


@solution_app.command("status")
def status(solution: int = typer.Argument(..., help="Solution id."),
           ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
           ledger_key: str | None = LEDGER_KEY) -> None:
    """Each part's contract, node and state, who still has to approve, and the results."""
    from zerostack.bot import solutions

    with _session(ledger, identity, ledger_key) as bot:
        st = solutions.status(bot, solution)
    if json_out:
        print_json(st)
        return
    print_result(st)
    if st["waiting_for"]:
        console.print(f"waiting for twins {', '.join(map(str, st['waiting_for']))}",
                      highlight=False)


@solution_app.command("approve")
def approve(solution: int = typer.Argument(..., help="Solution id."),
            yes: bool = typer.Option(False, "--yes", "-y", help="Sign without asking."),
            max_cost: int | None = typer.Option(None, "--max-cost", min=1, help="The most "
                                                "the solution may cost per month, in base "
                                                "units: over it, nothing is signed; the "
                                                "approval names it, so the ledger refuses a "
                                                "later version of a part costing more."),
            ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
            ledger_key: str | None = LEDGER_KEY) -> None:
    """Read every part sealed to you, recompute its hash, and sign them all at once."""
    from zerostack.bot import solutions
    from zerostack.workloads import summarize

    with _session(ledger, identity, ledger_key) as bot:
        r = solutions.review(bot, solution)
        if not json_out:
            for cid, dep in r.deployments.items():
                s = summarize(dep)
                node = next(n for c, _, n, _ in r.parts if c == cid)
                console.print(f"part contract {cid} on node {node}: "
                              + ", ".join(f"{w['type']} {w['name']}" for w in s["workloads"]),
                              highlight=False)
            cap = "" if max_cost is None else f" (your cap: {max_cost})"
            console.print(f"price: {r.per_month} per month{cap}", highlight=False)
        if max_cost is not None and r.per_month > max_cost:
            fail(f"solution {solution} costs {r.per_month} per month, over --max-cost "
                 f"{max_cost}: not signed")
        if not yes and not sys.stdin.isatty():
            fail("no terminal to confirm on: read the parts above and pass --yes to sign")
        if not yes and not typer.confirm(f"approve all {len(r.parts)} parts of solution "
                                         f"{solution}?"):
            fail("not approved")
        receipt = solutions.approve(bot, solution, max_cost)
    if json_out:
        print_json(receipt)
    else:
        states = sorted({p["state"] for p in receipt["parts"]})
        console.print(f"approved solution {solution}: parts now {', '.join(states)}",
                      highlight=False)


@solution_app.command("cancel")
def cancel(solution: int = typer.Argument(..., help="Solution id."),
           ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
           ledger_key: str | None = LEDGER_KEY) -> None:
    """Cancel every part of the solution."""
    from zerostack.bot import solutions

    with _session(ledger, identity, ledger_key) as bot:
        done = solutions.cancel(bot, solution)
    if json_out:
        print_json({"solution": solution, "cancelled": done})
    else:
        console.print(f"cancel votes sent for contracts {', '.join(map(str, done)) or 'none'}",
                      highlight=False)


@solution_app.command("retry")
def retry(solution: int = typer.Argument(..., help="Solution id."),
          contract: int = typer.Argument(..., help="The failed part's contract."),
          ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
          ledger_key: str | None = LEDGER_KEY) -> None:
    """Move one part to another node; the stakeholders approve the moved part again."""
    from zerostack.bot import solutions

    with _session(ledger, identity, ledger_key) as bot:
        new = solutions.retry(bot, solution, contract)
        st = solutions.status(bot, new)
    if json_out:
        print_json(st)
    else:
        console.print(f"part moved: new solution {new} (contract "
                      f"{st['parts'][0]['contract']} on node {st['parts'][0]['node']})",
                      highlight=False)


@solution_app.command("wait")
def wait(solution: int = typer.Argument(..., help="Solution id."),
         release: bool = typer.Option(False, "--release",
                                      help="Then cancel the solution: its nodes free "
                                           "everything it held."),
         timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait."),
         ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
         ledger_key: str | None = LEDGER_KEY) -> None:
    """Wait for the solution's run-to-completion containers (restart: never) to end,
    print how each ended, and with --release cancel the solution."""
    from zerostack.bot import solutions

    with _session(ledger, identity, ledger_key) as bot:
        with console.status("waiting for the jobs…"):
            results = solutions.wait_jobs(bot, solution, timeout, release)
    failed = [n for n, m in results.items() if m != "exited with 0"]
    if json_out:
        print_json({"solution": solution, "jobs": results, "released": release})
    else:
        for name, message in sorted(results.items()):
            console.print(f"job {name}: {message}", highlight=False)
        if release:
            console.print(f"solution {solution} cancelled: its resources are released",
                          highlight=False)
    if failed:
        raise typer.Exit(1)


@solution_app.command("list")
def list_solutions(ledger: str = LEDGER, identity: str = IDENTITY, json_out: bool = JSON,
                   ledger_key: str | None = LEDGER_KEY) -> None:
    """Your solutions."""
    with _session(ledger, identity, ledger_key) as bot:
        rows = bot.ledger.solutions(owner=bot.twin_id(), limit=1000)
    if json_out:
        print_json(rows)
        return
    print_table("solutions", ["id", "parts", "approved by", "metadata"],
                [(r["id"], len(r["parts"]), ", ".join(r["approvals"]), r["metadata"])
                 for r in rows])
