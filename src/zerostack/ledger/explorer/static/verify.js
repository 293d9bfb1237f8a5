// Checks, in the browser, what the ledger server says: canonical JSON, blake2b-256
// hashes (@noble/hashes, vendored) and ed25519 signatures (WebCrypto), following
// zerostack.crypto: a signature covers `zerostack-sig/v1 <domain> NUL <32-byte hash>`.
import { blake2b } from './vendor/noble-hashes/blake2.js';

const utf8 = new TextEncoder();
const PREFIX = 'zerostack-sig/v1 ';
const MAX_INT = 2 ** 53 - 1;
const MAX_DEPTH = 64;

export const Domain = Object.freeze({
  TRANSACTION: 'transaction',
  APPROVAL: 'approval',
  BLOCK_HEADER: 'block-header',
});

function byCodePoint(a, b) {
  // Python sorts keys by code point; JavaScript's default sort compares UTF-16 units
  const x = Array.from(a, (c) => c.codePointAt(0));
  const y = Array.from(b, (c) => c.codePointAt(0));
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i] - y[i];
  }
  return x.length - y.length;
}

// Canonical JSON: sorted keys, no whitespace, integers within ±(2^53 - 1), no floats.
// JSON.stringify escapes strings exactly as the ledger's encoder does.
export function canonical(value, depth = MAX_DEPTH) {
  if (value === null || typeof value === 'boolean' || typeof value === 'string') {
    return JSON.stringify(value);
  }
  if (typeof value === 'number') {
    if (!Number.isInteger(value) || Math.abs(value) > MAX_INT) {
      throw new Error('not canonical: only integers within ±(2^53 - 1)');
    }
    return String(value);
  }
  if (depth <= 0) throw new Error('not canonical: nested too deep');
  if (Array.isArray(value)) {
    return '[' + value.map((v) => canonical(v, depth - 1)).join(',') + ']';
  }
  if (typeof value === 'object') {
    const keys = Object.keys(value).sort(byCodePoint);
    return '{' + keys.map((k) => JSON.stringify(k) + ':' + canonical(value[k], depth - 1)).join(',') + '}';
  }
  throw new Error(`not canonical: ${typeof value}`);
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function fromHex(text, length) {
  if (typeof text !== 'string' || !/^[0-9a-f]*$/.test(text) || text.length !== 2 * length) {
    throw new Error(`expected ${length} bytes of lowercase hex`);
  }
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function hashBytes(bytes) {
  return blake2b(bytes, { dkLen: 32 });
}

// blake2b-256 of the canonical JSON of `value` (raw bytes)
export function hashObj(value) {
  return hashBytes(utf8.encode(canonical(value)));
}

export function hashHex(value) {
  return toHex(hashObj(value));
}

const importedKeys = new Map();

async function publicKey(keyHex) {
  let key = importedKeys.get(keyHex);
  if (key === undefined) {
    key = crypto.subtle.importKey('raw', fromHex(keyHex, 32), { name: 'Ed25519' }, false, ['verify']);
    importedKeys.set(keyHex, key);
  }
  return key;
}

// Whether `sigHex` is `keyHex`'s ed25519 signature of `data` (32 bytes) in `domain`.
export async function verifySignature(domain, keyHex, data, sigHex) {
  try {
    const tag = utf8.encode(PREFIX + domain);
    const message = new Uint8Array(tag.length + 1 + data.length);
    message.set(tag, 0);
    message[tag.length] = 0;
    message.set(data, tag.length + 1);
    return await crypto.subtle.verify({ name: 'Ed25519' }, await publicKey(keyHex),
      fromHex(sigHex, 64), message);
  } catch {
    return false;
  }
}

// The hash a transaction's signature covers, and its id.
export function txHash(tx) {
  return hashObj({ type: tx.type, sender: tx.sender, nonce: tx.nonce, payload: tx.payload });
}

// What an approval signs: zerostack.crypto.approval_digest.
export function approvalDigest(contract, version, node, deploymentHash) {
  return hashObj({ contract, version, node, deployment_hash: deploymentHash });
}

// Check one transaction: its hash from its fields, its signature with the sender's key
// (`keyOf(sender)` resolves a twin id; a public key sender is its own key).
export async function checkTx(tx, keyOf) {
  let hash;
  try {
    hash = txHash(tx);
  } catch (err) {
    return { ok: false, hash: '', why: String(err.message || err) };
  }
  const hex = toHex(hash);
  let key;
  try {
    key = typeof tx.sender === 'string' ? tx.sender : await keyOf(tx.sender);
  } catch (err) {
    return { ok: false, hash: hex, why: `sender's key unknown: ${err.message || err}` };
  }
  const ok = await verifySignature(Domain.TRANSACTION, key, hash, tx.signature);
  return { ok, hash: hex, why: ok ? '' : 'the signature does not match the transaction' };
}

// Check a served block `{height, prev_hash, time, tx_root, tx_count, hash, signatures,
// txs}`: every transaction, the root over them, the header hash and the operator's
// signature over it. Returns {ok, problems: [text], txs: [{ok, hash, why}]}.
export async function checkBlock(block, operatorKey, keyOf) {
  const problems = [];
  const list = block.txs || [];
  // the transactions are checked side by side: looking up their senders' keys dominates
  const txs = await Promise.all(list.map((tx) => checkTx(tx, keyOf)));
  const root = blake2b.create({ dkLen: 32 });
  list.forEach((tx, i) => {
    const result = txs[i];
    if (!result.ok) problems.push(`transaction ${result.hash.slice(0, 12) || '?'}: ${result.why}`);
    try {
      root.update(fromHex(result.hash, 32));
      root.update(fromHex(tx.signature, 64));
    } catch {
      problems.push('a transaction signature is not 64 bytes of hex');
    }
  });
  const rootHex = toHex(root.digest());
  if (rootHex !== block.tx_root) problems.push('tx_root does not match the transactions');
  if ((block.txs || []).length !== block.tx_count) problems.push('tx_count does not match');
  let hash = '';
  try {
    hash = hashHex({ height: block.height, prev_hash: block.prev_hash, time: block.time,
      tx_root: block.tx_root, tx_count: block.tx_count });
  } catch (err) {
    problems.push(`header: ${err.message || err}`);
  }
  if (hash !== block.hash) problems.push('the block hash is not the hash of its header');
  let signedByOperator = false;
  for (const s of block.signatures || []) {
    let good = false;
    try {
      good = await verifySignature(Domain.BLOCK_HEADER, s.key, fromHex(hash, 32), s.signature);
    } catch {
      good = false;
    }
    if (!good) problems.push('a header signature does not match');
    if (good && s.key === operatorKey) signedByOperator = true;
  }
  if (!signedByOperator) problems.push('not signed by the operator key');
  return { ok: problems.length === 0, problems, txs, hash };
}
