// The grid explorer: one read-only page over the ledger's JSON API and event stream.
// Every value from the server reaches the page as text (textContent, attributes set one
// by one), never as HTML; hashes and signatures on the chain page are re-checked here.
import {
  Domain, approvalDigest, checkBlock, checkTx, toHex, verifySignature,
} from './verify.js';

const main = document.getElementById('main');
const liveStatus = document.getElementById('live');
const GiB = 2 ** 30;
const CHAIN_PAGE = 20;
const HISTORY_BLOCKS = 1000;

// ---- small helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function link(href, text) {
  return el('a', { href }, text);
}

function short(hash, n = 12) {
  const s = String(hash ?? '');
  return s.length > n ? `${s.slice(0, n)}…` : s;
}

function code(text, full) {
  return el('code', { title: full ?? text }, text);
}

function bytes(n) {
  if (n >= 2 ** 40) return `${(n / 2 ** 40).toFixed(1)} TiB`;
  if (n >= GiB) return `${(n / GiB).toFixed(n % GiB ? 1 : 0)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(0)} MiB`;
  return `${n} B`;
}

const UNITS = [
  ['cru', 'CPU', (n) => `${n} cores`],
  ['mru', 'Memory', bytes],
  ['sru', 'SSD', bytes],
  ['hru', 'HDD', bytes],
];

function ago(seconds, now) {
  if (!seconds) return 'never';
  const d = Math.max(0, now - seconds);
  if (d < 90) return `${d} s ago`;
  if (d < 5400) return `${Math.round(d / 60)} min ago`;
  if (d < 172800) return `${Math.round(d / 3600)} h ago`;
  return `${Math.round(d / 86400)} days ago`;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace('.000Z', 'Z') : '—';
}

// A stacked bar: used, reserved beyond what is used, free; its text says the same.
function capacityBar(label, total, used, reserved, free, fmt) {
  const pct = (n) => (total > 0 ? `${Math.min(100, (100 * n) / total).toFixed(1)}%` : '0%');
  const extra = Math.max(0, reserved - used);
  const text = `${label}: used ${fmt(used)}, reserved ${fmt(reserved)}, free ${fmt(free)} of ${fmt(total)}`;
  const bar = el('span', { class: 'bar', role: 'img', 'aria-label': text, title: text });
  const parts = [['used', used], ['reserved', extra], ['free', free]];
  for (const [cls, n] of parts) {
    const seg = el('span', { class: `seg ${cls}` });
    seg.style.width = pct(n); // CSSOM, allowed by the style-src policy
    bar.append(seg);
  }
  return bar;
}

function table(caption, headers, rows, attrs = {}) {
  return el('table', attrs,
    el('caption', {}, caption),
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, rows));
}

function badge(ok, yes = 'valid', no = 'INVALID') {
  return el('span', { class: ok ? 'ok' : 'bad' }, ok ? `✔ ${yes}` : `✘ ${no}`);
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  const res = await fetch(path, { headers: { accept: 'application/json' }, cache: 'no-store' });
  let body = null;
  try {
    body = await res.json();
  } catch {
    throw new HttpError(res.status, `${path}: the answer is not JSON`);
  }
  if (!res.ok) throw new HttpError(res.status, `${path}: ${body && body.error ? body.error : res.status}`);
  return body;
}

function say(text) {
  liveStatus.textContent = text;
}

function setPage(title, ...content) {
  main.replaceChildren(el('h2', { id: 'page-title' }, title), ...content.filter((c) => c !== null && c !== undefined));
  document.title = `${title} · zerostack explorer`;
}

function failure(err) {
  return el('p', { class: 'bad', role: 'alert' }, `Could not load: ${err.message || err}`);
}

// Twin keys, looked up once: the chain page checks each transaction's signature with it.
// At most a few lookups run at a time (a block of 1,000 new twins would otherwise open
// 1,000 requests at once); a block with many senders loads their range in one list.
const twinKeys = new Map();
let lookups = 0;
const queued = [];
async function limited(fn) {
  if (lookups >= 6) await new Promise((resolve) => queued.push(resolve));
  lookups++;
  try {
    return await fn();
  } finally {
    lookups--;
    const next = queued.shift();
    if (next) next();
  }
}

function keyOf(twin) {
  if (!twinKeys.has(twin)) {
    twinKeys.set(twin, limited(() => api(`/twins/${Number(twin)}`)).then((t) => t.public_key));
  }
  return twinKeys.get(twin);
}

async function preloadKeys(txs) {
  const ids = [...new Set(txs.map((tx) => tx.sender).filter((s) => Number.isInteger(s) && !twinKeys.has(s)))];
  if (ids.length < 4) return;
  const low = Math.min(...ids);
  const count = Math.max(...ids) - low + 1;
  if (count > 10000 || count > 8 * ids.length) return; // too sparse for one list: one by one
  try {
    const twins = await api(`/twins?offset=${low - 1}&limit=${count}`);
    for (const t of twins) {
      if (Number.isInteger(t.id) && !twinKeys.has(t.id)) twinKeys.set(t.id, Promise.resolve(t.public_key));
    }
  } catch {
    // each missing key is then looked up on its own
  }
}

// ---- grid ------------------------------------------------------------------------------

const gridState = { country: '', farm: '', status: '', q: '', offset: 0, limit: 50 };

