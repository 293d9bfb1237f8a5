"""The grid explorer in Debian's headless Chromium against a real ledger server with a small
grid: the numbers each page shows, live updates, escaping, the Content-Security-Policy,
a phone-sized viewport, and a lying server whose tampered block the page marks invalid."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.conftest import zerostack_cmd
from tests.ledger.explorer_support import (
    CHROMIUM,
    Ledger,
    SmallGrid,
    chromium,
    ledger_server,
    new_contract,
    seed,
    tampering_server,
)
from tests.ledger.world import GiB, hashes, requirement, sealed
from zerostack.crypto import Identity, approval_digest
from zerostack.ledger import LedgerClient, sign_tx
from zerostack.ledger.explorer import CSP

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs chromium (scripts/install-system-deps installs it)")

TIMEOUT = 15_000  # ms: a loaded CI machine
expect.set_options(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ledger, SmallGrid, Any]]:
    with ledger_server(tmp_path_factory.mktemp("explorer") / "ledger.db") as ledger:
        grid = seed(ledger)
        with chromium() as browser:
            yield ledger, grid, browser


@pytest.fixture
def page(world: tuple[Ledger, SmallGrid, Any]) -> Iterator[Any]:
    _, _, browser = world
    p = browser.new_page()
    p.set_default_timeout(TIMEOUT)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        yield p
    finally:
        p.close()
    assert not errors, f"the page reported errors: {errors}"


def open_page(page: Any, url: str, route: str, ready: str) -> None:
    page.goto(f"{url}/explorer#/{route}")
    page.wait_for_selector(ready)


def rows(page: Any, selector: str) -> list[list[str]]:
    result: list[list[str]] = page.eval_on_selector_all(
        f"{selector} tbody tr",
        "trs => trs.map(tr => Array.from(tr.cells, c => c.textContent.trim()))")
    return result


def test_grid_counts_nodes_by_country_farm_and_status(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    open_page(page, ledger.url, "grid", "#nodes tbody tr")
    assert page.text_content("#totals") == "6 nodes: 4 up, 2 down · 3 countries · 3 farms"
    assert rows(page, "#by-country") == [["BE", "3", "3"], ["DE", "1", "0"], ["NL", "2", "1"]]
    assert rows(page, "#by-farm") == [["flanders #1", "3", "3"], ["polder #2", "2", "1"],
                                      ["spree #3", "1", "0"]]
    nodes = {r[0]: r for r in rows(page, "#nodes")}
    assert len(nodes) == 6
    assert nodes[f"node {g.nodes['berlin1']}"][2:4] == ["DE, Berlin", "○ down"]
    assert nodes[f"node {g.nodes['liege1']}"][2:4] == ["BE, Liège", "● up"]
    # gent1: 1 core used (heartbeat), 2 reserved by the contract, 6 free of 8
    bar = page.get_attribute("#nodes tbody tr:first-child td.cap .bar", "aria-label")
    assert bar == "CPU: used 1 cores, reserved 2 cores, free 6 cores of 8 cores"
    # filter by country, then by status, then search, from the keyboard
    page.select_option("#f-country", "NL")
    expect(page.locator("#nodes tbody tr")).to_have_count(2)
    page.select_option("#f-status", "down")
    expect(page.locator("#nodes tbody tr")).to_have_count(1)
    assert rows(page, "#nodes")[0][0] == f"node {g.nodes['ams2']}"
    page.select_option("#f-country", "")
    page.select_option("#f-status", "")
    page.focus("#f-q")
    page.keyboard.type("liège")
    page.keyboard.press("Enter")
    expect(page.locator("#nodes tbody tr")).to_have_count(1)
    assert rows(page, "#nodes")[0][0] == f"node {g.nodes['liege1']}"
    assert page.text_content("#shown") == "nodes 1\u20131 of 1"


_CONTRAST = """() => {
  const rgb = (c) => c.match(/[0-9.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const worst = [];
  let checked = 0;
  for (const el of document.querySelectorAll('body *')) {
    const text = Array.from(el.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!text || !el.offsetParent) continue;
    checked++;
    const a = lum(rgb(getComputedStyle(el).color));
    const b = lum(background(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) worst.push([el.tagName, el.className, el.textContent.slice(0, 30), ratio]);
  }
  return {worst, checked};
}"""


def test_text_contrast_is_at_least_4_5_to_1_on_every_page(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    for route, ready in (("grid", "#nodes tbody tr"), (f"contract/{g.contracts['web']}",
                                                       "#workloads"),
                         (f"approve/{g.contracts['vote']}", "#approve-cli"),
                         ("chain", "#chain-summary.ok")):
        open_page(page, ledger.url, route, ready)
        result = page.evaluate(_CONTRAST)
        assert result["worst"] == [] and result["checked"] > 20, (route, result)


def test_every_control_has_a_label_and_pages_are_reached_by_keyboard(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, _, _ = world
    open_page(page, ledger.url, "grid", "#nodes tbody tr")
    unlabelled = page.evaluate("""() => Array.from(document.querySelectorAll('input, select'))
        .filter(e => !e.id || !document.querySelector(`label[for="${e.id}"]`)).length""")
    assert unlabelled == 0
    # Tab from the top reaches the skip link, then the navigation; Enter follows a link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "skip"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Contracts"
    page.keyboard.press("Enter")
    page.wait_for_selector("#contracts tbody tr")
    assert page.get_attribute("nav a[data-tab=contracts]", "aria-current") == "page"


def test_node_page_shows_contracts_reports_and_heartbeats(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    open_page(page, ledger.url, f"node/{g.nodes['gent1']}", "#heartbeats")
    assert [r[0] for r in rows(page, "#node-contracts")] == [f"contract {g.contracts['web']}"]
    beats = rows(page, "#heartbeats")
    assert len(beats) == 1 and beats[0][2:] == ["3600 s", "1 cores, 2 GiB"]
    assert beats[0][1].startswith("20") and beats[0][1].endswith("Z")  # the block's time
    reports = rows(page, "#node-reports")
    assert len(reports) == 1
    assert reports[0][1:] == [f"contract {g.contracts['web']}", "v1", "web: ok, data: ok",
                              "✔ signed by the node"]


def test_contract_page_shows_approvals_and_the_signed_report(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    open_page(page, ledger.url, f"contract/{g.contracts['web']}", "#workloads")
    assert page.text_content("#contract-state") == "deployed"
    assert rows(page, "#stakeholders")[0][4] == "✔ approved, signature checked"
    assert rows(page, "#workloads") == [
        ["web", "container", "ok", "running", "ip=10.20.0.2", ""],
        ["data", "volume", "ok", "", "", ""]]
    assert "✔ signed by node" in page.text_content("#report-signature")


def test_a_stakeholder_finds_the_contracts_waiting_for_them(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    open_page(page, ledger.url, "contracts", "#contracts tbody tr")
    page.fill("#c-twin", str(g.twins["carol"]))
    page.select_option("#c-state", "created")  # applies the form
    expect(page.locator("#contracts tbody tr")).to_have_count(1)
    first = rows(page, "#contracts")[0]
    assert first[0] == f"contract {g.contracts['vote']}" and first[-1] == "review and approve"
    page.click("#contracts tbody tr a:text('review and approve')")
    page.wait_for_selector("#approve-cli")


def test_approval_view_shows_what_is_signed_and_the_cli_line(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    cid, dhash = g.contracts["vote"], g.hashes["vote"]
    open_page(page, ledger.url, f"approve/{cid}", "#approve-cli")
    cli = page.text_content("#approve-cli")
    assert cli == f"zerostack approve {cid} --hash {dhash} --ledger {ledger.url} -i NAME"
    digest = approval_digest(cid, 1, g.nodes["ams1"], dhash).hex()
    assert digest in page.text_content("#signed-fields")
    approvers = {r[0]: r for r in rows(page, "#approvers")}
    alice, bob = g.twins["alice"], g.twins["bob"]
    assert approvers[f"{alice} (owner)"][2:] == ["1", "required",
                                                 "✔ approved, signature checked"]
    assert approvers[str(bob)][2:] == ["1", "required", "not yet"]
    # outside text is text: the metadata's markup is shown, not rendered
    assert "shared database <b>not bold</b>" in page.text_content("#signed-fields")
    assert page.query_selector("main b") is None
    # the line is what the CLI takes: every option it uses exists
    usage = subprocess.run([*zerostack_cmd(), "approve", "--help"], capture_output=True,
                           text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for option in ("--hash", "--ledger", "--identity", "-i"):
        assert option in usage


def test_an_update_shows_both_quorums_it_needs(world: tuple[Ledger, SmallGrid, Any],
                                              page: Any) -> None:
    ledger, g, _ = world
    cid = new_contract(ledger, g, 50)  # bob alone: active at once
    keys = {g.twins[k]: g.ids[k].public_hex for k in g.ids}
    req = requirement(keys, g.twins["bob"], g.twins["carol"], required=(g.twins["carol"],))
    ids = hashes(51, req)
    with LedgerClient(ledger.url) as client:
        client.update_contract(g.ids["bob"], cid, ids["deployment_hash"], sealed(), version=2,
                               node=g.nodes["gent2"], body_hash=ids["body_hash"],
                               signature_requirement=req)
    open_page(page, ledger.url, f"approve/{cid}", "#running-approvers")
    bob, carol = g.twins["bob"], g.twins["carol"]
    new = {r[0]: r[4] for r in rows(page, "#approvers")}
    assert new == {f"{bob} (owner)": "✔ approved, signature checked", str(carol): "not yet"}
    running = {r[0]: r[4] for r in rows(page, "#running-approvers")}
    assert running == {f"{bob} (owner)": "✔ approved, signature checked"}
    assert "running version 1" in page.text_content("#running-approvers caption")


def test_templates_tab_lists_the_catalogue(world: tuple[Ledger, SmallGrid, Any],
                                           page: Any) -> None:
    ledger, g, _ = world
    open_page(page, ledger.url, "templates", "#templates tbody tr")
    assert page.is_visible("#tab-templates")
    name, version, description, params, author, _, _, line = rows(page, "#templates")[0][:8]
    assert (name, version, description, params, author) == (
        "wordpress", "1.0", "A blog with its database", "domain, memory, theme",
        f"twin {g.twins['carol']}")
    # the line that deploys it: the parameters without a default and the required roles
    assert line == ("zerostack deploy wordpress -p domain=STRING -p memory=INTEGER "
                    "--stakeholder legal=TWIN")


def test_a_new_contract_appears_without_a_reload(world: tuple[Ledger, SmallGrid, Any],
                                                 page: Any) -> None:
    ledger, g, _ = world
    open_page(page, ledger.url, "contracts", "#contracts tbody tr")
    expect(page.locator("#live")).to_contain_text("following the ledger")
    page.evaluate("window.notReloaded = true")
    before = len(rows(page, "#contracts"))
    cid = new_contract(ledger, g, 1)
    page.wait_for_selector(f"#contracts tr[data-contract='{cid}']")
    assert len(rows(page, "#contracts")) == before + 1
    assert page.evaluate("window.notReloaded") is True
    # and the chain page shows the new block as it comes, verified
    page.click("nav a[data-tab=chain]")
    page.wait_for_selector("#chain-summary.ok")
    top = int(page.get_attribute("#blocks article", "data-height"))
    cid2 = new_contract(ledger, g, 2)
    page.wait_for_selector(f"#block-{top + 1}")
    assert page.get_attribute(f"#block-{top + 1}", "class") == "block"
    assert cid2 > cid and page.evaluate("window.notReloaded") is True


def test_chain_blocks_verify_in_the_browser(world: tuple[Ledger, SmallGrid, Any],
                                           page: Any) -> None:
    ledger, _, _ = world
    open_page(page, ledger.url, "chain", "#chain-summary.ok")
    assert page.text_content("#chain-summary").startswith("All 20 blocks shown verified")
    assert page.query_selector(".block.invalid") is None
    top = int(page.get_attribute("#blocks article", "data-height"))
    page.click("#older")
    expect(page.locator("#blocks article")).to_have_count(top)  # down to block 1
    assert page.query_selector(".block.invalid") is None
    page.click("#block-1 h3 a")
    page.wait_for_selector("#page-title:text('Block 1')")
    assert page.text_content("#block-1 h3") == "Block 1 ✔ verified"


def _edit_payload(target: str) -> Any:
    def tamper(path: str, data: Any) -> Any:
        if path.startswith("/blocks/") and not path.endswith("/header"):
            for tx in data.get("txs", []):
                if tx["type"] == "contract.create" and tx["payload"].get("metadata") == target:
                    tx["payload"]["metadata"] = "shared database, now on a cheaper node"
        return data
    return tamper


def _resign(path: str, data: Any) -> Any:
    # a header whose time moved: its hash and the operator's signature no longer match
    if path.startswith("/blocks/") and data.get("tx_count") and data["txs"][0]["type"] == \
            "template.publish":
        data["time"] += 1
    return data


@pytest.mark.parametrize("tamper", [_edit_payload("shared database <b>not bold</b>"), _resign],
                         ids=["edited transaction", "edited header"])
def test_a_tampered_block_from_a_lying_server_is_shown_invalid(
        world: tuple[Ledger, SmallGrid, Any], tamper: Any) -> None:
    ledger, _, browser = world
    # (this server has no event stream: the page's console reports that, it is no error)
    with tampering_server(ledger.url, tamper) as fake, closing(browser.new_page()) as page:
        page.set_default_timeout(TIMEOUT)
        page.goto(f"{fake}/explorer#/chain")
        page.wait_for_selector("#chain-summary.bad")
        invalid = page.query_selector_all(".block.invalid")
        assert len(invalid) == 1
        assert "1 of 20 blocks shown FAILED" in page.text_content("#chain-summary")
        if tamper is _resign:
            assert "the block hash is not the hash of its header" in invalid[0].text_content()
        else:
            bad_tx = invalid[0].query_selector("tr.invalid")
            assert bad_tx is not None
            assert "INVALID: the signature does not match" in bad_tx.text_content()
            assert "tx_root does not match" in invalid[0].text_content()


def test_phone_sized_viewport_does_not_scroll_sideways(
        world: tuple[Ledger, SmallGrid, Any], page: Any) -> None:
    ledger, g, _ = world
    page.set_viewport_size({"width": 375, "height": 740})
    for route, ready in (("grid", "#nodes tbody tr"), (f"approve/{g.contracts['vote']}",
                                                       "#approve-cli"),
                         ("chain", "#chain-summary.ok")):
        open_page(page, ledger.url, route, ready)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{route}: the page is {width} px wide on a 375 px screen"


def test_screenshots_of_every_page(world: tuple[Ledger, SmallGrid, Any], page: Any,
                                   tmp_path: Path) -> None:
    """`make screenshots` runs this with EXPLORER_SCREENSHOTS=docs/explorer."""
    ledger, g, _ = world
    out = Path(os.environ.get("EXPLORER_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    shots = [("grid", "grid", "#nodes tbody tr"),
             ("node", f"node/{g.nodes['gent1']}", "#heartbeats"),
             ("contracts", "contracts", "#contracts tbody tr"),
             ("contract", f"contract/{g.contracts['web']}", "#workloads"),
             ("approve", f"approve/{g.contracts['vote']}", "#approve-cli"),
             ("chain", "chain", "#chain-summary.ok"),
             ("templates", "templates", "#templates tbody tr")]
    for name, route, ready in shots:
        open_page(page, ledger.url, route, ready)
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.screenshot(path=str(out / f"{name}.png"), full_page=name != "chain")
        assert (out / f"{name}.png").stat().st_size > 10_000
    page.set_viewport_size({"width": 375, "height": 740})
    open_page(page, ledger.url, "grid", "#nodes tbody tr")
    page.screenshot(path=str(out / "phone.png"))


def test_responses_carry_a_strict_policy_and_serve_only_known_files(
        world: tuple[Ledger, SmallGrid, Any]) -> None:
    ledger, _, _ = world
    with httpx.Client(base_url=ledger.url) as http:
        page = http.get("/explorer", headers={"accept-encoding": "gzip"})
        assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        script = http.get("/explorer/static/app.js", headers={"accept-encoding": "gzip"})
        assert script.headers["content-encoding"] == "gzip"
        assert script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text and "innerHTML" not in http.get(
            "/explorer/static/verify.js").text
        etag = script.headers["etag"]
        assert http.get("/explorer/static/app.js",
                        headers={"if-none-match": etag}).status_code == 304
        for bad in ("../api.py", "..%2Froutes.py", "%2e%2e/__init__.py", "nope.js",
                    "/etc/passwd", "index.html"):
            answer = http.get(f"/explorer/static/{bad}")
            assert answer.status_code == 404, bad
            assert b"import" not in answer.content and b"root:" not in answer.content
        assert http.get("/explorer/static/nope.js").headers["content-security-policy"] == CSP
        grid = http.get("/explorer/api/grid", params={"country": "NL", "limit": 1}).json()
        assert (grid["nodes_total"], grid["matched"], len(grid["nodes"])) == (6, 2, 1)
        for params in ({"limit": 501}, {"q": "x" * 65}, {"country": "nl"},
                       {"status": "sideways"}, {"offset": -1}):
            assert http.get("/explorer/api/grid", params=params).status_code == 422, params


def test_grid_follows_new_nodes_and_heartbeats_live(world: tuple[Ledger, SmallGrid, Any],
                                                    tmp_path: Path) -> None:
    _, _, browser = world
    with ledger_server(tmp_path / "ledger.db") as ledger, LedgerClient(ledger.url) as client, \
            closing(browser.new_page()) as page:
        page.set_default_timeout(TIMEOUT)
        farmer, first, second = Identity.generate(), Identity.generate(), Identity.generate()
        for ident in (farmer, first, second):
            client.register_twin(ident)
        farm = client.create_farm(farmer, "live")
        client.register_node(first, farm, {"cru": 4, "mru": 8 * GiB}, "BE")
        ledger.clock.offset += 700  # the first node is down by now
        open_page(page, ledger.url, "grid", "#nodes tbody tr")
        expect(page.locator("#live")).to_contain_text("following the ledger")
        assert page.text_content("#totals") == "1 nodes: 0 up, 1 down · 1 countries · 1 farms"
        page.evaluate("window.notReloaded = true")
        client.register_node(second, farm, {"cru": 8, "mru": 16 * GiB}, "NL")
        expect(page.locator("#totals")).to_have_text(
            "2 nodes: 1 up, 1 down · 2 countries · 1 farms")
        client.heartbeat(first, used={"cru": 1})
        expect(page.locator("#totals")).to_have_text(
            "2 nodes: 2 up, 0 down · 2 countries · 1 farms")
        assert page.evaluate("window.notReloaded") is True


def test_a_block_of_many_senders_is_checked_with_their_keys_in_one_request(
        world: tuple[Ledger, SmallGrid, Any], tmp_path: Path) -> None:
    _, _, browser = world
    with ledger_server(tmp_path / "ledger.db") as ledger, LedgerClient(ledger.url) as client, \
            closing(browser.new_page()) as page:
        page.set_default_timeout(TIMEOUT)
        idents = [Identity.generate() for _ in range(40)]
        twins = [client.register_twin(ident) for ident in idents]
        results = client.submit_many([
            sign_tx(ident, "farm.create", twin, 1, {"name": f"farm-{twin}"})
            for ident, twin in zip(idents, twins, strict=True)])
        heights = {r["height"] for r in results}
        assert all("receipt" in r for r in results) and len(heights) <= 3
        single: list[str] = []
        page.on("request", lambda r: single.append(r.url) if "/twins/" in r.url else None)
        page.goto(f"{ledger.url}/explorer#/chain")
        page.wait_for_selector("#chain-summary.ok")
        biggest = max(heights, key=lambda h: sum(r["height"] == h for r in results))
        summary = page.text_content(f"#block-{biggest} summary")
        assert summary.endswith("transactions: farm.create") and int(summary.split()[0]) >= 14
        # one request per sender would be 40 (a block of under 4 senders asks one by one)
        assert len(single) < 10, f"keys looked up one by one: {single}"
        page.click(f"#block-{biggest} summary")
        rows = page.locator(f"#block-{biggest} tbody tr")
        expect(rows).to_have_count(int(summary.split()[0]))
        assert page.locator(f"#block-{biggest} tbody tr.invalid").count() == 0
