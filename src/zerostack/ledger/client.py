"""Python clients of the ledger API, used by the node agent, the bot and the CLI.

`LedgerClient` (sync) and `AsyncLedgerClient` (asyncio) share one shape: `send()` signs a
transaction with the sender's identity, tracking the next nonce per sender (and re-reading
it from the ledger when another client used it); typed helpers build each transaction's
payload; getters return the API's JSON (dicts; `None` for a missing object); `events()`
long-polls and `wait_for()` waits until a predicate over the ledger holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx
import orjson

from zerostack.crypto import Domain, Identity, solution_digest
from zerostack.ledger.errors import LedgerError, LedgerRejected
from zerostack.ledger.tx import sign_approval, sign_cancel_vote, sign_tx, tx_hash

T = TypeVar("T")
NONCE_RETRIES = 3
Cursor = int | str
"""An event cursor: a block height H (after all of block H) or "H.I" (after event I of
block H); `/events` answers the next one as `next`."""


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _params(filters: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v).lower() if isinstance(v, bool) else v)
            for k, v in filters.items() if v is not None}


MAX_ANSWER = 256 << 20
"""Largest answer read from a ledger (a page of 1,000 contracts with their sealed
instructions stays far below it): a server that sends more is cut off, not buffered."""


def _too_large(url: str) -> LedgerError:
    return LedgerError(f"the ledger at {url} answered more than {MAX_ANSWER} bytes",
                       code="too_large")


def _decode(url: str, method: str, status: int, content: bytes) -> Any:
    try:
        data = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        data = None
    if status >= 400:
        if isinstance(data, dict) and "error" in data:
            message, code = str(data["error"]), str(data.get("code", "error"))
        else:
            message, code = f"HTTP {status} from {url}", "error"
        cls = LedgerRejected if method == "POST" else LedgerError
        raise cls(message, code=code, status=status)
    return data


def _merge_batch(todo: list[int], batch: list[dict[str, Any]],
                 results: list[dict[str, Any]]) -> list[int]:
    """Store a batch's results at their payloads' places; return the places refused for
    their nonce (after a refusal the later nonces of the batch no longer follow on)."""
    retry = []
    for i, result in zip(todo, batch, strict=True):
        results[i] = result
        if result.get("code") == "bad_nonce":
            retry.append(i)
    return retry


MAX_URLS = 16


def ledger_urls(url: str | list[str]) -> list[str]:
    """One ledger URL, several separated by commas, or a list: the replicas of one ledger
    cluster, tried in turn."""
    items = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls or len(urls) > MAX_URLS:
        raise LedgerError(f"give 1 to {MAX_URLS} ledger URLs")
    return urls


def _fail_over(exc: LedgerError, path: str) -> bool:
    """Whether another replica may answer what this one could not: it is unavailable
    (503, shutting down or cut off from etcd), or it has not reached an event cursor the
    follower got from a replica further ahead."""
    return exc.status in (502, 503, 504) or (exc.code == "bad_cursor" and path.startswith(
        "/events"))


# ---- payload builders shared by both clients -----------------------------------------------


def farm_payload(name: str, public_ips: list[str] | None = None,
                 pricing: dict[str, Any] | None = None) -> dict[str, Any]:
    return _drop_none({"name": name, "public_ips": public_ips, "pricing": pricing})


def node_payload(
    farm: int,
    capacity: dict[str, int],
    country: str,
    city: str = "",
    endpoint: str = "",
    public_ips: list[str] | None = None,
    pricing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _drop_none({
        "farm": farm,
        "capacity": capacity,
        "location": {"country": country, "city": city},
        "endpoint": endpoint,
        "public_ips": public_ips,
        "pricing": pricing,
    })


def contract_payload(
    node: int,
    deployment_hash: str,
    instructions: str,
    signature_requirement: dict[str, Any],
    *,
    body_hash: str,
    delete_requirement: dict[str, Any] | None = None,
    deadline: int | None = None,
    capacity: dict[str, int] | None = None,
    approval: str | None = None,
    metadata: str | None = None,
    template: str | None = None,
    ipv4: int = 0,
    names: int = 0,
    ipv6: int = 0,
) -> dict[str, Any]:
    return _drop_none({
        "template": template,
        "ipv4": ipv4 or None,  # left out when zero: the payload stays what it was
        "names": names or None,
        "ipv6": ipv6 or None,
        "node": node,
        "deployment_hash": deployment_hash,
        "body_hash": body_hash,
        "instructions": instructions,
        "signature_requirement": signature_requirement,
        "delete_requirement": delete_requirement,
        "deadline": deadline,
        "capacity": capacity,
        "approval": approval,
        "metadata": metadata,
    })


class _NonceBook:
    """Next nonce per sender, shared by the threads (or tasks) of one client."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self.lock = threading.Lock()

    def take(self, sender: int) -> int | None:
        with self.lock:
            n = self._next.get(sender)
            if n is not None:
                self._next[sender] = n + 1
            return n

    def set(self, sender: int, next_nonce: int) -> None:
        with self.lock:
            self._next[sender] = next_nonce

    def forget(self, sender: int) -> None:
        with self.lock:
            self._next.pop(sender, None)