function gridQuery() {
  const p = new URLSearchParams();
  for (const k of ['country', 'farm', 'status', 'q']) if (gridState[k]) p.set(k, gridState[k]);
  p.set('offset', String(gridState.offset));
  p.set('limit', String(gridState.limit));
  return p.toString();
}

function summaryBars(cap) {
  return el('div', { class: 'bars' }, UNITS.map(([, label, fmt], i) => {
    const total = cap.total[i];
    const reserved = cap.reserved[i];
    const used = cap.used[i];
    const free = Math.max(0, total - Math.max(used, reserved));
    return el('div', { class: 'barline' }, el('span', { class: 'barlabel' }, label),
      capacityBar(label, total, used, reserved, free, fmt),
      el('span', { class: 'bartext' }, `${fmt(Math.max(used, reserved))} of ${fmt(total)} taken`));
  }));
}

function filterForm(view) {
  const countrySel = el('select', { id: 'f-country', name: 'country' },
    el('option', { value: '' }, 'all countries'),
    view.countries.map(([c, n]) => el('option', { value: c, selected: c === gridState.country }, `${c} (${n})`)));
  const farmSel = el('select', { id: 'f-farm', name: 'farm' },
    el('option', { value: '' }, 'all farms'),
    view.farms.map(([id, name, n]) => el('option', { value: String(id), selected: String(id) === gridState.farm },
      `${name || 'farm'} #${id} (${n})`)));
  const statusSel = el('select', { id: 'f-status', name: 'status' },
    ['', 'up', 'down'].map((s) => el('option', { value: s, selected: s === gridState.status }, s || 'up or down')));
  const search = el('input', { id: 'f-q', name: 'q', type: 'search', maxlength: 64,
    value: gridState.q, autocomplete: 'off', placeholder: 'node id, farm, city' });
  const form = el('form', { class: 'filters', role: 'search', 'aria-label': 'Filter nodes' },
    el('div', {}, el('label', { for: 'f-country' }, 'Country'), countrySel),
    el('div', {}, el('label', { for: 'f-farm' }, 'Farm'), farmSel),
    el('div', {}, el('label', { for: 'f-status' }, 'Status'), statusSel),
    el('div', {}, el('label', { for: 'f-q' }, 'Search'), search),
    el('div', {}, el('button', { type: 'submit' }, 'Apply')));
  const apply = () => {
    gridState.country = countrySel.value;
    gridState.farm = farmSel.value;
    gridState.status = statusSel.value;
    gridState.q = search.value.trim();
    gridState.offset = 0;
    loadGrid(true);
  };
  form.addEventListener('submit', (e) => { e.preventDefault(); apply(); });
  for (const s of [countrySel, farmSel, statusSel]) s.addEventListener('change', apply);
  let timer = 0;
  search.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(apply, 300); });
  return form;
}

function nodeRows(view) {
  return view.nodes.map((r) => {
    const [id, farm, country, city, up, heartbeat, cap, used, reserved, free] = r;
    return el('tr', {},
      el('td', {}, link(`#/node/${id}`, `node ${id}`)),
      el('td', {}, String(farm)),
      el('td', {}, city ? `${country}, ${city}` : country),
      el('td', {}, el('span', { class: up ? 'up' : 'down' }, up ? '● up' : '○ down')),
      el('td', {}, ago(heartbeat, view.now)),
      UNITS.map(([, label, fmt], i) => el('td', { class: 'cap' },
        capacityBar(label, cap[i], used[i], reserved[i], free[i], fmt))));
  });
}

let gridSeq = 0;
async function loadGrid(keepFocus) {
  const seq = ++gridSeq;
  let view;
  try {
    view = await api(`/explorer/api/grid?${gridQuery()}`);
  } catch (err) {
    setPage('Grid', failure(err));
    return;
  }
  if (seq !== gridSeq || route().name !== 'grid') return;
  const active = keepFocus ? document.activeElement && document.activeElement.id : null;
  const down = view.nodes_total - view.up;
  const first = view.matched ? view.offset + 1 : 0;
  const last = Math.min(view.offset + view.nodes.length, view.matched);
  const pager = el('div', { class: 'pager' },
    el('button', { type: 'button', id: 'prev', disabled: view.offset === 0,
      onclick: () => { gridState.offset = Math.max(0, gridState.offset - gridState.limit); loadGrid(); } }, '← Previous'),
    el('span', { id: 'shown' }, `nodes ${first}–${last} of ${view.matched}`),
    el('button', { type: 'button', id: 'next', disabled: last >= view.matched,
      onclick: () => { gridState.offset += gridState.limit; loadGrid(); } }, 'Next →'));
  const countries = table('Nodes by country', ['Country', 'Nodes', 'Up'],
    view.countries.map(([c, n, u]) => el('tr', {},
      el('th', { scope: 'row' }, el('button', { type: 'button', class: 'linkish',
        onclick: () => { gridState.country = c; gridState.offset = 0; loadGrid(); } }, c)),
      el('td', {}, String(n)), el('td', {}, String(u)))), { id: 'by-country' });
  const farms = table(`Nodes by farm (${view.farms_total} farms)`, ['Farm', 'Nodes', 'Up'],
    view.farms.map(([id, name, n, u]) => el('tr', {},
      el('th', { scope: 'row' }, el('button', { type: 'button', class: 'linkish',
        onclick: () => { gridState.farm = String(id); gridState.offset = 0; loadGrid(); } }, `${name || 'farm'} #${id}`)),
      el('td', {}, String(n)), el('td', {}, String(u)))), { id: 'by-farm' });
  const nodes = table('Nodes', ['Node', 'Farm', 'Location', 'Status', 'Heartbeat',
    'CPU', 'Memory', 'SSD', 'HDD'], nodeRows(view), { id: 'nodes' });
  setPage('Grid',
    el('section', { 'aria-labelledby': 'totals-title' },
      el('h3', { id: 'totals-title' }, 'Totals'),
      el('p', { id: 'totals' }, `${view.nodes_total} nodes: `, el('span', { class: 'up' }, `${view.up} up`), ', ',
        el('span', { class: 'down' }, `${down} down`), ` · ${view.countries.length} countries · ${view.farms_total} farms`),
      summaryBars(view.capacity),
      el('p', { class: 'legend' }, el('span', { class: 'seg used key' }), ' used (heartbeat) ',
        el('span', { class: 'seg reserved key' }), ' reserved by contracts ',
        el('span', { class: 'seg free key' }), ' free')),
    filterForm(view),
    el('div', { class: 'scroll' }, nodes),
    pager,
    el('div', { class: 'pair' }, el('div', { class: 'scroll' }, countries), el('div', { class: 'scroll' }, farms)));
  if (active) document.getElementById(active)?.focus();
  performance.mark('grid-rendered');
}

