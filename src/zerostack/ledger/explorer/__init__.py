"""The grid explorer: a read-only web page served by the ledger at `/explorer`.

The page (static HTML, CSS and JavaScript modules under `static/`, no build step) reads
the ledger's public JSON API and its event stream, and re-checks in the browser every
block hash, transaction hash and ed25519 signature it shows (blake2b from the vendored
`@noble/hashes`, ed25519 from the browser's WebCrypto), so it trusts the server no more
than a node does. The only server-side addition is `/explorer/api/grid`, a compact
summary of the nodes for the grid page.
"""

from zerostack.ledger.explorer.routes import CSP, mount

__all__ = ["CSP", "mount"]