Obj = dict[str, Any]  # one object of the API's JSON
# What the getters give: of an object that may be missing (Obj | None), of a list, of an
# object that always exists; as values (LedgerClient) or awaitables (AsyncLedgerClient).
MaybeT = TypeVar("MaybeT")
ListT = TypeVar("ListT")
OneT = TypeVar("OneT")


class _Queries(Generic[MaybeT, ListT, OneT]):
    """The read side of the API, written once for both clients: each getter names its
    path; the client's `_get`, `_get_or_none` and `_get_list` make the request (blocking,
    or as a coroutine)."""

    def _get(self, path: str) -> OneT:
        raise NotImplementedError

    def _get_or_none(self, path: str) -> MaybeT:
        raise NotImplementedError

    def _get_list(self, path: str, filters: dict[str, Any]) -> ListT:
        raise NotImplementedError

    def head(self) -> OneT:
        """The last block's signed header: {height, hash, time, prev_hash, tx_root,
        tx_count, signatures} ({height: 0, hash, time, signatures: []} when empty)."""
        return self._get("/head")

    def validators(self) -> OneT:
        """The validator set: {epoch, validators, quorum, changes: [{epoch, validators,
        approvals, height, tx}]}."""
        return self._get("/validators")

    def header(self, height: int) -> MaybeT:
        """The signed header of block `height` (no transactions)."""
        return self._get_or_none(f"/blocks/{height}/header")

    def block(self, height: int) -> MaybeT:
        return self._get_or_none(f"/blocks/{height}")

    def tx(self, tx_hash: str) -> MaybeT:
        return self._get_or_none(f"/tx/{tx_hash}")

    def twin(self, twin_id: int) -> MaybeT:
        return self._get_or_none(f"/twins/{twin_id}")

    def twins(self, **filters: Any) -> ListT:
        """Filters: key (public hex), limit, offset."""
        return self._get_list("/twins", filters)

    def account(self, twin_id: int) -> MaybeT:
        return self._get_or_none(f"/accounts/{twin_id}")

    def payouts(self, twin_id: int) -> MaybeT:
        return self._get_or_none(f"/accounts/{twin_id}/payouts?limit=1000")

    def policy(self) -> OneT:
        """The grid's pricing policy (`policy` null: nothing is priced), supply, treasury."""
        return self._get("/policy")

    def node_prices(self, node_id: int) -> MaybeT:
        return self._get_or_none(f"/nodes/{node_id}/prices")

    def bill(self, contract_id: int) -> MaybeT:
        return self._get_or_none(f"/contracts/{contract_id}/bill")

    def farm(self, farm_id: int) -> MaybeT:
        return self._get_or_none(f"/farms/{farm_id}")

    def farms(self, **filters: Any) -> ListT:
        return self._get_list("/farms", filters)

    def farm_pool(self, farm_id: int) -> ListT:
        """The farm's public address pool: [{ip, farm, gateway, contract}] (0: free)."""
        return self._get_list(f"/farms/{farm_id}/pool", {})

    def node(self, node_id: int) -> MaybeT:
        return self._get_or_none(f"/nodes/{node_id}")

    def nodes(self, **filters: Any) -> ListT:
        """Filters: country, city, farm, twin, free_cru/mru/sru/hru, status, limit, offset."""
        return self._get_list("/nodes", filters)

    def billing_notice(self, contract_id: int) -> MaybeT:
        """Where a contract stands with its payments, signed by the governing key (the
        caller checks the signature: `zerostack.node.billing.check_notice`)."""
        return self._get_or_none(f"/contracts/{contract_id}/notice")

    def contract(self, contract_id: int) -> MaybeT:
        return self._get_or_none(f"/contracts/{contract_id}")

    def contracts(self, **filters: Any) -> ListT:
        """Filters: owner, node, state, twin (stakeholder), limit, offset."""
        return self._get_list("/contracts", filters)

    def template(self, template_hash: str) -> MaybeT:
        return self._get_or_none(f"/templates/{template_hash}")

    def templates(self, **filters: Any) -> ListT:
        return self._get_list("/templates", filters)

    def name(self, name: str) -> MaybeT:
        return self._get_or_none(f"/names/{name}")

    def solution(self, solution_id: int) -> MaybeT:
        return self._get_or_none(f"/solutions/{solution_id}")

    def solutions(self, **filters: Any) -> ListT:
        """Filters: owner, limit, offset."""
        return self._get_list("/solutions", filters)

    def names(self, **filters: Any) -> ListT:
        return self._get_list("/names", filters)


