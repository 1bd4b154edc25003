"""The device's HTTP application without aiohttp: its state, its lifecycle, and the aiohttp
application built only when a request needs it.

Why: a device that serves KServe v2 through the fast path (api/http_server.py) answers its hot
routes without aiohttp, whose import costs about 14 MiB of idle memory and 50 ms of start-up.
So the state the fast path reads (the request path, the settings) and the lifecycle (the
engine, tracing, systemd, MQTT, gRPC, the sync agent: startup and cleanup contexts, run in
order and unwound in reverse, like aiohttp's `cleanup_ctx`) live here; the aiohttp
`web.Application` with the other routes is built once, on the loop, by the first request the
fast path hands over (`App.web`), and shares this state. That first request pays aiohttp's
import and the build once (0.16-0.23 s on a 2-core x86 here, the loop blocked meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..engine import Engine
from ..metrics import Metrics
from ..registry import Registry
from ..request import RequestPath
from ..routing import Router
from .auth import Auth
from .limits import ConnectionLimits
from .ws_settings import WsSettings

__all__ = ["App", "HttpSettings", "Key", "engine_ctx"]

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.web_urldispatcher import UrlDispatcher

_T = TypeVar("_T")

log = logging.getLogger("appliance.http")

if TYPE_CHECKING:  # the type checker sees aiohttp's keys: the web app shares these entries
    from aiohttp.web import AppKey as Key
else:

    class Key(Generic[_T]):
        """A typed key of the application's state (aiohttp's `web.AppKey`, without aiohttp)."""

        __slots__ = ("_name",)

        def __init__(self, name: str, t: object = None) -> None:
            self._name = name

        def __repr__(self) -> str:
            return f"<Key {self._name}>"


@dataclass(frozen=True)
class HttpSettings:
    #: Bearer tokens and their scopes (api/auth.py); none: no auth.
    auth: Auth
    max_body_bytes: int
    access_log: bool
    #: The hot routes answered by api/http_server.py itself (else every request by aiohttp).
    fast_path: bool = True
    #: WebSocket streams (api/ws.py).
    ws: WsSettings = field(default_factory=WsSettings)
    #: Connections, header/body read and keep-alive timeouts (api/http_server.py).
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)


ENGINE = Key("engine", Engine)
ROUTER = Key("router", Router)
#: The request lifecycle every route runs its requests through (appliance/request.py).
PATH = Key("path", RequestPath)
METRICS = Key("metrics", Metrics)
SETTINGS = Key("settings", HttpSettings)
LOADER: Key[asyncio.Task[None]] = Key("loader")
#: The model store the server was started from; None when it serves files named on the command line.
STORE: Key[Registry | None] = Key("store")
#: When the server started: wall clock and monotonic (the status page's uptime).
STARTED: Key[tuple[float, float]] = Key("started")

#: A startup/cleanup context: the code before its `yield` runs at start, the rest at stop.
Context = Callable[["App"], AsyncIterator[None]]


class App:
    """The application: a typed mapping of shared state plus its lifecycle contexts; the
    aiohttp application is made from it by `web()` (once)."""

    def __init__(self, builder: Callable[[App], web.Application]) -> None:
        self._state: dict[Any, Any] = {}
        #: Entered in order at start, unwound in reverse at stop (aiohttp's `cleanup_ctx`).
        self.cleanup_ctx: list[Context] = []
        #: Called as shutdown begins, before in-flight requests drain.
        self.on_shutdown: list[Callable[[App], Awaitable[None]]] = []
        #: Called with the aiohttp application once it is built (routes added by features).
        self.on_web: list[Callable[[web.Application], None]] = []
        self._builder = builder
        self._web: web.Application | None = None
        self._running: list[AsyncIterator[None]] = []
        self[STARTED] = (time.time(), time.monotonic())

    # -- state ---------------------------------------------------------------------------------
    def __getitem__(self, key: web.AppKey[_T]) -> _T:
        value: _T = self._state[key]
        return value

    def __setitem__(self, key: web.AppKey[_T], value: _T) -> None:
        self._state[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def get(self, key: web.AppKey[_T], default: _T | None = None) -> _T | None:
        value: _T | None = self._state.get(key, default)
        return value

    def __iter__(self) -> Iterator[Any]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    # -- the aiohttp application ---------------------------------------------------------------
    @property
    def web_built(self) -> bool:
        return self._web is not None

    def web(self) -> web.Application:
        """The aiohttp application with every route (imports aiohttp the first time); its
        state is this one's, so both see the same entries."""
        if self._web is None:
            app = self._builder(self)
            app._state = self._state  # one state for both (see the module docstring)
            for hook in self.on_web:
                hook(app)
            self._web = app
        return self._web

    @property
    def router(self) -> UrlDispatcher:
        """aiohttp's router (builds the aiohttp application)."""
        return self.web().router

    # -- lifecycle -----------------------------------------------------------------------------
    async def startup(self) -> None:
        """Enter every context in order; if one fails, those entered are unwound."""
        for ctx in self.cleanup_ctx:
            it = ctx(self)
            try:
                await it.__anext__()
            except BaseException:
                await self.cleanup()
                raise
            self._running.append(it)

    async def shutdown(self) -> None:
        for callback in self.on_shutdown:
            await callback(self)

    async def cleanup(self) -> None:
        """Unwind the entered contexts in reverse; every one runs even if another fails (the
        first failure is raised once all have run)."""
        errors: list[BaseException] = []
        while self._running:
            it = self._running.pop()
            try:
                await it.__anext__()
            except StopAsyncIteration:
                continue
            except Exception as exc:
                log.exception("a cleanup context failed")
                errors.append(exc)
                continue
            errors.append(RuntimeError(f"{it!r} has more than one 'yield'"))
        if errors:
            raise errors[0]


async def engine_ctx(app: App) -> AsyncIterator[None]:
    """Load models in the background: health answers at once, readiness once they are loaded."""
    engine = app[ENGINE]
    app[LOADER] = asyncio.create_task(engine.start())
    yield
    loader = app[LOADER]
    if not loader.done():
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
    await engine.stop()