// ---- a node ----------------------------------------------------------------------------

async function head() {
  return api('/head');
}

async function recentEvents(filter) {
  const h = await head();
  const since = Math.max(0, h.height - HISTORY_BLOCKS);
  const p = new URLSearchParams({ ...filter, since: String(since), timeout: '0', full: 'true' });
  return (await api(`/events?${p}`)).events;
}

async function loadNode(id) {
  let node;
  let contracts;
  let beats;
  let reports;
  try {
    [node, contracts, beats, reports] = await Promise.all([
      api(`/nodes/${id}`),
      api(`/contracts?node=${id}&limit=1000`),
      recentEvents({ node: String(id), type: 'node.heartbeat' }),
      recentEvents({ node: String(id), type: 'contract.report' }),
    ]);
  } catch (err) {
    setPage(`Node ${id}`, failure(err));
    return;
  }
  if (route().name !== 'node') return;
  const now = Math.floor(Date.now() / 1000);
  const key = await keyOf(node.twin).catch(() => '');
  const facts = el('dl', { class: 'facts' },
    el('dt', {}, 'Status'), el('dd', {}, el('span', { class: node.status === 'up' ? 'up' : 'down' }, node.status),
      ` (last heartbeat ${ago(node.last_heartbeat, now)}, uptime ${node.uptime} s)`),
    el('dt', {}, 'Farm'), el('dd', {}, String(node.farm)),
    el('dt', {}, 'Twin'), el('dd', {}, String(node.twin), ' ', code(short(key, 16), key)),
    el('dt', {}, 'Location'), el('dd', {}, node.location.city ? `${node.location.country}, ${node.location.city}` : node.location.country),
    el('dt', {}, 'Endpoint'), el('dd', {}, node.endpoint || '—'),
    el('dt', {}, 'Registered'), el('dd', {}, when(node.created)));
  const bars = el('div', { class: 'bars' }, UNITS.map(([u, label, fmt]) => el('div', { class: 'barline' },
    el('span', { class: 'barlabel' }, label),
    capacityBar(label, node.capacity[u], node.used[u], node.reserved[u], node.free[u], fmt),
    el('span', { class: 'bartext' }, `free ${fmt(node.free[u])} of ${fmt(node.capacity[u])}`))));
  const cRows = contracts.map((c) => el('tr', {},
    el('td', {}, link(`#/contract/${c.id}`, `contract ${c.id}`)), el('td', {}, c.state),
    el('td', {}, String(c.owner)), el('td', {}, String(c.version)),
    el('td', {}, code(short(c.deployment_hash), c.deployment_hash))));
  const recent = beats.slice(-50).reverse();
  const times = new Map(await Promise.all([...new Set(recent.map((e) => e.height))].map(
    (h) => api(`/blocks/${h}/header`).then((hd) => [h, hd.time], () => [h, 0]))));
  const beatRows = recent.map((e) => {
    const p = e.tx.payload;
    return el('tr', {}, el('td', {}, link(`#/block/${e.height}`, String(e.height))),
      el('td', {}, when(times.get(e.height))),
      el('td', {}, p.uptime === undefined || p.uptime === null ? '—' : `${p.uptime} s`),
      el('td', {}, p.used ? `${p.used.cru ?? 0} cores, ${bytes(p.used.mru ?? 0)}` : '—'));
  });
  const reportRows = [];
  for (const e of reports.slice(-50).reverse()) {
    const check = await checkTx(e.tx, keyOf);
    const p = e.tx.payload;
    reportRows.push(el('tr', {}, el('td', {}, link(`#/block/${e.height}`, String(e.height))),
      el('td', {}, link(`#/contract/${p.contract}`, `contract ${p.contract}`)),
      el('td', {}, `v${p.version}`),
      el('td', {}, p.error ? `error: ${p.error}` : (p.workloads || []).map((w) => `${w.name}: ${w.state}`).join(', ')),
      el('td', {}, badge(check.ok, 'signed by the node', 'bad signature'))));
  }
  setPage(`Node ${id}`, facts,
    el('h3', {}, 'Capacity'), bars,
    el('div', { class: 'scroll' }, table(`Contracts on node ${id}`, ['Contract', 'State', 'Owner', 'Version', 'Deployment'], cRows, { id: 'node-contracts' })),
    el('div', { class: 'scroll' }, table(`Reports (last ${HISTORY_BLOCKS} blocks)`, ['Block', 'Contract', 'Version', 'Workloads', 'Signature'], reportRows, { id: 'node-reports' })),
    el('div', { class: 'scroll' }, table(`Heartbeats (last ${HISTORY_BLOCKS} blocks, newest first)`, ['Block', 'Time', 'Uptime', 'Used'], beatRows, { id: 'heartbeats' })));
}

