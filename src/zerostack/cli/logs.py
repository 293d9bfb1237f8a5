"""`zerostack logs`: a container's stdout/stderr, fetched from its node on a request signed
by the contract's owner and returned sealed to the owner's key."""

from __future__ import annotations

import base64

import httpx
import orjson
import typer

from zerostack.cli.identity import load_named
from zerostack.cli.output import console, fail, print_json
from zerostack.crypto import CryptoError
from zerostack.node.runtime import encode_request, sign_log_request


def logs(
    contract: int = typer.Argument(..., help="Contract id."),
    workload: str = typer.Argument(..., help="Container workload name."),
    node: str = typer.Option(..., "--node", help="The node's status URL, e.g. http://10.0.0.5:9000."),
    identity: str = typer.Option(..., "--identity", help="The contract owner's identity."),
    tail: int = typer.Option(200, "--tail", help="Last N lines (0: all kept lines)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a container's logs (only its contract's owner can read them)."""
    ident = load_named(identity)
    token = encode_request(sign_log_request(ident, contract, workload, tail))
    try:
        resp = httpx.get(f"{node.rstrip('/')}/logs", params={"request": token}, timeout=30)
    except httpx.HTTPError as exc:
        fail(f"cannot reach node {node}: {exc}")
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        fail(f"node {node} answered {resp.status_code} without JSON (does it serve logs?)")
    if resp.status_code != 200:
        fail(f"node refused: {body.get('error', resp.status_code)}")
    try:
        text = ident.open_sealed(base64.b64decode(body["sealed"])).decode("utf-8", "replace")
    except (KeyError, ValueError, CryptoError) as exc:
        fail(f"the node's answer does not open with {identity}'s key: {exc}")
    lines = text.splitlines()
    if json_out:
        print_json({"contract": contract, "workload": workload, "lines": lines})
    else:
        for line in lines:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
