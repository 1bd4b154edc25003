"""Assembles the running appliance: which models to serve, the engine, the HTTP app."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import plugins, systemd, tracing
from .api import auth as auth_config
from .api import tls
from .api.app import ENGINE, LOADER, METRICS, PATH, ROUTER, SETTINGS, STORE, App, HttpSettings
from .api.app import engine_ctx as _engine_ctx
from .api.auth import Auth
from .api.http_server import run as run_http
from .api.limits import ConnectionLimits
from .api.routes import SYNC
from .api.ws_settings import WsSettings
from .backends import detect_backend
from .config import Config
from .engine import Engine, ModelSource
from .errors import ApplianceError, ConfigError, ModelError
from .guards.policy import GuardBook
from .manifest import Manifest, sha256_file
from .metrics import Metrics
from .pipelines import BACKEND as PIPELINE
from .registry import Registry, check_name
from .request import RequestPath
from .routing import Router
from .tensors import Signature

if TYPE_CHECKING:
    from aiohttp import web

    from .tracing.otel import Tracer

log = logging.getLogger("appliance.server")


def sources_from_store(root: Path) -> list[ModelSource]:
    """The active version of every model in the store; a broken entry is logged, not fatal."""
    registry = Registry(root)
    if not root.is_dir():
        log.warning("model store %s does not exist: serving no models", root)
        return []
    sources = []
    for name in registry.names():
        try:
            mv = registry.active(name)
        except ApplianceError as exc:
            log.warning("skipping model %s: %s", name, exc.message)
            continue
        sources.append(ModelSource(mv.manifest, mv.file))
    if not sources:
        log.warning("model store %s holds no active models", root)
    return sources


def source_from_file(path: Path, name: str | None = None) -> ModelSource:
    """Serve one file without a store (like `llama-server -m`): hashed now, version 1."""
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    model_name = check_name(name or path.stem, "model name")
    digest, size = sha256_file(path)
    manifest = Manifest(
        name=model_name,
        version="1",
        backend=detect_backend(path),
        file=path.name,
        sha256=digest,
        size=size,
        signature=Signature((), ()),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        source=str(path.resolve()),
    )
    return ModelSource(manifest, path, verify=False)


def build(config: Config, sources: list[ModelSource], store: Registry | None = None) -> App:
    """The app; with `store`, it can switch versions at run time (repository API, SIGHUP).
    Its aiohttp application (api/http.py) is made when a request first needs it (api/app.py)."""
    plugins.use_dirs(config.plugins.dirs)  # before any model loads: they may need a plugin
    metrics = Metrics()
    tracer = start_tracing(config)
    cache_dir = Path(config.store.path) / ".cache"
    # Stored pipelines are versions like models, but the pipelines layer serves them.
    models = [s for s in sources if s.manifest.backend != PIPELINE]
    engine = Engine(config, metrics, models, cache_dir)
    router = Router(engine, config, metrics)
    for source in sources:
        if source.manifest.backend == PIPELINE:
            router.add_pipeline(source)
    router.check_names([m.name for m in engine.models()])
    paths = RequestPath(router, metrics, config.server.access_log, GuardBook(config))
    settings = HttpSettings(
        auth=auth_config.from_config(config),
        max_body_bytes=config.server.max_body_bytes,
        access_log=config.server.access_log,
        fast_path=config.server.fast_path,
        ws=WsSettings(**dataclasses.asdict(config.websocket)),
        limits=ConnectionLimits(
            max_connections=config.server.max_connections,
            header_timeout_s=config.server.header_timeout_s,
            body_timeout_s=config.server.body_timeout_s,
            keepalive_timeout_s=config.server.keepalive_timeout_s,
        ),
    )
    app = App(_web_app)
    app[PATH] = paths
    app[ROUTER] = router
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[SETTINGS] = settings
    app[STORE] = store
    app.cleanup_ctx.append(_engine_ctx)
    if tracer is not None:
        app.cleanup_ctx.append(_tracing_ctx)
    if store is not None:
        app.cleanup_ctx.append(_reload_on_hangup)
    # After the engine's context: readiness waits on the loader that it starts.
    systemd.install(app, systemd.format_address(config.server.host, config.server.port))
    if config.mqtt.url:
        app.cleanup_ctx.append(_mqtt_ctx(config, paths, metrics))
    if config.grpc.port:
        app.cleanup_ctx.append(_grpc_ctx(config, paths, store, settings.auth))
    if config.hub.url:
        if store is None:
            raise ConfigError("hub.url: fleet sync needs a model store, not --model FILE")
        _add_sync(app, config, engine, metrics, store, router)
    return app


def _web_app(app: App) -> web.Application:
    """The aiohttp application, imported and made at the first request that needs it."""
    from .api.http import build_web

    return build_web(app)


def start_tracing(config: Config) -> Tracer | None:
    """The process's tracer when [tracing] is on (the `otel` extra, imported only then)."""
    if not config.tracing.enabled:
        return None
    try:
        from .tracing.otel import Tracer
    except ImportError as exc:
        raise ConfigError(
            f"tracing.enabled needs the otel extra (pip install 'appliance[otel]'): {exc}"
        ) from None
    tracer = Tracer(config.tracing, config.mqtt.device_id or config.hub.device_id)
    tracing.use(tracer)
    return tracer