// ---- contracts -------------------------------------------------------------------------

const contractFilter = { state: '', owner: '', node: '', twin: '' };
const STATES = ['created', 'approved', 'deployed', 'error', 'grace', 'cancelled', 'deleted', 'expired'];

function approvalWeight(c) {
  const req = c.signature_requirement;
  const signed = new Set(Object.keys(c.approvals || {}).map(Number));
  let weight = 0;
  for (const r of req.requests) if (signed.has(r.twin)) weight += r.weight;
  return `${weight} of ${req.weight_required}`;
}

let contractsSeq = 0;
async function loadContracts() {
  const seq = ++contractsSeq;
  const p = new URLSearchParams({ limit: '1000' });
  for (const k of ['state', 'owner', 'node', 'twin']) if (contractFilter[k]) p.set(k, contractFilter[k]);
  let list;
  try {
    list = await api(`/contracts?${p}`);
  } catch (err) {
    setPage('Contracts', failure(err));
    return;
  }
  if (seq !== contractsSeq || route().name !== 'contracts') return;
  const active = document.activeElement && document.activeElement.id;
  const stateSel = el('select', { id: 'c-state' }, el('option', { value: '' }, 'any state'),
    STATES.map((s) => el('option', { value: s, selected: s === contractFilter.state }, s)));
  const owner = el('input', { id: 'c-owner', type: 'number', min: 1, inputmode: 'numeric', value: contractFilter.owner });
  const node = el('input', { id: 'c-node', type: 'number', min: 1, inputmode: 'numeric', value: contractFilter.node });
  const twin = el('input', { id: 'c-twin', type: 'number', min: 1, inputmode: 'numeric', value: contractFilter.twin });
  const form = el('form', { class: 'filters', role: 'search', 'aria-label': 'Filter contracts' },
    el('div', {}, el('label', { for: 'c-state' }, 'State'), stateSel),
    el('div', {}, el('label', { for: 'c-owner' }, 'Owner twin'), owner),
    el('div', {}, el('label', { for: 'c-node' }, 'Node'), node),
    el('div', {}, el('label', { for: 'c-twin' }, 'Stakeholder twin'), twin),
    el('div', {}, el('button', { type: 'submit' }, 'Apply')));
  const apply = (e) => {
    if (e) e.preventDefault();
    contractFilter.state = stateSel.value;
    contractFilter.owner = /^[0-9]+$/.test(owner.value) ? owner.value : '';
    contractFilter.node = /^[0-9]+$/.test(node.value) ? node.value : '';
    contractFilter.twin = /^[0-9]+$/.test(twin.value) ? twin.value : '';
    loadContracts();
  };
  form.addEventListener('submit', apply);
  stateSel.addEventListener('change', apply);
  const rows = list.slice().reverse().map((c) => el('tr', { 'data-contract': c.id },
    el('td', {}, link(`#/contract/${c.id}`, `contract ${c.id}`)),
    el('td', {}, el('span', { class: `state ${c.state}` }, c.state)),
    el('td', {}, String(c.owner)),
    el('td', {}, link(`#/node/${c.node}`, `node ${c.node}`)),
    el('td', {}, String(c.version)),
    el('td', {}, approvalWeight(c)),
    el('td', {}, c.pending ? link(`#/approve/${c.id}`, 'review and approve') : '—')));
  setPage('Contracts', form,
    el('p', { id: 'contract-count' }, `${list.length} contracts`),
    el('div', { class: 'scroll' }, table('Contracts, newest first', ['Contract', 'State', 'Owner', 'Node', 'Version', 'Approval weight', 'Pending'], rows, { id: 'contracts' })));
  if (active) document.getElementById(active)?.focus();
}

// Check each approval of a version in the browser: the stakeholder's key (as the signed
// requirement names it) over {contract, version, node, deployment_hash}. The owner's
// approval made with the create names contract 0.
async function checkApprovals(c, version) {
  const out = new Map();
  for (const [twin, sig] of Object.entries(version.approvals || {})) {
    const request = version.signature_requirement.requests.find((r) => r.twin === Number(twin));
    if (!request) {
      out.set(Number(twin), false);
      continue;
    }
    let ok = await verifySignature(Domain.APPROVAL, request.key,
      approvalDigest(c.id, version.version, c.node, version.deployment_hash), sig);
    if (!ok && Number(twin) === c.owner) {
      ok = await verifySignature(Domain.APPROVAL, request.key,
        approvalDigest(0, version.version, c.node, version.deployment_hash), sig);
    }
    out.set(Number(twin), ok);
  }
  return out;
}

function stakeholderTable(c, version, checks, caption, id) {
  const rows = version.signature_requirement.requests.map((r) => {
    const signed = Object.prototype.hasOwnProperty.call(version.approvals || {}, String(r.twin));
    return el('tr', {},
      el('td', {}, String(r.twin), r.twin === c.owner ? ' (owner)' : ''),
      el('td', {}, code(short(r.key, 16), r.key)),
      el('td', {}, String(r.weight)),
      el('td', {}, r.required ? 'required' : 'optional'),
      el('td', {}, signed ? badge(checks.get(r.twin), 'approved, signature checked', 'approval signature INVALID') : 'not yet'));
  });
  return table(caption, ['Twin', 'Key', 'Weight', 'Required', 'Approval'], rows, { id });
}

