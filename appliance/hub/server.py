"""The hub's HTTP service (aiohttp): TUF repository, device API, admin API, /metrics.

Auth lives in the middleware, by path: /api/v1/admin/* and /metrics take the admin token,
/api/v1/device/* a device token, /tuf/* either; /healthz and /openapi.json are public. Errors become
`{"error": "..."}` there too. Service calls block (SQLite, hashing, signing), so handlers run
them in threads; a background task re-signs timestamp and snapshot before they expire.

The two device routes that a fleet calls all the time are answered from memory where they can
(polls.py): a known token, the assignments of the current fleet generation and the last-seen
stamp cost no database query and no thread; telemetry is written in groups (ingest.py). A
background task re-reads the fleet generation every `fleet_check_s` (changes made elsewhere:
the CLI, another replica) and writes the last-seen stamps every `last_seen_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .. import tracing
from ..errors import (
    ApplianceError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    is_disk_full,
)
from ..multipart import malformed_is_400
from . import fleet
from .errors import Forbidden
from .ingest import TelemetryWriter
from .openapi import route_handler as openapi_route
from .polls import NeedsState
from .protocol import decode_custom
from .repository import utcnow
from .service import MAX_SEQ, ROLLOUT_STATES, Hub, check_device_id, require_device
from .storage import Device

log = logging.getLogger("appliance.hub.http")

HUB = web.AppKey("hub", Hub)
REGISTRY = web.AppKey("registry", CollectorRegistry)
REFRESH_S = web.AppKey("refresh_s", float)
STATIC = web.AppKey("static", tuple)
WRITER = web.AppKey("telemetry_writer", TelemetryWriter)
FLEET_CHECK_S = web.AppKey("fleet_check_s", tuple)
DEVICE = web.RequestKey("device", Device)

_METADATA_RE = re.compile(r"^(?:([1-9][0-9]{0,17})\.(root|targets|snapshot)|timestamp)\.json$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,8}$")
_JSON = "application/json"
#: The fleet dashboard's static files (no build step), served at / and /ui/<file>.
UI_DIR = Path(__file__).resolve().parent.parent / "ui" / "hub"
_UI_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
UI_FILES = {p.name: p for p in sorted(UI_DIR.glob("*")) if p.is_file() and p.suffix in _UI_TYPES}
UI_PATHS = {"/"} | {f"/ui/{name}" for name in UI_FILES}
#: Answered without a token (hub/openapi.py says why the document is public).
PUBLIC = frozenset({"/healthz", "/openapi.json"}) | UI_PATHS


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def _error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="appliance-hub"'} if status == 401 else None
    return json_response({"error": message}, status, headers)


def _bearer(request: web.Request) -> str:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


async def _authorize(request: web.Request) -> None:
    hub = request.app[HUB]
    path = request.path
    if path in PUBLIC:
        return  # health, the document, the dashboard's files (what it shows needs the token)
    token = _bearer(request)
    if path.startswith("/api/v1/device/"):
        if token and hub.is_admin(token):
            raise Forbidden("the device API takes a device token, not the admin token")
        request[DEVICE] = await _device(hub, request, token)
        return
    if path.startswith("/tuf/"):
        if token and hub.is_admin(token):
            return
        request[DEVICE] = await _device(hub, request, token)
        return
    # Everything else (admin API, metrics, unknown routes) is the admin's.
    if token and hub.is_admin(token):
        return
    if token and await asyncio.to_thread(hub.device_for_token, token) is not None:
        raise Forbidden("this route needs the admin token; a device token cannot use it")
    raise Unauthorized("missing or wrong admin token")


async def _device(hub: Hub, request: web.Request, token: str) -> Device:
    return await device_for(hub, token, request.headers.get("X-Device-Id"))


async def device_for(hub: Hub, token: str, claimed: str | None) -> Device:
    """The device of the token: from memory when known, else from the store in a thread."""
    known = hub.cached_device(token) if token else None
    if known is not None:
        return require_device(hub, token, claimed, known)
    return await asyncio.to_thread(require_device, hub, token, claimed)


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if tracing.tracer is None:
        return await _answer(request, handler)
    # a span per hub request while a tracer runs in this process, under the device's poll
    route = request.match_info.route.resource
    name = f"{request.method} {route.canonical if route is not None else 'unmatched'}"
    with tracing.server(name, request.headers, {"url.path": request.path}) as span:
        response = await _answer(request, handler)
        if span is not None:
            span.set_attribute("http.response.status_code", response.status)
        return response


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        await _authorize(request)
        return await handler(request)
    except (ApplianceError, ConnectionResetError) as exc:
        status, body, headers = error_answer(exc, request.method, request.path)
        return web.Response(body=body, status=status, content_type=_JSON, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason
        if exc.status == 404:
            reason = f"no route for {request.method} {request.path}"
        elif exc.status == 413:
            reason = "request body is too large"
        response = _error(exc.status, reason)
        for key, value in exc.headers.items():
            if key.lower() not in ("content-type", "content-length"):
                response.headers[key] = value
        return response
    except Exception as exc:
        status, body, headers = error_answer(exc, request.method, request.path)
        return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def error_answer(exc: Exception, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and headers of an error (shared with front.py); logs what needs it."""
    if isinstance(exc, ApplianceError):
        if exc.status >= 500:
            log.warning("%s %s: %s", method, path, exc.message)
        status, message = exc.status, exc.message
    elif isinstance(exc, ConnectionResetError):  # the client left mid-body: no one reads this
        log.debug("%s %s: the client closed the connection", method, path)
        status, message = 400, "connection lost before the request body was read"
    elif is_disk_full(exc):  # every write is staged or transactional: nothing half-done
        log.error("%s %s: the disk is full: %s", method, path, exc)
        status, message = 507, "the hub has no space left on its disk; nothing was changed"
    else:
        log.error("unhandled error on %s %s", method, path, exc_info=exc)
        status, message = 500, "internal server error"
    headers = {"WWW-Authenticate": 'Bearer realm="appliance-hub"'} if status == 401 else {}
    return status, orjson.dumps({"error": message}), headers