async def _tracing_ctx(app: App) -> AsyncIterator[None]:
    """Spans still queued are exported at shutdown (bounded by the export timeout)."""
    yield
    tracer = tracing.use(None)
    if tracer is not None:
        await asyncio.to_thread(tracer.shutdown)


def _add_sync(
    app: App,
    config: Config,
    engine: Engine,
    metrics: Metrics,
    store: Registry,
    router: Router,
) -> None:
    """The hub sync agent runs beside serving; GET /v2/sync reports what it is doing."""
    from .api.status import SYNC_STATUS

    try:
        from .sync.agent import SyncAgent
    except ImportError as exc:  # tuf is an extra: only devices that sync need it
        raise ConfigError(
            f"hub.url needs the sync extra (pip install 'appliance[sync]'): {exc}"
        ) from None

    # checks the token and root files now; stored pipelines are activated by their layer
    agent = SyncAgent(config, engine, store, metrics, router.pipelines)

    async def status(request: web.Request) -> web.Response:
        from .api.http import json_response

        return json_response(agent.status())

    async def ctx(app: App) -> AsyncIterator[None]:
        agent.start(asyncio.shield(app[LOADER]))
        yield
        await agent.stop()

    (route,) = SYNC  # its scope is declared in api/routes.py

    def add_route(web_app: web.Application) -> None:
        web_app.router.add_route(route.method, route.path, status)

    app.on_web.append(add_route)
    app[SYNC_STATUS] = agent.status  # the status page's summary (api/status.py)
    app.cleanup_ctx.append(ctx)


async def _reload_on_hangup(app: App) -> AsyncIterator[None]:
    """SIGHUP (`systemctl reload appliance`): serve the store's active versions, switching
    each changed model with no gap (after `appliance models activate` or `rollback`)."""

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        await asyncio.shield(app[LOADER])
        store = app[STORE]
        assert store is not None
        changed = await app[ENGINE].reload_store(store)
        changed += app[ROUTER].pipelines.reload_store(store)
        log.info("reload: %s", ", ".join(changed) if changed else "nothing changed")

    def on_hangup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        log.debug("SIGHUP reload unavailable in this thread")
        yield
        return
    yield
    loop.remove_signal_handler(signal.SIGHUP)
    for task in list(tasks):
        task.cancel()


def _mqtt_ctx(
    config: Config, paths: RequestPath, metrics: Metrics
) -> Callable[[App], AsyncIterator[None]]:
    """MQTT runs beside HTTP; it stops first (contexts unwind in reverse), while the engine it
    feeds still serves."""

    async def ctx(app: App) -> AsyncIterator[None]:
        from .api.mqtt import MqttService

        service = MqttService(config, paths, metrics)
        metrics.mqtt_connected = 0
        service.start()

        async def announce() -> None:
            await asyncio.shield(app[LOADER])
            service.announce()  # the online status lists the models once they are loaded

        task = asyncio.ensure_future(announce())
        yield
        task.cancel()
        await service.stop()

    return ctx


def _grpc_ctx(
    config: Config, paths: RequestPath, store: Registry | None, auth: Auth
) -> Callable[[App], AsyncIterator[None]]:
    """gRPC runs beside HTTP on the same loop and engine; it stops before the engine does."""
    try:
        from .api import grpc as grpc_front
    except ImportError as exc:  # grpcio is an extra: a lean device may leave it out
        raise ConfigError(
            f"grpc.port = {config.grpc.port}: gRPC needs the grpc extra "
            f"(pip install 'appliance[grpc]'): {exc}"
        ) from None

    async def ctx(app: App) -> AsyncIterator[None]:
        server = await grpc_front.start(config, paths, store, auth)
        yield
        await server.stop(config.server.shutdown_timeout_s)

    return ctx


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def serve(config: Config, sources: list[ModelSource], store: Registry | None = None) -> None:
    app = build(config, sources, store)
    context = tls.from_config(config)  # a bad certificate stops the start, before binding
    fast = install_uvloop()
    host, port = config.server.host, config.server.port
    if not app[SETTINGS].auth.enabled and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without a bearer token: anyone on the network can call it", host
        )
    sock = socket.create_server(
        (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, reuse_port=False
    )
    bound = sock.getsockname()[1]
    app[systemd.ADDRESS] = systemd.format_address(host, bound)  # the real port when --port 0
    log.info(
        "serving %d model(s) on %s://%s:%d%s",
        len(sources),
        "https" if context is not None else "http",
        host,
        bound,
        " (uvloop)" if fast else "",
        extra={"fields": {"port": bound}},
    )
    run_http(app, sock, config.server.shutdown_timeout_s, context)