// An update needs the running version's quorum too: its stakeholders cannot be dropped
// without their consent. The table checks the pending version's approvals against it.
async function runningQuorum(c) {
  if (!c.pending || !c.active || c.active.version === c.version) return null;
  const running = { version: c.version, deployment_hash: c.deployment_hash, approvals: c.approvals,
    signature_requirement: c.active.signature_requirement };
  const checks = await checkApprovals(c, running);
  return el('div', { class: 'scroll' }, stakeholderTable(c, running, checks,
    `This updates running version ${c.active.version}: its stakeholders must approve too (weight required: ${c.active.signature_requirement.weight_required})`,
    'running-approvers'));
}

async function reportCheck(c) {
  if (!c.report) return null;
  const events = await recentEvents({ contract: String(c.id), type: 'contract.report' }).catch(() => []);
  const mine = events.filter((e) => e.tx.payload.version === c.report.version).pop();
  if (!mine) return { found: false };
  const node = await api(`/nodes/${c.node}`);
  const key = await keyOf(node.twin);
  const result = await checkTx(mine.tx, async () => key);
  return { found: true, ok: result.ok, height: mine.height, hash: result.hash };
}

async function loadContract(id) {
  let c;
  try {
    c = await api(`/contracts/${id}`);
  } catch (err) {
    setPage(`Contract ${id}`, failure(err));
    return;
  }
  const proposal = { version: c.version, deployment_hash: c.deployment_hash, approvals: c.approvals,
    signature_requirement: c.signature_requirement };
  const checks = await checkApprovals(c, proposal);
  const running = await runningQuorum(c);
  const report = await reportCheck(c).catch(() => null);
  if (route().name !== 'contract') return;
  const facts = el('dl', { class: 'facts' },
    el('dt', {}, 'State'), el('dd', { id: 'contract-state' }, el('span', { class: `state ${c.state}` }, c.state)),
    el('dt', {}, 'Owner'), el('dd', {}, `twin ${c.owner}`),
    el('dt', {}, 'Node'), el('dd', {}, link(`#/node/${c.node}`, `node ${c.node}`)),
    el('dt', {}, 'Version'), el('dd', {}, String(c.version), c.active && c.active.version !== c.version ? ` (running: ${c.active.version})` : ''),
    el('dt', {}, 'Deployment hash'), el('dd', {}, code(c.deployment_hash)),
    el('dt', {}, 'Approval weight'), el('dd', { id: 'approval-weight' }, approvalWeight(c)),
    el('dt', {}, 'Reserved'), el('dd', {}, `${c.capacity.cru} cores, ${bytes(c.capacity.mru)} memory, ${bytes(c.capacity.sru)} SSD, ${bytes(c.capacity.hru)} HDD`),
    el('dt', {}, 'Metadata'), el('dd', {}, c.metadata || '—'),
    el('dt', {}, 'Created'), el('dd', {}, when(c.created)),
    el('dt', {}, 'Updated'), el('dd', {}, when(c.updated)));
  const parts = [facts];
  if (c.pending) {
    parts.push(el('p', {}, link(`#/approve/${c.id}`, `Version ${c.version} waits for approvals: review what stakeholders sign`)));
  }
  parts.push(el('div', { class: 'scroll' }, stakeholderTable(c, proposal, checks,
    `Stakeholders of version ${c.version} (weight required: ${c.signature_requirement.weight_required})`, 'stakeholders')), running);
  if (c.delete_requirement) {
    const votes = new Set(Object.keys(c.cancel_votes || {}).map(Number));
    parts.push(el('div', { class: 'scroll' }, table(`Cancelling needs weight ${c.delete_requirement.weight_required}`,
      ['Twin', 'Weight', 'Required', 'Voted to cancel'],
      c.delete_requirement.requests.map((r) => el('tr', {}, el('td', {}, String(r.twin)), el('td', {}, String(r.weight)),
        el('td', {}, r.required ? 'required' : 'optional'), el('td', {}, votes.has(r.twin) ? 'yes' : 'no'))))));
  }
  if (c.report) {
    const sig = report && report.found
      ? el('p', { id: 'report-signature' }, 'Node report: ', badge(report.ok, `signed by node ${c.node}'s key`, 'signature does not match the node'),
        ' — transaction ', code(short(report.hash), report.hash), ' in block ', link(`#/block/${report.height}`, String(report.height)))
      : el('p', { id: 'report-signature' }, `Node report of version ${c.report.version}: its transaction is older than the last ${HISTORY_BLOCKS} blocks; signature not checked here.`);
    const rows = (c.report.workloads || []).map((w) => el('tr', {},
      el('td', {}, w.name), el('td', {}, w.type || '—'), el('td', {}, el('span', { class: `state ${w.state}` }, w.state)),
      el('td', {}, w.message || ''),
      el('td', {}, Object.entries(w.data || {}).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(', ')),
      el('td', {}, w.sealed ? 'sealed to the owner' : '')));
    parts.push(el('h3', {}, `Node report (version ${c.report.version}, ${when(c.report.time)})`), sig,
      c.report.error ? el('p', { class: 'bad' }, `node error: ${c.report.error}`) : null,
      el('div', { class: 'scroll' }, table('Workloads as the node reported them', ['Workload', 'Type', 'State', 'Message', 'Result', 'Secret'], rows, { id: 'workloads' })));
  } else {
    parts.push(el('p', {}, 'The node has not reported on this contract yet.'));
  }
  setPage(`Contract ${id}`, ...parts);
}

