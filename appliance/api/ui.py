"""The status page's static files (appliance/ui/): `/` is the device page, `/ui/...` its modules
and the shared ones (appliance/ui/common/, also the hub dashboard's). They load without a token
(they hold no data: every JSON call they make sends it), are read once at start, and sent
compressed. Behind Home Assistant's ingress the page gets a `<base>` from `X-Ingress-Path`, so
its relative URLs resolve under the ingress prefix whether or not the URL ends in a slash.
"""

from __future__ import annotations

import html
import mimetypes
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from aiohttp import web

from .routes import PUBLIC_PREFIX

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths under it are public static files (api/http.py's auth skips them).
PREFIX = PUBLIC_PREFIX
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}
#: What an ingress prefix may hold (it goes into the page: nothing that could close the tag, and
#: a path on this host only: no "//" that would make it another host, no "..").
_INGRESS_RE = re.compile(r"^(?!.*//)(?!.*\.\.)/[A-Za-z0-9._~/-]{0,200}$")


def ui_root() -> Path:
    return Path(str(resources.files("appliance") / "ui"))


def read_files(root: Path | None = None) -> dict[str, tuple[bytes, str]]:
    """URL path -> (bytes, content type) of every file the pages use."""
    root = root or ui_root()
    out: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = path.relative_to(root).as_posix()
        kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
        out[PREFIX + rel] = (path.read_bytes(), kind)
    return out


def with_base(index: bytes, ingress: str | None) -> bytes:
    """The page with `<base href>` set to the ingress prefix, when a valid one is given."""
    if not ingress or not _INGRESS_RE.match(ingress):
        return index
    base = html.escape(ingress.rstrip("/") + "/", quote=True)
    return index.replace(b"<head>", f'<head><base href="{base}">'.encode(), 1)


def handlers() -> dict[str, Handler]:
    """The page and its files, by their names in api/routes.py's STATUS table."""
    files = read_files()
    index = files[PREFIX + "device/index.html"][0]

    async def page(request: web.Request) -> web.Response:
        body = with_base(index, request.headers.get("X-Ingress-Path"))
        return _send(request, body, "text/html")

    async def static(request: web.Request) -> web.Response:
        found = files.get(request.path)
        if found is None:
            raise web.HTTPNotFound()
        return _send(request, *found)

    return {"page": page, "static": static}


def _send(request: web.Request, body: bytes, content_type: str) -> web.Response:
    response = web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": (
                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                "script-src 'self'; connect-src 'self'; frame-ancestors 'self'"
            ),
        },
    )
    response.enable_compression()
    return response
