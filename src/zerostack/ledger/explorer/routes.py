"""The explorer's HTTP routes on the ledger's FastAPI app: the page, its static files (read
once at start, looked up by name: a request never names a file on disk) and the grid
summary. Every answer carries a strict Content-Security-Policy; text and JSON are sent
gzip-compressed to browsers that accept it."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

import orjson
from fastapi import FastAPI, Query, Request
from starlette.responses import RedirectResponse, Response

from zerostack.ledger.explorer.grid import MAX_PAGE, MAX_QUERY, GridQuery, SummaryCache
from zerostack.ledger.service import LedgerService

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Scripts, styles and connections from the ledger itself only; no inline script or style,
no frames, no forms posting anywhere: data shown on the page can never run as code."""

HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    "": "text/plain; charset=utf-8",  # LICENSE
}
_GZIP_MIN = 1024


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file under `static/`, by its path relative to it (read once)."""
    assets: dict[str, Asset] = {}
    root = resources.files("zerostack.ledger.explorer").joinpath("static")

    def walk(folder: resources.abc.Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                walk(entry, f"{name}/")
                continue
            suffix = "." + entry.name.rsplit(".", 1)[1] if "." in entry.name else ""
            if suffix not in _TYPES:
                continue
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[name] = Asset(body, gzip.compress(body, 9, mtime=0), _TYPES[suffix], etag)

    walk(root, "")
    return assets


def _accepts_gzip(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "")


def _send(request: Request, body: bytes, media_type: str, *, gzipped: bytes | None = None,
          etag: str | None = None, cache: str = "no-cache") -> Response:
    headers = {**HEADERS, "cache-control": cache, "vary": "accept-encoding"}
    if etag is not None:
        headers["etag"] = etag
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
    if _accepts_gzip(request) and len(body) >= _GZIP_MIN:
        headers["content-encoding"] = "gzip"
        body = gzipped if gzipped is not None else gzip.compress(body, 5)
    return Response(body, media_type=media_type, headers=headers)


def mount(app: FastAPI, service: LedgerService) -> None:
    """Add `/explorer` (the page), `/explorer/static/...` and `/explorer/api/grid`."""
    assets = load_assets()
    summaries = SummaryCache()

    @app.get("/explorer", include_in_schema=False)
    async def explorer_page(request: Request) -> Response:
        page = assets["index.html"]
        return _send(request, page.body, page.media_type, gzipped=page.gzipped, etag=page.etag)

    @app.get("/explorer/", include_in_schema=False)
    async def explorer_slash() -> Response:
        return RedirectResponse("/explorer", status_code=308, headers=HEADERS)

    @app.get("/explorer/static/{name:path}", include_in_schema=False)
    async def explorer_static(request: Request, name: str) -> Response:
        asset = assets.get(name) if name != "index.html" else None
        if asset is None:
            return Response(orjson.dumps({"error": "no such file", "code": "not_found"}),
                            status_code=404, media_type="application/json", headers=HEADERS)
        return _send(request, asset.body, asset.media_type, gzipped=asset.gzipped,
                     etag=asset.etag)

    @app.get("/explorer/api/grid", summary="The explorer's grid page: nodes counted by "
             "country, farm and status, and one page of nodes as compact rows.")
    async def explorer_grid(
        request: Request,
        country: Annotated[str | None, Query(pattern="^[A-Z]{2}$")] = None,
        farm: Annotated[int | None, Query(ge=1)] = None,
        status: Annotated[str | None, Query(pattern="^(up|down)$")] = None,
        q: Annotated[str, Query(max_length=MAX_QUERY)] = "",
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    ) -> Response:
        view = summaries.view(service.chain.state,
                              GridQuery(country, farm, status, q, offset, limit),
                              int(service.clock()))
        return _send(request, orjson.dumps(view), "application/json", cache="no-store")