// ---- approval view ---------------------------------------------------------------------

function ledgerUrl() {
  return window.location.origin;
}

async function loadApprove(id) {
  let c;
  try {
    c = await api(`/contracts/${id}`);
  } catch (err) {
    setPage(`Approve contract ${id}`, failure(err));
    return;
  }
  const proposal = { version: c.version, deployment_hash: c.deployment_hash, approvals: c.approvals,
    signature_requirement: c.signature_requirement };
  const checks = await checkApprovals(c, proposal);
  const running = await runningQuorum(c);
  let template = null;
  if (c.billing && c.billing.template) template = await api(`/templates/${encodeURIComponent(c.billing.template)}`).catch(() => null);
  if (route().name !== 'approve') return;
  const digest = toHex(approvalDigest(c.id, c.version, c.node, c.deployment_hash));
  // from the server: quoted for the shell like every other word of a line the page offers
  const cli = `zerostack approve ${shellWord(c.id)} --hash ${shellWord(c.deployment_hash)} --ledger ${shellWord(ledgerUrl())} -i NAME`;
  const copy = el('button', { type: 'button', id: 'copy-cli', onclick: async () => {
    try {
      await navigator.clipboard.writeText(cli);
      say('command copied');
    } catch {
      say('copy failed: select the command and copy it');
    }
  } }, 'Copy command');
  const parts = [
    c.pending ? el('p', {}, `Contract ${c.id} asks its stakeholders to approve version ${c.version}. ` +
      'Approving consents to run exactly this deployment, as this version of this contract, on this node.')
      : el('p', { class: 'note' }, `Version ${c.version} of contract ${c.id} is not waiting for approvals (state: ${c.state}).`),
    el('h3', {}, 'What you sign'),
    el('dl', { class: 'facts', id: 'signed-fields' },
      el('dt', {}, 'Contract'), el('dd', {}, String(c.id)),
      el('dt', {}, 'Version'), el('dd', {}, String(c.version)),
      el('dt', {}, 'Node'), el('dd', {}, link(`#/node/${c.node}`, `node ${c.node}`)),
      el('dt', {}, 'Owner'), el('dd', {}, `twin ${c.owner}`),
      el('dt', {}, 'Deployment hash'), el('dd', {}, code(c.deployment_hash)),
      el('dt', {}, 'Signed digest'), el('dd', {}, code(digest), el('br'),
        el('small', {}, 'blake2b-256 of {contract, version, node, deployment_hash}, computed in this browser; the signature is ed25519 in the "approval" domain')),
      el('dt', {}, 'Resources reserved'), el('dd', {}, `${c.capacity.cru} CPU cores, ${bytes(c.capacity.mru)} memory, ${bytes(c.capacity.sru)} SSD, ${bytes(c.capacity.hru)} HDD`),
      el('dt', {}, 'Description'), el('dd', {}, c.metadata || '—')),
    el('h3', {}, 'Workloads'),
    el('p', {}, 'The workloads themselves are sealed to the node and to each stakeholder: ' +
      'the ledger only holds them encrypted, so this page cannot show them. The command below opens them with your own key, ' +
      'recomputes the deployment hash, refuses to sign if it is not the hash above, and lists every workload (image, command, ' +
      'CPU, memory, disks, network) before asking you to confirm.'),
  ];
  if (template) {
    parts.push(el('p', {}, `Made from template ${template.name} ${template.version} (author twin ${template.author}):`),
      el('pre', { class: 'json' }, JSON.stringify(template.body, null, 2)));
  }
  parts.push(
    el('div', { class: 'scroll' }, stakeholderTable(c, proposal, checks,
      `Who approves (weight required: ${c.signature_requirement.weight_required}; now ${approvalWeight(c)})`, 'approvers')),
    running,
    el('h3', {}, 'Approve from the command line'),
    el('p', {}, 'Run, with NAME the identity of your twin (see zerostack id):'),
    el('pre', { class: 'cli' }, el('code', { id: 'approve-cli' }, cli)),
    copy);
  setPage(`Approve contract ${id}`, ...parts);
}

// ---- chain -----------------------------------------------------------------------------

let operatorKey = null;
const chainState = { top: 0, shown: [] };

