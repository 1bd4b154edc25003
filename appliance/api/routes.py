"""The HTTP routes, declared once: aiohttp's router is built from this table, and the fast path
of api/http_server.py derives the routes it answers itself (and their patterns) from it too."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..names import NAME_PATTERN


@dataclass(frozen=True)
class Route:
    method: str
    #: aiohttp's pattern: `{name}` and `{version}` are a model's (or task's) name and version.
    path: str
    #: The handler's name in api/http.py's HANDLERS.
    handler: str
    #: Answered by api/http_server.py's own protocol when the request is plain.
    hot: bool = False

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
    Route("GET", "/v2/health/live", "live", hot=True),
    Route("GET", "/v2/health/ready", "ready"),
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
    Route("POST", "/v2/repository/index", "repository_index"),
    Route("POST", "/v2/repository/models/{name}/load", "repository_load"),
    Route("POST", "/v2/repository/models/{name}/unload", "repository_unload"),
    Route("GET", "/metrics", "metrics"),
    # Triton's trace setting API (api/trace_settings.py)
    *(
        Route(method, path, "trace_setting")
        for path in ("/v2/trace/setting", _MODEL + "/trace/setting")
        for method in ("GET", "POST")
    ),
    # this server's OpenAPI document (api/openapi.py)
    Route("GET", "/openapi.json", "openapi"),
)

#: Routes that need no bearer token (health checks of orchestrators and load balancers; the
#: OpenAPI document, which names no model or setting: api/openapi.py).
PUBLIC = frozenset({"/v2/health/live", "/v2/health/ready", "/openapi.json"})


def hot_routes() -> list[tuple[str, Route, re.Pattern[str]]]:
    """(method, route, pattern) of each route the fast path answers."""
    return [(r.method, r, r.regex()) for r in KSERVE if r.hot]