async def _json_body(request: web.Request, limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


# -- health and metrics ----------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class HubCollector(Collector):
    """Fleet figures read from the store at scrape time."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        devices = self.hub.store.devices()
        g = GaugeMetricFamily("appliance_hub_devices", "Enrolled devices")
        g.add_metric([], len(devices))
        yield g
        errs = GaugeMetricFamily(
            "appliance_hub_devices_with_error", "Devices whose last report carries an error"
        )
        errs.add_metric([], sum(1 for d in devices if d.state.get("last_error")))
        yield errs
        stored = CounterMetricFamily("appliance_hub_events_stored", "Telemetry events stored")
        stored.add_metric([], self.hub.store.count_events())
        yield stored
        dup = CounterMetricFamily(
            "appliance_hub_events_duplicate",
            "Telemetry events received again and ignored (since the hub started)",
        )
        dup.add_metric([], self.hub.duplicates)
        yield dup
        rollouts = GaugeMetricFamily(
            "appliance_hub_rollouts", "Rollouts by state", labels=["state"]
        )
        all_rollouts = self.hub.store.rollouts()
        for state in ROLLOUT_STATES:
            rollouts.add_metric([state], sum(1 for r in all_rollouts if r.state == state))
        yield rollouts
        targets = GaugeMetricFamily("appliance_hub_targets", "Published model versions")
        targets.add_metric([], len(self.hub.store.targets()))
        yield targets
        exp = GaugeMetricFamily(
            "appliance_hub_tuf_expires_seconds",
            "Seconds until each role's current metadata expires",
            labels=["role"],
        )
        now = utcnow()
        for role, when in self.hub.repo.expires().items():
            exp.add_metric([role], (when - now).total_seconds())
        yield exp


# -- dashboard -------------------------------------------------------------------------------
async def ui_file(request: web.Request) -> web.Response:
    """A file of the dashboard from the package (a fixed set: no path from the request)."""
    name = request.match_info.get("name", "index.html")
    path = UI_FILES.get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}")
    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(
        body=body,
        content_type=_UI_TYPES[path.suffix],
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            # Everything comes from the hub itself; the token never leaves for another origin.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'",
        },
    )


async def fleet_rollouts(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(fleet.rollout_progress, request.app[HUB]))


async def fleet_metadata(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(fleet.metadata_expiry, request.app[HUB]))


async def model_version(request: web.Request) -> web.Response:
    m = request.match_info
    return json_response(
        await asyncio.to_thread(fleet.model_detail, request.app[HUB], m["name"], m["version"])
    )


# -- TUF -------------------------------------------------------------------------------------
async def tuf_metadata(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    name = request.match_info["name"]
    m = _METADATA_RE.match(name)
    if m is None:
        raise NotFound(f"no metadata {name!r}")
    if m.group(2) is None:
        found = await asyncio.to_thread(hub.store.latest_metadata, "timestamp")
        body = found[1] if found else None
    else:
        body = await asyncio.to_thread(hub.store.metadata, m.group(2), int(m.group(1)))
    if body is None:
        raise NotFound(f"no metadata {name!r}")
    return web.Response(body=body, content_type=_JSON, headers={"Cache-Control": "no-cache"})


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range; None for the whole file; 416 when unsatisfiable."""
    if header is None:
        return None
    m = _RANGE_RE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # a malformed or multi-range header is ignored (RFC 9110 allows it)
    if not m.group(1):
        n = int(m.group(2))
        start, end = max(0, size - n), size
    else:
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or start >= end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def tuf_target(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    key = await asyncio.to_thread(hub.artifact_key, request.match_info["path"])
    size = await asyncio.to_thread(hub.artifacts.size, key)
    if size is None:
        raise NotFound(f"target file {request.match_info['path']!r} is missing from the store")
    rng = _parse_range(request.headers.get("Range"), size)
    start, end = rng or (0, size)
    response = web.StreamResponse(status=206 if rng else 200)
    response.content_type = "application/octet-stream"
    response.content_length = end - start
    response.headers["Accept-Ranges"] = "bytes"
    if rng:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    chunks = hub.artifacts.read(key, start, end)
    loop = asyncio.get_running_loop()
    reading: asyncio.Future[bytes | None] | None = None
    try:
        while True:
            reading = loop.run_in_executor(None, next, chunks, None)
            # Shielded: a cancelled handler leaves `reading` pending until its thread is done.
            block = await asyncio.shield(reading)
            if block is None:
                break
            await response.write(block)
    except ConnectionResetError:  # the device went away; it resumes with a Range request
        log.info("download of %s interrupted by the client", key)
        return response
    finally:
        # Cancelled while a thread still runs the generator: close it once that thread is done
        # (closing a running generator raises "generator already executing").
        if reading is not None and not reading.done():
            reading.add_done_callback(lambda _: chunks.close())  # type: ignore[attr-defined]
        else:
            chunks.close()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


# -- device API ------------------------------------------------------------------------------
async def poll(hub: Hub, device: Device, if_none_match: str) -> tuple[int, bytes, str]:
    """Status (200 or 304), body and ETag of a poll; shared with front.py's lean path."""
    hub.touch(device)
    view = hub.fleet_view()
    if view is None:  # changed since the last poll: read once (later polls share it)
        view = await asyncio.to_thread(hub.load_fleet_view)
    try:
        doc = hub.poll(device, view)
    except NeedsState:  # a halted rollout: what the device reported decides
        doc = await asyncio.to_thread(hub.assignments, device)
    body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return 304, b"", etag
    return 200, body, etag


async def upload(hub: Hub, writer: TelemetryWriter, device: Device, body: bytes) -> bytes:
    """Check and store an upload's events; the answer's body (shared with front.py)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    answer = await writer.submit(device, hub.check_telemetry(device, doc))
    hub.touch(device)
    return orjson.dumps(answer)


async def assignments(request: web.Request) -> web.Response:
    status, body, etag = await poll(
        request.app[HUB], request[DEVICE], request.headers.get("If-None-Match", "")
    )
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if status == 304:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=_JSON, headers=headers)


async def telemetry(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    limit = hub.config.max_telemetry_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    answer = await upload(hub, request.app[WRITER], request[DEVICE], body)
    return web.Response(body=answer, content_type=_JSON)


# -- admin API -------------------------------------------------------------------------------
async def enroll(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    body = await _json_body(request, 64 << 10)
    if not isinstance(body, dict):
        raise InvalidInput('body must be {"device_id": ..., "group": ...}')
    device_id = body.get("device_id")
    group = body.get("group", "default")
    token = await asyncio.to_thread(hub.enroll, device_id, group)
    return json_response({"device_id": device_id, "group": group, "token": token}, 201)


async def list_devices(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(request.app[HUB].devices))


async def device_events(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    device_id = check_device_id(request.match_info["device_id"])
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise InvalidInput("'after' and 'limit' must be integers") from None
    if limit < 1 or after < 0:
        raise InvalidInput("'limit' must be at least 1 and 'after' at least 0")
    after = min(after, MAX_SEQ)  # no seq is past it; a database's integers may end there
    return json_response(await asyncio.to_thread(hub.events, device_id, after, limit))


async def publish(request: web.Request) -> web.Response:
    """multipart/form-data: name, version, file, and optionally acceptance, manifest, backend."""
    hub = request.app[HUB]
    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("publish takes multipart/form-data with name, version and file")
    fields: dict[str, str] = {}
    spool: Path | None = None
    limit = hub.config.max_upload_bytes
    hub.config.tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        with malformed_is_400():  # a 400 for a body aiohttp cannot split into parts
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    raise InvalidInput("unexpected nested multipart part")
                if part.name == "file":
                    if spool is not None:
                        raise InvalidInput("more than one 'file' part")
                    # The suffix helps detect the format; only a plain short one is kept.
                    suffix = Path(part.filename or "").suffix.lower()
                    suffix = suffix if _SUFFIX_RE.match(suffix) else ""
                    fd, tmp = tempfile.mkstemp(
                        dir=hub.config.tmp_dir, prefix="upload.", suffix=suffix
                    )
                    spool = Path(tmp)
                    size = 0
                    with os.fdopen(fd, "wb") as out:
                        while chunk := await part.read_chunk(1 << 20):
                            size += len(chunk)
                            if size > limit:
                                raise PayloadTooLarge(
                                    f"model file is over the upload limit of {limit} bytes"
                                )
                            await asyncio.to_thread(out.write, chunk)
                elif part.name in ("name", "version", "acceptance", "manifest", "backend"):
                    value = bytearray()
                    while chunk := await part.read_chunk(64 << 10):
                        value += chunk
                        if len(value) > 1 << 20:
                            raise PayloadTooLarge(f"field {part.name!r} is over 1 MiB")
                    fields[part.name] = value.decode("utf-8", errors="replace")
                else:
                    raise InvalidInput(f"unknown field {part.name!r}")
        if spool is None or "name" not in fields or "version" not in fields:
            raise InvalidInput("publish needs the fields name, version and file")
        acceptance = _json_field(fields, "acceptance", [])
        manifest = _json_field(fields, "manifest", None)
        if manifest is not None and not isinstance(manifest, dict):
            raise InvalidInput("'manifest' must be a JSON object")
        target, new = await asyncio.to_thread(
            hub.publish,
            fields["name"],
            fields["version"],
            spool,
            fields.get("backend") or None,
            manifest,
            acceptance,
            True,
        )
    finally:
        if spool is not None:
            spool.unlink(missing_ok=True)
    return json_response(
        {
            "name": target.name,
            "version": target.version,
            "target": target.path,
            "sha256": target.sha256,
            "length": target.length,
            "new": new,
        },
        201 if new else 200,
    )


def _json_field(fields: dict[str, str], name: str, default: Any) -> Any:
    if name not in fields or not fields[name].strip():
        return default
    try:
        return orjson.loads(fields[name])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"field {name!r} is not valid JSON: {exc}") from None


def rollout_json(r: Any) -> dict[str, Any]:
    return {
        "rollout": r.public_id,
        "model": r.model,
        "version": r.version,
        "target": r.target,
        "percent": r.percent,
        "state": r.state,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }


async def create_rollout(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    body = await _json_body(request, 1 << 20)
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object")
    r = await asyncio.to_thread(
        hub.create_rollout,
        body.get("model"),
        body.get("version"),
        body.get("target"),
        body.get("percent", 100),
    )
    return json_response(rollout_json(r), 201)


async def list_rollouts(request: web.Request) -> web.Response:
    rollouts = await asyncio.to_thread(request.app[HUB].store.rollouts)
    return json_response([rollout_json(r) for r in rollouts])


async def rollout_action(request: web.Request) -> web.Response:
    """POST .../rollouts/{id}/halt, /rollback (no body) or /percent ({"percent": N}): one route
    each, so that /openapi.json says which takes a body."""
    hub = request.app[HUB]
    rid, action = request.match_info["id"], request.path.rsplit("/", 1)[-1]
    if action == "halt":
        r = await asyncio.to_thread(hub.halt, rid)
    elif action == "rollback":
        r = await asyncio.to_thread(hub.rollback, rid)
    elif action == "percent":
        body = await _json_body(request, 1 << 10)
        if not isinstance(body, dict):
            raise InvalidInput('body must be {"percent": N}')
        r = await asyncio.to_thread(hub.set_percent, rid, body.get("percent"))
    else:
        raise NotFound(f"no rollout action {action!r}")
    return json_response(rollout_json(r))


async def list_models(request: web.Request) -> web.Response:
    targets = await asyncio.to_thread(request.app[HUB].store.targets)
    return json_response(
        [
            {
                "name": t.name,
                "version": t.version,
                "target": t.path,
                "sha256": t.sha256,
                "length": t.length,
                "created_at": t.created_at,
                "backend": (t.custom.get("appliance") or {}).get("backend"),
                "acceptance_cases": len(decode_custom(t.custom)["acceptance"]),
            }
            for t in targets
        ]
    )


async def export_root(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[HUB].repo.root_bytes)
    return web.Response(body=body, content_type=_JSON)


# -- assembly --------------------------------------------------------------------------------
def _refresher(app: web.Application) -> AsyncIterator[None]:
    async def gen() -> AsyncIterator[None]:
        hub, every = app[HUB], app[REFRESH_S]

        async def loop() -> None:
            while True:
                try:  # on the leader only (one replica at a time on PostgreSQL)
                    await asyncio.to_thread(hub.periodic)
                except Exception:  # keep trying: an expired timestamp stops every device
                    log.exception("re-signing TUF metadata failed")
                await asyncio.sleep(every)

        task = asyncio.ensure_future(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return gen()


def _fleet_watch(app: web.Application) -> AsyncIterator[None]:
    """Re-read the fleet generation every `fleet_check_s` (drops the poll view when another
    process changed rollouts) and write last-seen stamps every `last_seen_s`; at shutdown,
    wait for telemetry being written and write the last stamps."""

    async def gen() -> AsyncIterator[None]:
        hub = app[HUB]
        check_s, last_seen_s = app[FLEET_CHECK_S]
        loop = asyncio.get_running_loop()

        async def watch() -> None:
            flushed = loop.time()
            while True:
                await asyncio.sleep(check_s)
                try:
                    await asyncio.to_thread(hub.check_fleet)
                    if loop.time() - flushed >= last_seen_s:
                        flushed = loop.time()
                        await asyncio.to_thread(hub.flush_last_seen)
                except Exception:  # keep going: the next round tries again
                    log.exception("checking the fleet generation or writing last-seen failed")

        task = asyncio.ensure_future(watch())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app[WRITER].drain()
        try:
            await asyncio.to_thread(hub.flush_last_seen)
        except Exception:
            log.exception("writing the last-seen stamps at shutdown failed")

    return gen()


def _static_writer(app: web.Application) -> AsyncIterator[None]:
    """Keep the static mirror directory (hub/static.py) at the store's metadata: exported at
    start, then whenever timestamp or root has a new version, whoever signed it (this process,
    a CLI publish beside it, another replica)."""

    async def gen() -> AsyncIterator[None]:
        from .static import export_static

        hub = app[HUB]
        directory, every = app[STATIC]

        def versions() -> tuple[int, int]:
            ts, root = hub.store.latest_metadata("timestamp"), hub.store.latest_metadata("root")
            return (ts[0] if ts else 0, root[0] if root else 0)

        async def loop() -> None:
            done: tuple[int, int] | None = None
            while True:
                try:
                    now = await asyncio.to_thread(versions)
                    if now != done:
                        out = await asyncio.to_thread(
                            export_static, hub.store, hub.artifacts, directory
                        )
                        done = now
                        log.info(
                            "static mirror %s at timestamp %d (%d files written)",
                            directory,
                            out.timestamp_version,
                            len(out.written),
                        )
                except Exception:  # keep trying: a mirror left behind is refused as stale
                    log.exception("writing the static mirror %s failed", directory)
                await asyncio.sleep(every)

        task = asyncio.ensure_future(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return gen()


def build_app(
    hub: Hub,
    refresh_s: float | None = None,
    resign: bool = True,
    static_dir: Path | None = None,
    static_interval_s: float = 1.0,
    fleet_check_s: float = 1.0,
    last_seen_s: float = 5.0,
) -> web.Application:
    """`refresh_s`: how often to check metadata expiry (default: a tenth of timestamp's life,
    at most an hour), and how soon a replica takes the lead from a dead one; `resign=False`
    leaves expiring metadata alone (tests of expiry); `static_dir`: keep a static TUF mirror
    there (checked every `static_interval_s`). `fleet_check_s`: how late a poll may see a
    rollout change made by another process or replica (one made here is seen at once);
    `last_seen_s`: how often last-seen stamps are written (a crash loses at most those)."""
    app = web.Application(middlewares=[middleware], client_max_size=hub.config.max_telemetry_bytes)
    app[HUB] = hub
    registry = CollectorRegistry()
    registry.register(HubCollector(hub))
    app[REGISTRY] = registry
    app[REFRESH_S] = refresh_s or min(3600.0, hub.config.expiry.timestamp / 10)
    app[WRITER] = TelemetryWriter(hub, writers=4 if hub.config.on_postgres else 1)
    app[FLEET_CHECK_S] = (fleet_check_s, last_seen_s)
    app.cleanup_ctx.append(_fleet_watch)
    if resign:
        app.cleanup_ctx.append(_refresher)
    if static_dir is not None:
        app[STATIC] = (static_dir, static_interval_s)
        app.cleanup_ctx.append(_static_writer)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/openapi.json", openapi_route(hub))
    r.add_get("/metrics", metrics)
    r.add_get("/tuf/metadata/{name}", tuf_metadata)
    r.add_get("/tuf/targets/{path:.+}", tuf_target)
    r.add_get("/api/v1/device/assignments", assignments)
    r.add_post("/api/v1/device/telemetry", telemetry)
    r.add_post("/api/v1/admin/devices", enroll)
    r.add_get("/api/v1/admin/devices", list_devices)
    r.add_get("/api/v1/admin/devices/{device_id}/events", device_events)
    r.add_post("/api/v1/admin/models", publish)
    r.add_get("/api/v1/admin/models", list_models)
    r.add_post("/api/v1/admin/rollouts", create_rollout)
    r.add_get("/api/v1/admin/rollouts", list_rollouts)
    for action in ("halt", "rollback", "percent"):
        r.add_post(f"/api/v1/admin/rollouts/{{id}}/{action}", rollout_action)
    r.add_get("/api/v1/admin/root.json", export_root)
    r.add_get("/api/v1/admin/rollouts/progress", fleet_rollouts)
    r.add_get("/api/v1/admin/metadata", fleet_metadata)
    r.add_get("/api/v1/admin/models/{name}/{version}", model_version)
    r.add_get("/", ui_file)
    r.add_get("/ui/{name}", ui_file)
    return app


def serve(
    hub: Hub,
    host: str,
    port: int,
    refresh_s: float | None = None,
    static_dir: Path | None = None,
    static_interval_s: float = 1.0,
) -> None:
    app = build_app(hub, refresh_s, static_dir=static_dir, static_interval_s=static_interval_s)
    sock = socket.create_server(
        (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, reuse_port=False
    )
    bound = sock.getsockname()[1]
    log.info(
        "hub serving %s on http://%s:%d",
        hub.config.data_dir,
        host,
        bound,
        extra={"fields": {"port": bound}},
    )
    print(f"hub listening on http://{host}:{bound}", flush=True)

    async def main() -> None:
        runner, server, front = await open_front(app, sock)
        try:
            await asyncio.Event().wait()  # until SIGTERM/SIGINT (GracefulExit)
        finally:
            server.close()
            front.close()
            await runner.cleanup()

    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(main())


async def open_front(
    app: web.Application, sock: socket.socket, handle_signals: bool = True
) -> tuple[web.AppRunner, asyncio.Server, Any]:
    """Serve `app` on `sock` behind front.py's lean device path; returns what to close."""
    from .front import Front

    runner = web.AppRunner(app, handle_signals=handle_signals, access_log=None)
    await runner.setup()
    assert runner.server is not None
    front = Front(app[HUB], app[WRITER], runner.server)
    server = await asyncio.get_running_loop().create_server(front.protocol, sock=sock)
    return runner, server, front