function blockRow(block, check, prevOk) {
  const problems = [...check.problems];
  if (prevOk === false) problems.push('prev_hash is not the hash of the block before');
  const ok = problems.length === 0;
  const txRows = () => (block.txs || []).map((tx, i) => el('tr', { class: check.txs[i].ok ? '' : 'invalid' },
    el('td', {}, String(i)), el('td', {}, tx.type), el('td', {}, short(String(tx.sender), 16)),
    el('td', {}, code(short(check.txs[i].hash, 16), check.txs[i].hash)),
    el('td', {}, badge(check.txs[i].ok, 'valid', `INVALID: ${check.txs[i].why}`))));
  const count = (block.txs || []).length;
  // a block's transaction table is built when it is opened: blocks may hold thousands
  const details = count ? el('details', { open: !ok }, el('summary', {}, '')) : null;
  const fill = () => {
    if (details.dataset.filled) return;
    details.dataset.filled = '1';
    details.append(el('div', { class: 'scroll' }, table(`Transactions of block ${block.height}`,
      ['#', 'Type', 'Sender', 'Hash', 'Check'], txRows())));
  };
  if (details) {
    if (!ok) fill();
    details.addEventListener('toggle', () => details.open && fill());
  }
  const types = [...new Set((block.txs || []).map((tx) => tx.type))].join(', ');
  const article = el('article', { class: ok ? 'block' : 'block invalid', 'data-height': block.height, id: `block-${block.height}` },
    el('h3', {}, link(`#/block/${block.height}`, `Block ${block.height}`), ' ', badge(ok, 'verified', 'INVALID')),
    el('p', { class: 'blockline' }, `${when(block.time)} · hash `, code(short(block.hash, 16), block.hash)),
    ok ? null : el('ul', { class: 'bad' }, problems.slice(0, 10).map((p) => el('li', {}, p)),
      problems.length > 10 ? el('li', {}, `and ${problems.length - 10} more`) : null),
    details || el('p', { class: 'note' }, 'no transactions'));
  if (details) details.firstChild.textContent = `${count} transaction${count === 1 ? '' : 's'}: ${types}`;
  return article;
}

async function verifiedBlock(height) {
  const block = await api(`/blocks/${height}`);
  await preloadKeys(block.txs || []);
  const check = await checkBlock(block, operatorKey, keyOf);
  return { block, check };
}

async function showBlocks(heights, list, append) {
  const results = [];
  for (const h of heights) results.push(await verifiedBlock(h));
  for (const r of results) chainState.shown.push(r);
  chainState.shown.sort((a, b) => b.block.height - a.block.height);
  const byHeight = new Map(chainState.shown.map((r) => [r.block.height, r]));
  const rendered = chainState.shown.map((r) => {
    const before = byHeight.get(r.block.height - 1);
    const prevOk = before ? before.block.hash === r.block.prev_hash : (r.block.height === 1 ? r.block.prev_hash === '0'.repeat(64) : undefined);
    return blockRow(r.block, r.check, prevOk);
  });
  list.replaceChildren(...rendered);
  const bad = chainState.shown.filter((r) => list.querySelector(`#block-${r.block.height}.invalid`)).length;
  document.getElementById('chain-summary').textContent = bad
    ? `${bad} of ${chainState.shown.length} blocks shown FAILED verification in this browser.`
    : `All ${chainState.shown.length} blocks shown verified in this browser: header hashes, transaction hashes, tx roots, links and ed25519 signatures.`;
  document.getElementById('chain-summary').className = bad ? 'bad' : 'ok';
  if (!append) performance.mark('chain-verified');
}

async function loadChain() {
  let h;
  try {
    [h, operatorKey] = await Promise.all([head(), api('/operator').then((o) => o.key)]);
  } catch (err) {
    setPage('Chain', failure(err));
    return;
  }
  chainState.top = h.height;
  chainState.shown = [];
  const list = el('div', { id: 'blocks' });
  const older = el('button', { type: 'button', id: 'older', onclick: async () => {
    const lowest = Math.min(...chainState.shown.map((r) => r.block.height));
    const heights = [];
    for (let x = lowest - 1; x >= 1 && heights.length < CHAIN_PAGE; x--) heights.push(x);
    older.disabled = true;
    await showBlocks(heights, list, true);
    older.disabled = heights.length === 0 || Math.min(...heights) <= 1;
  } }, 'Older blocks');
  setPage('Chain',
    el('p', {}, 'Operator key (signs every block header): ', code(operatorKey)),
    el('p', { id: 'chain-summary', role: 'status' }, 'verifying…'),
    list, older);
  const heights = [];
  for (let x = h.height; x >= 1 && heights.length < CHAIN_PAGE; x--) heights.push(x);
  older.disabled = heights.length === 0 || Math.min(...heights) <= 1;
  if (heights.length === 0) {
    document.getElementById('chain-summary').textContent = 'The chain is empty.';
    return;
  }
  await showBlocks(heights, list, false);
}

async function loadBlock(height) {
  try {
    operatorKey = operatorKey || (await api('/operator')).key;
    const { block, check } = await verifiedBlock(height);
    let prevOk;
    if (height > 1) prevOk = (await api(`/blocks/${height - 1}/header`)).hash === block.prev_hash;
    setPage(`Block ${height}`, blockRow(block, check, prevOk));
  } catch (err) {
    setPage(`Block ${height}`, failure(err));
  }
}

// ---- templates -------------------------------------------------------------------------

async function loadTemplates() {
  let list;
  try {
    list = await api('/templates?limit=1000');
  } catch (err) {
    setPage('Templates', failure(err));
    return;
  }
  // a name deploys its latest version; an older one is deployed by its hash
  const latest = new Map();
  for (const t of list) {
    const seen = latest.get(t.name);
    if (!seen || (t.created ?? 0) >= (seen.created ?? 0)) latest.set(t.name, t);
  }
  const rows = list.map((t) => {
    const params = t.body && typeof t.body.parameters === 'object' && t.body.parameters !== null
      ? Object.keys(t.body.parameters).join(', ') : '—';
    const line = deployLine(t, latest.get(t.name) === t ? t.name : t.hash);
    return el('tr', {},
      el('td', {}, t.name), el('td', {}, t.version || '—'), el('td', {}, t.description || ''),
      el('td', {}, params), el('td', {}, `twin ${t.author}`),
      el('td', {}, `${(t.author_share ?? 0) / 100}%`),
      el('td', {}, code(short(t.hash, 16), t.hash)),
      el('td', { class: 'deploy' }, el('code', {}, line)));
  });
  setPage('Templates',
    el('p', {}, `${list.length} template${list.length === 1 ? "" : "s"} published. Show one with: `, el('code', {}, 'zerostack template show NAME'),
      '. Deploy one with the line in its row: parameters without a default and the stakeholder roles that must approve need a value (',
      el('code', {}, '--dry-run'), ' shows the plan and its price first).'),
    el('div', { class: 'scroll' }, table('Template catalogue', ['Name', 'Version', 'Description', 'Parameters', 'Author', 'Author share', 'Hash', 'Deploy with'], rows, { id: 'templates' })));
}