class LedgerClient(_Queries[Obj | None, list[Obj], Obj]):
    """Synchronous client (httpx)."""

    def __init__(self, url: str | list[str], *, timeout: float = 30.0) -> None:
        self.urls = ledger_urls(url)
        self._https = [httpx.Client(base_url=u, timeout=timeout) for u in self.urls]
        self._k = 0
        self._nonces = _NonceBook()
        self._twin_ids: dict[str, int] = {}

    @property
    def url(self) -> str:
        """The ledger URL in use (the next one is tried when it cannot be reached)."""
        return self.urls[self._k]

    def next_url(self) -> None:
        """Use the next URL from now on (the current replica failed a trust check)."""
        self._k = (self._k + 1) % len(self.urls)

    def close(self) -> None:
        for http in self._https:
            http.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                 body: Any = None, timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["content"] = orjson.dumps(body)
            kwargs["headers"] = {"content-type": "application/json"}
        if timeout is not None:
            kwargs["timeout"] = timeout
        for attempt in range(len(self.urls)):
            k = self._k
            try:
                with self._https[k].stream(method, path, params=params, **kwargs) as response:
                    content = bytearray()
                    for chunk in response.iter_bytes():
                        content += chunk
                        if len(content) > MAX_ANSWER:
                            raise _too_large(self.urls[k])
                return _decode(self.urls[k], method, response.status_code, bytes(content))
            except httpx.HTTPError as exc:
                error = LedgerError(f"cannot reach the ledger at {self.urls[k]}: {exc}",
                                    code="unreachable")
                error.__cause__ = exc
            except LedgerError as exc:
                if not _fail_over(exc, path) or attempt == len(self.urls) - 1:
                    raise
                error = exc
            if attempt == len(self.urls) - 1:
                raise error
            self._k = (k + 1) % len(self.urls)
        raise AssertionError("unreachable")

    def _get(self, path: str) -> Obj:
        result: Obj = self._request("GET", path)
        return result

    def _get_or_none(self, path: str) -> Obj | None:
        try:
            return self._get(path)
        except LedgerError as exc:
            if exc.status == 404:
                return None
            raise

    def _get_list(self, path: str, filters: dict[str, Any]) -> list[Obj]:
        result: list[Obj] = self._request("GET", path, params=_params(filters))
        return result

    # ---- submission ------------------------------------------------------------------

    def submit(self, tx: dict[str, Any]) -> dict[str, Any]:
        """Submit a signed transaction; returns {hash, height, receipt} or raises LedgerRejected.
        A transaction refused for its nonce that the ledger already holds (the same signed
        bytes, sent again after a replica failed mid-answer) is answered as committed."""
        try:
            result: dict[str, Any] = self._request("POST", "/tx", body=tx)
        except LedgerRejected as exc:
            if exc.code not in ("bad_nonce", "conflict") or len(self.urls) == 1:
                raise
            found = self.tx(tx_hash(tx))
            if found is None:
                raise
            return {"hash": found["hash"], "height": found["height"],
                    "receipt": found["receipt"]}
        return result

    def submit_many(self, txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Submit a batch; one result per transaction ({hash, height, receipt} or {error, code})."""
        data = self._request("POST", "/txs", body=txs)
        results: list[dict[str, Any]] = data["results"]
        if len(self.urls) > 1:
            for i, r in enumerate(results):
                if r.get("code") in ("bad_nonce", "conflict"):
                    found = self.tx(tx_hash(txs[i]))
                    if found is not None:
                        results[i] = {"hash": found["hash"], "height": found["height"],
                                      "receipt": found["receipt"]}
        return results

    def twin_id(self, identity: Identity) -> int:
        """The twin id of `identity` (raises if it is not registered)."""
        key = identity.public_hex
        if key not in self._twin_ids:
            twin = self.twin_by_key(key)
            if twin is None:
                raise LedgerError(f"identity {key[:16]}... is not a registered twin",
                                  code="not_found", status=404)
            self._twin_ids[key] = int(twin["id"])
        return self._twin_ids[key]

    def next_nonce(self, sender: int) -> int:
        twin = self.twin(sender)
        if twin is None:
            raise LedgerError(f"twin {sender} is not registered", code="not_found", status=404)
        return int(twin["nonce"])

    def send(self, identity: Identity, ttype: str, payload: dict[str, Any],
             *, sender: int | None = None) -> dict[str, Any]:
        """Sign and submit a transaction from `identity`'s twin, managing its nonce."""
        twin = sender if sender is not None else self.twin_id(identity)
        for attempt in range(NONCE_RETRIES + 1):
            try:
                return self.submit(sign_tx(identity, ttype, twin, self._take_nonce(twin),
                                           payload))
            except LedgerRejected as exc:
                self._nonces.forget(twin)
                if exc.code != "bad_nonce" or attempt == NONCE_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def send_many(self, identity: Identity, ttype: str, payloads: list[dict[str, Any]],
                  *, sender: int | None = None) -> list[dict[str, Any]]:
        """Sign and submit transactions of one type in one batch; one result per payload
        ({hash, height, receipt} or {error, code}). A refused transaction leaves a gap in
        the nonces: the ones after it are signed again with fresh nonces and resubmitted."""
        twin = sender if sender is not None else self.twin_id(identity)
        results: list[dict[str, Any]] = [{} for _ in payloads]
        todo = list(range(len(payloads)))
        for _ in range(NONCE_RETRIES + 1):
            if not todo:
                break
            txs = [sign_tx(identity, ttype, twin, self._take_nonce(twin), payloads[i])
                   for i in todo]
            batch = self.submit_many(txs)
            if any("error" in r for r in batch):
                self._nonces.forget(twin)
            todo = _merge_batch(todo, batch, results)
        return results

    def _take_nonce(self, twin: int) -> int:
        nonce = self._nonces.take(twin)
        if nonce is None:
            self._nonces.set(twin, self.next_nonce(twin))
            nonce = self._nonces.take(twin)
            assert nonce is not None
        return nonce

    def register_twin(self, identity: Identity, endpoint: str = "") -> int:
        """Register `identity` as a twin (or find it, if it already is); returns the twin id."""
        existing = self.twin_by_key(identity.public_hex)
        if existing is None:
            payload = {"endpoint": endpoint} if endpoint else {}
            try:
                tx = sign_tx(identity, "twin.register", identity.public_hex, 0, payload)
                result = self.submit(tx)
                twin_id = int(result["receipt"]["twin"])
            except LedgerRejected as exc:
                if exc.code != "conflict":
                    raise
                existing = self.twin_by_key(identity.public_hex)
                assert existing is not None
                twin_id = int(existing["id"])
        else:
            twin_id = int(existing["id"])
        self._twin_ids[identity.public_hex] = twin_id
        return twin_id

    def create_farm(self, identity: Identity, name: str, **kw: Any) -> int:
        return int(self.send(identity, "farm.create", farm_payload(name, **kw))["receipt"]["farm"])

    def register_node(self, identity: Identity, farm: int, capacity: dict[str, int],
                      country: str, **kw: Any) -> int:
        payload = node_payload(farm, capacity, country, **kw)
        return int(self.send(identity, "node.register", payload)["receipt"]["node"])

    def update_node(self, identity: Identity, farm: int, capacity: dict[str, int],
                    country: str, **kw: Any) -> dict[str, Any]:
        return self.send(identity, "node.update", node_payload(farm, capacity, country, **kw))

    def heartbeat(self, identity: Identity, used: dict[str, int] | None = None,
                  uptime: int | None = None) -> dict[str, Any]:
        return self.send(identity, "node.heartbeat", _drop_none({"used": used, "uptime": uptime}))

    def publish_template(self, identity: Identity, name: str, body: dict[str, Any],
                         version: str = "", description: str = "") -> str:
        payload = {"name": name, "version": version, "description": description, "body": body}
        return str(self.send(identity, "template.publish", payload)["receipt"]["template"])

    def create_contract(self, identity: Identity, node: int, deployment_hash: str,
                        instructions: str, signature_requirement: dict[str, Any],
                        *, approve: bool = True, **kw: Any) -> int:
        """Create a contract; with `approve`, the owner's approval travels with it."""
        if approve:
            kw.setdefault("approval", sign_approval(identity, 0, 1, node, deployment_hash))
        payload = contract_payload(node, deployment_hash, instructions, signature_requirement, **kw)
        return int(self.send(identity, "contract.create", payload)["receipt"]["contract"])

    def create_solution(self, identity: Identity, contracts: list[int],
                        metadata: str = "") -> int:
        """Group new contracts (created without approvals) into one solution."""
        payload = {"contracts": contracts, "metadata": metadata}
        return int(self.send(identity, "solution.create", payload)["receipt"]["solution"])

    def approve_solution(self, identity: Identity, solution: int,
                         parts: list[tuple[int, int, int, str]],
                         max_cost: int | None = None) -> dict[str, Any]:
        """Approve every part of `solution` at once; `parts` is what this side checked
        (contract, version, node, deployment hash): the signature covers exactly them.
        `max_cost`: the most the solution may cost per month (the ledger refuses the
        approval over it, and later versions of its parts that would go over it)."""
        sig = identity.sign(Domain.SOLUTION_APPROVAL, solution_digest(solution, parts)).hex()
        return self.send(identity, "solution.approve", _drop_none(
            {"solution": solution, "signature": sig, "max_cost": max_cost}))

    def approve(self, identity: Identity, contract: int, deployment_hash: str, *,
                version: int | None = None, node: int | None = None) -> dict[str, Any]:
        """Approve `deployment_hash` as `version` of `contract` on `node` (the signature
        binds all four, so it counts for nothing else; missing ones are read from the
        contract: a wrong answer only makes the approval fail)."""
        if version is None or node is None:
            c = self.contract(contract)
            if c is None:
                raise LedgerError(f"contract {contract} does not exist", code="not_found",
                                  status=404)
            version, node = int(c["version"]), int(c["node"])
        sig = sign_approval(identity, contract, version, node, deployment_hash)
        payload = {"contract": contract, "deployment_hash": deployment_hash, "signature": sig}
        return self.send(identity, "contract.approve", payload)

    def update_contract(self, identity: Identity, contract: int, deployment_hash: str,
                        instructions: str, *, version: int, node: int,
                        approve: bool = True, **kw: Any) -> dict[str, Any]:
        """Propose `deployment_hash` as `version` (the current one + 1) of `contract`."""
        if approve:
            kw.setdefault("approval", sign_approval(identity, contract, version, node,
                                                    deployment_hash))
        payload = _drop_none({"contract": contract, "deployment_hash": deployment_hash,
                              "instructions": instructions, **kw})
        return self.send(identity, "contract.update", payload)

    def cancel(self, identity: Identity, contract: int, *,
               node: int | None = None) -> dict[str, Any]:
        """Vote to cancel `contract` (signed for it and its node: the node checks votes)."""
        if node is None:
            c = self.contract(contract)
            if c is None:
                raise LedgerError(f"contract {contract} does not exist", code="not_found",
                                  status=404)
            node = int(c["node"])
        payload = {"contract": contract,
                   "signature": sign_cancel_vote(identity, contract, node)}
        return self.send(identity, "contract.cancel", payload)

    def report(self, identity: Identity, contract: int, version: int,
               workloads: list[dict[str, Any]], error: str = "") -> dict[str, Any]:
        payload = {"contract": contract, "version": version, "workloads": workloads,
                   "error": error}
        return self.send(identity, "contract.report", payload)

    def register_name(self, identity: Identity, name: str) -> dict[str, Any]:
        return self.send(identity, "name.register", {"name": name})

    def transfer(self, identity: Identity, to: int, amount: int) -> dict[str, Any]:
        return self.send(identity, "balance.transfer", {"to": to, "amount": amount})

    def faucet(self, identity: Identity, amount: int) -> dict[str, Any]:
        """Mint `amount` to `identity`'s twin (a development grid only)."""
        return self.send(identity, "balance.faucet", {"amount": amount})

    def set_farm_prices(self, identity: Identity, farm: int, prices: dict[str, int],
                        effective: int | None = None) -> dict[str, Any]:
        return self.send(identity, "farm.prices",
                         _drop_none({"farm": farm, "prices": prices, "effective": effective}))

    def report_consumption(self, identity: Identity, contract: int, period: int,
                           reserved: dict[str, int], traffic_in: int = 0,
                           traffic_out: int = 0, node: int | None = None) -> dict[str, Any]:
        """Send a node's consumption report, signed as a report (`consumption` domain) and
        as a transaction; `node` defaults to the contract's node."""
        if node is None:
            found = self.contract(contract)
            node = int(found["node"]) if found else 0
        return self.send(identity, "contract.consumption", consumption_payload(
            identity, contract, node, period, reserved, traffic_in, traffic_out))

    def release_name(self, identity: Identity, name: str) -> dict[str, Any]:
        return self.send(identity, "name.release", {"name": name})

    # ---- queries ---------------------------------------------------------------------

    def twin_by_key(self, public_hex: str) -> dict[str, Any] | None:
        found = self._get_list("/twins", {"key": public_hex})
        return found[0] if found else None

    # ---- events ----------------------------------------------------------------------

    def events(self, since: Cursor = 0, *, timeout: float = 25.0,
               **filters: Any) -> dict[str, Any]:
        """One long-poll: {head, next, events} for the events after cursor `since` (a block
        height H, or "H.I": after event I of block H; filters: node, contract, twin, type
        (prefix), full). Ask again with `since=next`; a cursor past the head is an error."""
        params = _params({"since": since, "timeout": timeout, **filters})
        return self._request("GET", "/events", params=params,
                             timeout=timeout + 10)

    def follow(self, since: Cursor = 0, *, timeout: float = 25.0,
               **filters: Any) -> Iterator[dict[str, Any]]:
        """Every matching event after `since`, forever (a generator; break out of it)."""
        while True:
            batch = self.events(since, timeout=timeout, **filters)
            yield from batch["events"]
            since = batch["next"]

    def wait_for(self, predicate: Callable[[], T | None], *, timeout: float = 30.0,
                 **filters: Any) -> T:
        """Return `predicate()` as soon as it is truthy, re-checking after each new block."""
        deadline = time.monotonic() + timeout
        since: Cursor = self.head()["height"]
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise LedgerError(f"timed out after {timeout:g} s waiting on the ledger",
                                  code="timeout")
            since = self.events(since, timeout=min(left, 25.0), **filters)["next"]

    def wait_contract(self, contract_id: int, states: set[str] | frozenset[str], *,
                      timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the contract is in one of `states`; returns the contract."""
        def check() -> dict[str, Any] | None:
            c = self.contract(contract_id)
            return c if c is not None and c["state"] in states else None
        return self.wait_for(check, timeout=timeout, contract=contract_id)


class AsyncLedgerClient(_Queries[Awaitable[Obj | None], Awaitable[list[Obj]],
                                   Awaitable[Obj]]):
    """Asyncio client (httpx.AsyncClient); the same methods as LedgerClient, awaitable."""

    def __init__(self, url: str | list[str], *, timeout: float = 30.0) -> None:
        self.urls = ledger_urls(url)
        self._https = [httpx.AsyncClient(base_url=u, timeout=timeout) for u in self.urls]
        self._k = 0
        self._nonces = _NonceBook()
        self._twin_ids: dict[str, int] = {}
        self._send_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """The ledger URL in use (the next one is tried when it cannot be reached)."""
        return self.urls[self._k]

    def next_url(self) -> None:
        """Use the next URL from now on (the current replica failed a trust check)."""
        self._k = (self._k + 1) % len(self.urls)

    async def close(self) -> None:
        for http in self._https:
            await http.aclose()

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       body: Any = None, timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["content"] = orjson.dumps(body)
            kwargs["headers"] = {"content-type": "application/json"}
        if timeout is not None:
            kwargs["timeout"] = timeout
        for attempt in range(len(self.urls)):
            k = self._k
            try:
                async with self._https[k].stream(method, path, params=params,
                                                 **kwargs) as response:
                    content = bytearray()
                    async for chunk in response.aiter_bytes():
                        content += chunk
                        if len(content) > MAX_ANSWER:
                            raise _too_large(self.urls[k])
                return _decode(self.urls[k], method, response.status_code, bytes(content))
            except httpx.HTTPError as exc:
                error = LedgerError(f"cannot reach the ledger at {self.urls[k]}: {exc}",
                                    code="unreachable")
                error.__cause__ = exc
            except LedgerError as exc:
                if not _fail_over(exc, path) or attempt == len(self.urls) - 1:
                    raise
                error = exc
            if attempt == len(self.urls) - 1:
                raise error
            self._k = (k + 1) % len(self.urls)
        raise AssertionError("unreachable")

    async def _get(self, path: str) -> Obj:
        result: Obj = await self._request("GET", path)
        return result

    async def _get_or_none(self, path: str) -> Obj | None:
        try:
            return await self._get(path)
        except LedgerError as exc:
            if exc.status == 404:
                return None
            raise

    async def _get_list(self, path: str, filters: dict[str, Any]) -> list[Obj]:
        result: list[Obj] = await self._request("GET", path, params=_params(filters))
        return result

    async def submit(self, tx: dict[str, Any]) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await self._request("POST", "/tx", body=tx)
        except LedgerRejected as exc:
            if exc.code not in ("bad_nonce", "conflict") or len(self.urls) == 1:
                raise
            found = await self.tx(tx_hash(tx))
            if found is None:
                raise
            return {"hash": found["hash"], "height": found["height"],
                    "receipt": found["receipt"]}
        return result

    async def submit_many(self, txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        data = await self._request("POST", "/txs", body=txs)
        results: list[dict[str, Any]] = data["results"]
        if len(self.urls) > 1:
            for i, r in enumerate(results):
                if r.get("code") in ("bad_nonce", "conflict"):
                    found = await self.tx(tx_hash(txs[i]))
                    if found is not None:
                        results[i] = {"hash": found["hash"], "height": found["height"],
                                      "receipt": found["receipt"]}
        return results

    async def twin_id(self, identity: Identity) -> int:
        key = identity.public_hex
        if key not in self._twin_ids:
            twin = await self.twin_by_key(key)
            if twin is None:
                raise LedgerError(f"identity {key[:16]}... is not a registered twin",
                                  code="not_found", status=404)
            self._twin_ids[key] = int(twin["id"])
        return self._twin_ids[key]

    async def next_nonce(self, sender: int) -> int:
        twin = await self.twin(sender)
        if twin is None:
            raise LedgerError(f"twin {sender} is not registered", code="not_found", status=404)
        return int(twin["nonce"])

    async def send(self, identity: Identity, ttype: str, payload: dict[str, Any],
                   *, sender: int | None = None) -> dict[str, Any]:
        """Sign and submit; transactions of one client are sent one at a time so their
        nonces reach the ledger in order."""
        twin = sender if sender is not None else await self.twin_id(identity)
        async with self._send_lock:
            for attempt in range(NONCE_RETRIES + 1):
                nonce = await self._take_nonce(twin)
                try:
                    return await self.submit(sign_tx(identity, ttype, twin, nonce, payload))
                except LedgerRejected as exc:
                    self._nonces.forget(twin)
                    if exc.code != "bad_nonce" or attempt == NONCE_RETRIES:
                        raise
        raise AssertionError("unreachable")

    async def send_many(self, identity: Identity, ttype: str, payloads: list[dict[str, Any]],
                        *, sender: int | None = None) -> list[dict[str, Any]]:
        """LedgerClient.send_many: one batch, refused nonces signed again and resubmitted."""
        twin = sender if sender is not None else await self.twin_id(identity)
        results: list[dict[str, Any]] = [{} for _ in payloads]
        todo = list(range(len(payloads)))
        async with self._send_lock:
            for _ in range(NONCE_RETRIES + 1):
                if not todo:
                    break
                txs = [sign_tx(identity, ttype, twin, await self._take_nonce(twin), payloads[i])
                       for i in todo]
                batch = await self.submit_many(txs)
                if any("error" in r for r in batch):
                    self._nonces.forget(twin)
                todo = _merge_batch(todo, batch, results)
        return results

    async def _take_nonce(self, twin: int) -> int:
        nonce = self._nonces.take(twin)
        if nonce is None:
            self._nonces.set(twin, await self.next_nonce(twin))
            nonce = self._nonces.take(twin)
            assert nonce is not None
        return nonce

    async def register_twin(self, identity: Identity, endpoint: str = "") -> int:
        existing = await self.twin_by_key(identity.public_hex)
        if existing is None:
            payload = {"endpoint": endpoint} if endpoint else {}
            try:
                tx = sign_tx(identity, "twin.register", identity.public_hex, 0, payload)
                twin_id = int((await self.submit(tx))["receipt"]["twin"])
            except LedgerRejected as exc:
                if exc.code != "conflict":
                    raise
                existing = await self.twin_by_key(identity.public_hex)
                assert existing is not None
                twin_id = int(existing["id"])
        else:
            twin_id = int(existing["id"])
        self._twin_ids[identity.public_hex] = twin_id
        return twin_id

    async def create_farm(self, identity: Identity, name: str, **kw: Any) -> int:
        result = await self.send(identity, "farm.create", farm_payload(name, **kw))
        return int(result["receipt"]["farm"])

    async def register_node(self, identity: Identity, farm: int, capacity: dict[str, int],
                            country: str, **kw: Any) -> int:
        payload = node_payload(farm, capacity, country, **kw)
        return int((await self.send(identity, "node.register", payload))["receipt"]["node"])

    async def update_node(self, identity: Identity, farm: int, capacity: dict[str, int],
                          country: str, **kw: Any) -> dict[str, Any]:
        return await self.send(identity, "node.update",
                               node_payload(farm, capacity, country, **kw))

    async def heartbeat(self, identity: Identity, used: dict[str, int] | None = None,
                        uptime: int | None = None) -> dict[str, Any]:
        return await self.send(identity, "node.heartbeat",
                               _drop_none({"used": used, "uptime": uptime}))

    async def publish_template(self, identity: Identity, name: str, body: dict[str, Any],
                               version: str = "", description: str = "") -> str:
        payload = {"name": name, "version": version, "description": description, "body": body}
        return str((await self.send(identity, "template.publish", payload))["receipt"]["template"])

    async def create_contract(self, identity: Identity, node: int, deployment_hash: str,
                              instructions: str, signature_requirement: dict[str, Any],
                              *, approve: bool = True, **kw: Any) -> int:
        if approve:
            kw.setdefault("approval", sign_approval(identity, 0, 1, node, deployment_hash))
        payload = contract_payload(node, deployment_hash, instructions, signature_requirement, **kw)
        return int((await self.send(identity, "contract.create", payload))["receipt"]["contract"])

    async def approve(self, identity: Identity, contract: int, deployment_hash: str, *,
                      version: int | None = None, node: int | None = None) -> dict[str, Any]:
        """Approve `deployment_hash` as `version` of `contract` on `node` (the signature
        binds all four, so it counts for nothing else; missing ones are read from the
        contract: a wrong answer only makes the approval fail)."""
        if version is None or node is None:
            c = await self.contract(contract)
            if c is None:
                raise LedgerError(f"contract {contract} does not exist", code="not_found",
                                  status=404)
            version, node = int(c["version"]), int(c["node"])
        sig = sign_approval(identity, contract, version, node, deployment_hash)
        payload = {"contract": contract, "deployment_hash": deployment_hash, "signature": sig}
        return await self.send(identity, "contract.approve", payload)

    async def update_contract(self, identity: Identity, contract: int, deployment_hash: str,
                              instructions: str, *, version: int, node: int,
                              approve: bool = True, **kw: Any) -> dict[str, Any]:
        """Propose `deployment_hash` as `version` (the current one + 1) of `contract`."""
        if approve:
            kw.setdefault("approval", sign_approval(identity, contract, version, node,
                                                    deployment_hash))
        payload = _drop_none({"contract": contract, "deployment_hash": deployment_hash,
                              "instructions": instructions, **kw})
        return await self.send(identity, "contract.update", payload)

    async def cancel(self, identity: Identity, contract: int, *,
                     node: int | None = None) -> dict[str, Any]:
        """Vote to cancel `contract` (signed for it and its node: the node checks votes)."""
        if node is None:
            c = await self.contract(contract)
            if c is None:
                raise LedgerError(f"contract {contract} does not exist", code="not_found",
                                  status=404)
            node = int(c["node"])
        payload = {"contract": contract,
                   "signature": sign_cancel_vote(identity, contract, node)}
        return await self.send(identity, "contract.cancel", payload)

    async def report(self, identity: Identity, contract: int, version: int,
                     workloads: list[dict[str, Any]], error: str = "") -> dict[str, Any]:
        payload = {"contract": contract, "version": version, "workloads": workloads,
                   "error": error}
        return await self.send(identity, "contract.report", payload)

    async def register_name(self, identity: Identity, name: str) -> dict[str, Any]:
        return await self.send(identity, "name.register", {"name": name})

    async def release_name(self, identity: Identity, name: str) -> dict[str, Any]:
        return await self.send(identity, "name.release", {"name": name})

    async def twin_by_key(self, public_hex: str) -> dict[str, Any] | None:
        found = await self._get_list("/twins", {"key": public_hex})
        return found[0] if found else None

    async def events(self, since: Cursor = 0, *, timeout: float = 25.0,
                     **filters: Any) -> dict[str, Any]:
        params = _params({"since": since, "timeout": timeout, **filters})
        return await self._request("GET", "/events", params=params,
                                   timeout=timeout + 10)

    async def follow(self, since: Cursor = 0, *, timeout: float = 25.0,
                     **filters: Any) -> AsyncIterator[dict[str, Any]]:
        while True:
            batch = await self.events(since, timeout=timeout, **filters)
            for event in batch["events"]:
                yield event
            since = batch["next"]

    async def wait_for(self, predicate: Callable[[], Awaitable[T | None]], *,
                       timeout: float = 30.0, **filters: Any) -> T:
        """Return `await predicate()` as soon as it is truthy, re-checking after each block."""
        deadline = time.monotonic() + timeout
        since: Cursor = (await self.head())["height"]
        while True:
            value = await predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise LedgerError(f"timed out after {timeout:g} s waiting on the ledger",
                                  code="timeout")
            since = (await self.events(since, timeout=min(left, 25.0), **filters))["next"]

    async def wait_contract(self, contract_id: int, states: set[str] | frozenset[str], *,
                            timeout: float = 30.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            c = await self.contract(contract_id)
            return c if c is not None and c["state"] in states else None
        return await self.wait_for(check, timeout=timeout, contract=contract_id)


def consumption_payload(identity: Identity, contract: int, node: int, period: int,
                        reserved: dict[str, int], traffic_in: int = 0,
                        traffic_out: int = 0) -> dict[str, Any]:
    """A `contract.consumption` payload with the node's `consumption` signature."""
    from zerostack.ledger.tx import sign_consumption

    return {"contract": contract, "period": period, "reserved": reserved,
            "traffic_in": traffic_in, "traffic_out": traffic_out,
            "signature": sign_consumption(identity, contract, node, period, reserved,
                                          traffic_in, traffic_out)}
