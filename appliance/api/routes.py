"""The HTTP routes, declared once: aiohttp's router is built from this table, and the fast path
of api/http_server.py derives the routes it answers itself (and their patterns) from it too.
Each route declares the token scope it needs (api/auth.py): a new route says whose it is."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..names import NAME_PATTERN

#: "public": no token (health); "infer": any token; "admin": a token with the admin scope.
Scope = Literal["public", "infer", "admin"]


@dataclass(frozen=True)
class Route:
    method: str
    #: aiohttp's pattern: `{name}` and `{version}` are a model's (or task's) name and version.
    path: str
    #: The handler's name in api/http.py's HANDLERS.
    handler: str
    #: Answered by api/http_server.py's own protocol when the request is plain.
    hot: bool = False
    #: The token scope a caller needs (api/auth.py).
    scope: Scope = "infer"

    def regex(self) -> re.Pattern[str]:
        """The fast path's pattern for this route: names as the store allows them (one rule for
        the store, the hub, MQTT topics and URLs: appliance/names.py)."""
        text = re.escape(self.path)
        for part in ("name", "version"):
            text = text.replace(re.escape("{" + part + "}"), f"(?P<{part}>{NAME_PATTERN})")
        return re.compile(text)


_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"

KSERVE: tuple[Route, ...] = (
    Route("GET", "/v2/health/live", "live", hot=True, scope="public"),
    Route("GET", "/v2/health/ready", "ready", hot=True, scope="public"),
    Route("GET", "/v2", "server_metadata"),
    *(
        route
        for base in (_MODEL, _VERSION)
        for route in (
            Route("GET", base, "model_metadata"),
            Route("GET", base + "/ready", "model_ready"),
            Route("POST", base + "/infer", "infer", hot=True),
            Route("POST", base + "/generate", "generate"),
            Route("POST", base + "/generate_stream", "generate_stream"),
            Route("GET", base + "/stream", "stream"),
        )
    ),
    Route("POST", "/v2/repository/index", "repository_index", scope="admin"),
    Route("POST", "/v2/repository/models/{name}/load", "repository_load", scope="admin"),
    Route("POST", "/v2/repository/models/{name}/unload", "repository_unload", scope="admin"),
    Route("GET", "/metrics", "metrics", hot=True),
    # Triton's trace setting API (api/trace_settings.py)
    *(
        Route(method, path, "trace_setting", scope="admin")
        for path in ("/v2/trace/setting", _MODEL + "/trace/setting")
        for method in ("GET", "POST")
    ),
    # this server's OpenAPI document (api/openapi.py)
    Route("GET", "/openapi.json", "openapi", scope="public"),
)

#: The OpenAI-compatible routes (handlers in api/openai.py's HANDLERS).
OPENAI: tuple[Route, ...] = (
    Route("GET", "/v1/models", "list_models"),
    Route("GET", "/v1/models/{model}", "get_model"),
    Route("POST", "/v1/chat/completions", "chat_completions"),
    Route("POST", "/v1/completions", "completions"),
    Route("POST", "/v1/embeddings", "embeddings"),
)

#: The fleet sync agent's status (added by appliance/server.py when a hub is configured).
SYNC: tuple[Route, ...] = (Route("GET", "/v2/sync", "sync_status", scope="admin"),)

#: The status page (api/ui.py, api/status.py). Its static files are public (the JSON calls send
#: the token); what it reads is for admins (other clients' errors, the fleet setup), like
#: /v2/sync, and so is switching versions.
PUBLIC_PREFIX = "/ui/"
STATUS: tuple[Route, ...] = (
    Route("GET", "/", "page", scope="public"),
    Route("GET", PUBLIC_PREFIX + "{path:.+}", "static", scope="public"),
    Route("GET", "/api/status", "status", scope="admin"),
    Route("GET", "/api/models/{name}", "model", scope="admin"),
    Route("POST", "/api/models/{name}/activate", "activate", scope="admin"),
    Route("POST", "/api/models/{name}/rollback", "rollback", scope="admin"),
)

#: Routes that need no bearer token (health checks of orchestrators and load balancers).
PUBLIC = frozenset(r.path for r in KSERVE if r.scope == "public")
#: A request no route matched (404, 405) needs a token, but any: it learns nothing more.
UNMATCHED: Scope = "infer"
#: A route added without a declared scope (outside these tables) is for admins only.
UNDECLARED: Scope = "admin"


def scopes(*tables: tuple[Route, ...]) -> dict[str, Scope]:
    """Each route pattern's scope (aiohttp's canonical pattern, whatever the method: a path's
    routes share one scope)."""
    out: dict[str, Scope] = {}
    for table in tables:
        for route in table:
            canonical = _PATTERN_PART.sub(r"{\1}", route.path)  # "{path:.+}" -> "{path}"
            if out.setdefault(canonical, route.scope) != route.scope:
                raise ValueError(f"{route.path}: routes of one path must share a scope")
    return out


_PATTERN_PART = re.compile(r"\{(\w+):[^}]*\}")


def hot_routes() -> list[tuple[str, Route, re.Pattern[str]]]:
    """(method, route, pattern) of each route the fast path answers."""
    return [(r.method, r, r.regex()) for r in KSERVE if r.hot]