function shellWord(text) {
  // the line is for a shell: anything but plain characters is quoted
  const s = String(text);
  return /^[A-Za-z0-9_.,:=@%+\/-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

function deployLine(t, ref) {
  // `zerostack deploy REF -p KEY=VALUE …`: the parameters without a default (a
  // placeholder naming the type) and the required stakeholder roles (ROLE=TWIN)
  const words = ['zerostack', 'deploy', shellWord(ref)];
  const body = t.body && typeof t.body === 'object' ? t.body : {};
  const params = body.parameters && typeof body.parameters === 'object' ? body.parameters : {};
  for (const [key, spec] of Object.entries(params)) {
    if (spec && typeof spec === 'object' && 'default' in spec) continue;
    const type = spec && typeof spec.type === 'string' ? spec.type.toUpperCase() : 'VALUE';
    words.push('-p', shellWord(`${key}=${type}`));
  }
  for (const role of Array.isArray(body.stakeholders) ? body.stakeholders : []) {
    if (role && typeof role === 'object' && role.required && typeof role.role === 'string') {
      words.push('--stakeholder', shellWord(`${role.role}=TWIN`));
    }
  }
  return words.join(' ');
}

// ---- routing and live updates ----------------------------------------------------------

function route() {
  const hash = window.location.hash;
  const m = /^#\/([a-z]+)(?:\/([0-9]{1,15}))?$/.exec(hash);
  if (!m) return { name: 'grid' };
  return { name: m[1], id: m[2] === undefined ? null : Number(m[2]) };
}

function render() {
  const r = route();
  for (const a of document.querySelectorAll('nav a')) {
    const current = a.dataset.tab === r.name || (a.dataset.tab === 'contracts' && (r.name === 'contract' || r.name === 'approve'))
      || (a.dataset.tab === 'chain' && r.name === 'block') || (a.dataset.tab === 'grid' && r.name === 'node');
    if (current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  switch (r.name) {
    case 'node': return r.id ? loadNode(r.id) : loadGrid();
    case 'contracts': return loadContracts();
    case 'contract': return r.id ? loadContract(r.id) : loadContracts();
    case 'approve': return r.id ? loadApprove(r.id) : loadContracts();
    case 'chain': return loadChain();
    case 'block': return r.id ? loadBlock(r.id) : loadChain();
    case 'templates': return loadTemplates();
    default: return loadGrid();
  }
}

// Refresh at most once per `delay` ms however many events come: a busy grid sends
// heartbeats all the time, and each would otherwise refetch the page.
let refreshTimer = 0;
function refreshSoon(fn, delay = 500) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = 0;
    fn();
  }, delay);
}

async function onEvent(event) {
  say(`live · block ${event.height}: ${event.type}`);
  const r = route();
  const contractEvent = event.type.startsWith('contract.');
  if (r.name === 'grid' && (event.type.startsWith('node.') || contractEvent)) refreshSoon(() => route().name === 'grid' && loadGrid(true), 2000);
  else if (r.name === 'contracts' && contractEvent) refreshSoon(() => route().name === 'contracts' && loadContracts());
  else if ((r.name === 'contract' || r.name === 'approve') && contractEvent && event.receipt && event.receipt.contract === r.id) {
    refreshSoon(render);
  } else if (r.name === 'node' && event.receipt && event.receipt.node === r.id) refreshSoon(render);
  else if (r.name === 'chain' && event.height > chainState.top) {
    const list = document.getElementById('blocks');
    if (!list) return;
    const heights = [];
    for (let x = chainState.top + 1; x <= event.height; x++) heights.push(x);
    chainState.top = event.height;
    await showBlocks(heights, list, true);
  }
}

async function follow() {
  let h;
  try {
    h = await head();
  } catch {
    say('live updates unavailable: the ledger does not answer');
    return;
  }
  const source = new EventSource(`/events/stream?since=${h.height}`);
  source.onopen = () => say(`live · following the ledger from block ${h.height}`);
  source.onerror = () => say('live updates interrupted: reconnecting…');
  source.onmessage = (m) => {
    let event;
    try {
      event = JSON.parse(m.data);
    } catch {
      return;
    }
    if (event && typeof event.type === 'string' && Number.isInteger(event.height)) onEvent(event);
  };
}

async function templatesTab() {
  // the catalogue shows only on a ledger that has templates
  try {
    const res = await fetch('/templates?limit=1', { cache: 'no-store' });
    document.getElementById('tab-templates').hidden = !res.ok;
  } catch {
    document.getElementById('tab-templates').hidden = true;
  }
}

window.addEventListener('hashchange', () => {
  render();
  document.getElementById('main').focus();
});
templatesTab();
render();
follow();
