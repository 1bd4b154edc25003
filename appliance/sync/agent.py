"""The device sync agent: poll the hub, verify with TUF, activate with checks, roll back.

One cycle: GET the assignments (a 304 when nothing changed, so polling is cheap); for every model
whose assigned version is not the one serving, refresh the TUF metadata, look the target up in
the verified targets (a version TUF does not list is refused, whatever the hub's API says),
download it with resumption, verify length and sha256, add it to the store as a new immutable
version, load it beside the serving version, run the acceptance inputs (or a smoke inference),
switch, and make it the store's active version. After the switch the new version's error rate
is watched for `error_window_s`; past `error_rate_threshold` the previous version is activated
again. A pipeline version (backend "pipeline": its declaration) takes the same path, but the
pipelines layer (handed in by server.py) activates it: bound to the models serving here, its
acceptance inputs (or a run on zeros where its inputs are numeric) run on it before the switch.
Every outcome is an event in the telemetry outbox; nothing here ever stops serving:
blocking work (TUF, downloads, hashing, SQLite) runs in worker threads and every failure
becomes a status and an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import shutil
import socket
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from tuf.api._payload import TargetFile  # what tuf.api.metadata re-exports
from tuf.ngclient.updater import Updater

from .. import tracing
from ..codec import InferRequest, InferResponse, decode_request
from ..config import Config
from ..engine import Engine, LoadedModel, ModelSource
from ..errors import ApplianceError, ConfigError, NotFound, StoreFull
from ..llm import Generation, Sampling, TextModel
from ..metrics import Metrics, SyncGauges
from ..progress import Throttle, describe
from ..registry import ACTIVE_NAME, PIPELINE, Registry, atomic_write
from ..tensors import DATATYPES, FLOAT_TYPES
from .client import Assignment, HubClient
from .outbox import Outbox, disk_full
from .tuf_client import Expired, Refused, SyncError, TufClient, Unreachable

log = logging.getLogger("appliance.sync")

#: The file name of a pipeline version's target on the hub (name/version/pipeline.json).
PIPELINE_TARGET = "pipeline.json"

#: Outcomes that count against a new version (a client's invalid input does not).
_FAILED = ("error", "timeout")
_COUNTED = ("success", "error", "timeout")


#: Runs a request on a version that is loaded but not serving yet.
Infer = Callable[[InferRequest], Awaitable[InferResponse]]


class PipelineHost(Protocol):
    """What the agent needs of the pipelines layer (server.py hands it the router's): a
    stored pipeline version is activated there, not by the engine."""

    def __contains__(self, name: object) -> bool: ...

    def models(self) -> list[LoadedModel]: ...

    def model(self, name: str, version: str | None = None) -> LoadedModel: ...

    def outcomes(self, name: str) -> dict[str, int]: ...

    async def activate_checked(
        self,
        source: ModelSource,
        check: Callable[[LoadedModel, Infer], Awaitable[None]] | None = None,
    ) -> LoadedModel: ...


class AcceptanceFailed(Exception):
    """A new version answered an acceptance input wrongly, or the smoke inference failed."""


class LoadFailed(Exception):
    """The runtime cannot open the new version's file (found when the store inspects it)."""


@dataclass
class Watch:
    """A version just switched to, watched for errors until `until` (monotonic time)."""

    name: str
    version: str
    previous: str | None
    sha256: str
    until: float
    base: dict[str, int] = field(default_factory=dict)


def read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} = {path!r}: cannot read: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{what} = {path!r}: the file is empty")
    return value


class SyncAgent:
    """Runs beside serving (server.py starts it in the app's cleanup context)."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        registry: Registry,
        metrics: Metrics,
        pipelines: PipelineHost | None = None,
    ):
        hub = config.hub
        if not hub.token_file:
            raise ConfigError("hub.token_file is required with hub.url (the device token)")
        if not hub.root_file:
            raise ConfigError("hub.root_file is required with hub.url (the hub's root.json)")
        if not Path(hub.root_file).is_file():
            raise ConfigError(f"hub.root_file = {hub.root_file!r}: no such file")
        token = read_secret(hub.token_file, "hub.token_file")
        self.config = config
        self.hub = hub
        self.engine = engine
        self.pipelines = pipelines
        self.registry = registry
        self.device_id = hub.device_id or config.mqtt.device_id or socket.gethostname()
        self.sync_dir = registry.root / ".sync"
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        outbox_path = Path(hub.outbox_path) if hub.outbox_path else self.sync_dir / "outbox.sqlite"
        self.outbox = Outbox(outbox_path, hub.outbox_max_bytes)
        self.client = HubClient(hub.url, token, self.device_id, hub.request_timeout_s)
        self.tuf = TufClient(
            hub.url,
            token,
            self.device_id,
            Path(hub.root_file),
            self.sync_dir / "tuf",
            self.sync_dir / "downloads",
            hub.request_timeout_s,
            hub.max_download_bytes,
            hub.mirrors,
        )
        self.state = "starting"
        self.tuf_state = "unknown"
        self.last_check = 0.0
        self.last_success = 0.0
        self.last_error: str | None = None
        self.progress: dict[str, dict[str, Any]] = {}
        self.assignments: list[Assignment] = []
        #: (name, version) -> (sha256, reason): versions refused for good (failed to load, failed
        #: acceptance, rolled back); kept on disk so that a restart does not try them again.
        self.rejected: dict[tuple[str, str], tuple[str, str]] = self._load_rejected()
        #: (name, version) -> (monotonic time of the next try, tries, last reason).
        self.retry: dict[tuple[str, str], tuple[float, int, str]] = {}
        self.watches: dict[str, Watch] = {}
        #: name -> version serving but not yet written to ACTIVE (the disk was full).
        self.unrecorded: dict[str, str] = {}
        self.uploads = {"ok": 0, "failed": 0}
        self.updates = {"activated": 0, "failed": 0, "refused": 0, "rolled_back": 0}
        self._wake = asyncio.Event()
        self._last_status: dict[str, Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        metrics.sync_source = self.gauges
        self.metrics = metrics

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, loaded: Awaitable[None]) -> None:
        self._tasks = [
            asyncio.ensure_future(self._poll_loop(loaded)),
            asyncio.ensure_future(self._upload_loop()),
            asyncio.ensure_future(self._metrics_loop()),
        ]

    async def stop(self) -> None:
        self.tuf.stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()
        await asyncio.to_thread(self.outbox.close)

    # -- status ------------------------------------------------------------------------------
    def gauges(self) -> SyncGauges:
        return SyncGauges(
            state=self.state,
            tuf=self.tuf_state,
            last_success=self.last_success,
            expired=self.tuf_state == "expired",
            outbox_depth=self.outbox.depth,
            outbox_bytes=self.outbox.bytes,
            outbox_dropped=self.outbox.dropped,
            uploads=dict(self.uploads),
            updates=dict(self.updates),
            mirror_fetches=dict(self.tuf.fetches),
        )

    def _active(self) -> dict[str, str]:
        models = self.engine.models()
        if self.pipelines is not None:
            models += self.pipelines.models()
        return {m.name: m.version for m in models if m.status == "ready"}

    def _serving(self, name: str) -> LoadedModel | None:
        """The model or pipeline serving under `name`, in whatever state."""
        if self.pipelines is not None and name in self.pipelines:
            return self.pipelines.model(name)
        return self.engine.model_or_none(name)

    def _counts(self, model: LoadedModel) -> dict[str, int]:
        if self.pipelines is not None and model.platform == PIPELINE:
            return self.pipelines.outcomes(model.name)
        return _counts(model)

    def _pending(self) -> dict[str, str]:
        active = self._active()
        return {
            a.name: a.version
            for a in self.assignments
            if active.get(a.name) != a.version and (a.name, a.version) not in self.rejected
        }

    def status(self) -> dict[str, Any]:
        """What GET /v2/sync answers: enough to tell why a device is not on its version."""
        return {
            "hub": self.hub.url,
            "mirrors": list(self.hub.mirrors),
            "served_by": dict(self.tuf.served_by),
            "device_id": self.device_id,
            "state": self.state,
            "tuf": self.tuf_state,
            "last_check": _iso(self.last_check),
            "last_success": _iso(self.last_success),
            "last_error": self.last_error,
            "active": self._active(),
            "assigned": {a.name: a.version for a in self.assignments},
            "pending": self._pending(),
            "progress": self.progress,
            "rejected": {f"{n}/{v}": why for (n, v), (_sha, why) in self.rejected.items()},
            "retrying": {
                f"{n}/{v}": {"tries": tries, "reason": why}
                for (n, v), (_at, tries, why) in self.retry.items()
            },
            "watching": {
                w.name: {"version": w.version, "seconds_left": max(0.0, w.until - time.monotonic())}
                for w in self.watches.values()
            },
            "outbox": {
                "events": self.outbox.depth,
                "bytes": self.outbox.bytes,
                "dropped": self.outbox.dropped,
            },
            "uploads": self.uploads,
            "updates": self.updates,
        }

    async def event(self, kind: str, data: dict[str, Any]) -> int:
        """Write an event to the outbox (durable before this returns) and wake the uploader."""
        seq = await asyncio.to_thread(self.outbox.append, kind, data)
        log.info("sync event %s #%d: %s", kind, seq, orjson.dumps(data).decode())
        self._wake.set()
        return seq

    async def _report_status(self) -> None:
        """A "status" event when what the hub shows for this device would change."""
        status = {
            "active": self._active(),
            "pending": self._pending(),
            "tuf": self.tuf_state,
            "last_error": self.last_error,
        }
        if status != self._last_status:
            self._last_status = status
            await self.event("status", status)

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        log.warning("sync: %s", reason)

    # -- polling -----------------------------------------------------------------------------
    async def _poll_loop(self, loaded: Awaitable[None]) -> None:
        await asyncio.to_thread(self._clean_store)
        await loaded
        await self._report_status()
        while True:
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end syncing, let alone serving
                log.exception("sync cycle failed")
                self.state = "error"
                self._fail(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self._report_status()
            jitter = self.hub.poll_jitter
            await asyncio.sleep(self.hub.poll_interval_s * random.uniform(1 - jitter, 1 + jitter))  # noqa: S311

    async def cycle(self) -> None:
        """One poll: fetch assignments, bring every assigned model to its version (a
        `sync.poll` span when tracing is on; the hub's spans join it)."""
        with tracing.span("sync.poll", {"appliance.hub.url": self.config.hub.url}):
            await self._cycle()

    async def _cycle(self) -> None:
        self.last_check = time.time()
        await self._record_active()
        await self._check_watches()
        try:
            self.assignments, _changed = await self.client.assignments()
        except Unreachable as exc:
            self.state = "offline"
            self.last_error = exc.reason
            return
        except Refused as exc:
            self.state = "error"
            self._fail(exc.reason)
            return
        self.last_success = time.time()
        if self.last_error and self.last_error.startswith("hub unreachable"):
            self.last_error = None
        now = time.monotonic()
        work = [a for a in self.assignments if self._needs(a, now)]
        if not work:
            self.state = "expired" if self.tuf_state == "expired" else "idle"
            return
        self.state = "checking"
        try:
            with tracing.span("sync.verify", {"appliance.sync.what": "metadata"}):
                updater = await asyncio.to_thread(self.tuf.refresh, [a.target for a in work])
        except Expired as exc:
            self.state = "expired"
            if self.tuf_state != "expired":
                self.tuf_state = "expired"
                for a in work:
                    await self.event(
                        "verification_failed",
                        {"model": a.name, "version": a.version, "reason": exc.reason},
                    )
                self.updates["refused"] += 1
            self._fail(exc.reason)
            return
        except Refused as exc:
            self.state = "error"
            self.tuf_state = f"error: {exc.reason}"
            for a in work:
                await self._refused(a, exc)
            return
        except Unreachable as exc:
            self.state = "offline"
            self._fail(exc.reason)
            return
        except OSError as exc:
            if not disk_full(exc):
                raise
            self.state = "error"  # python-tuf writes each file aside first: nothing half-kept
            self._fail(f"no room on disk for the TUF metadata: {exc}")
            return
        self.tuf_state = "ok"
        # Pipelines after models: one bound to a model rolled out with it sees the new model.
        work.sort(key=lambda a: a.target.endswith("/" + PIPELINE_TARGET))
        for a in work:
            await self._update(updater, a)
        self.state = "idle"
        await asyncio.to_thread(self._clean_downloads, updater)

    async def _record_active(self) -> None:
        """Write ACTIVE for versions activated while the disk was full (a restart would
        serve the older version until then)."""
        for name, version in list(self.unrecorded.items()):
            serving = self._serving_version(name)
            try:
                if serving == version:
                    await asyncio.to_thread(self.registry.activate, name, version)
            except StoreFull:
                continue
            del self.unrecorded[name]

    def _needs(self, a: Assignment, now: float) -> bool:
        key = (a.name, a.version)
        if key in self.rejected:
            return False
        retry = self.retry.get(key)
        if retry is not None and now < retry[0]:
            return False
        serving = self._serving(a.name)
        if serving is None:
            return True
        return serving.version != a.version or serving.status != "ready"

    # -- one update --------------------------------------------------------------------------
    async def _update(self, updater: Updater, a: Assignment) -> None:
        key = (a.name, a.version)
        info: TargetFile | None = None
        try:
            info = await asyncio.to_thread(updater.get_targetinfo, a.target)
            custom = self._check_target(a, info)
            assert info is not None
            source = await self._fetch(a, info, custom)
            await self._activate(a, source, custom, info.hashes["sha256"])
            self.retry.pop(key, None)
        except Unreachable as exc:
            # A download that got further before the line dropped resumes at the next poll;
            # only attempts that get nowhere back off.
            self._schedule_retry(
                a, exc.reason, escalate=self.state != "downloading" or not (self.tuf.gained)
            )
            self.state = "offline"
            self._fail(exc.reason)
        except Refused as exc:
            await self._refused(a, exc)
        except LoadFailed as exc:
            sha = info.hashes.get("sha256", "") if info is not None else ""
            await self._version_failed(a, sha, "load", str(exc), self._serving_version(a.name))
        except (OSError, StoreFull) as exc:
            if isinstance(exc, OSError) and not disk_full(exc):
                raise
            # Nothing half-written is kept (the store stages, downloads resume): retry later.
            reason = f"{a.name} version {a.version}: no room on disk for the update: {exc}"
            self._schedule_retry(a, reason)
            self.state = "error"
            self._fail(reason)
            failed = {"model": a.name, "version": a.version, "stage": "disk", "reason": reason}
            await self.event("update_failed", failed)
        finally:
            self.progress.pop(a.name, None)

    def _check_target(self, a: Assignment, info: TargetFile | None) -> dict[str, Any]:
        if info is None:
            raise Refused(
                f"target {a.target} is not listed in the verified TUF targets: refusing "
                f"{a.name} version {a.version}"
            )
        custom = info.custom.get("appliance") if isinstance(info.custom, dict) else None
        if not isinstance(custom, dict):
            raise Refused(f"target {a.target} carries no signed appliance description")
        if str(custom.get("name")) != a.name or str(custom.get("version")) != a.version:
            raise Refused(
                f"target {a.target} is signed as {custom.get('name')!r} version "
                f"{custom.get('version')!r}, not {a.name!r} version {a.version!r}"
            )
        # Canonical JSON has no floats, so the hub signs these two as JSON text.
        manifest = _decoded(custom.get("manifest"), dict, a.target, "manifest")
        acceptance = _decoded(custom.get("acceptance"), list, a.target, "acceptance")
        return {**custom, "manifest": manifest or {}, "acceptance": acceptance or []}

    async def _fetch(self, a: Assignment, info: TargetFile, custom: dict[str, Any]) -> ModelSource:
        """The assigned version in the store, downloaded and added if it is not there yet."""
        sha = info.hashes.get("sha256", "")
        if a.version in await asyncio.to_thread(self._versions, a.name):
            mv = self.registry.get(a.name, a.version)
            if mv.manifest.sha256 != sha:
                raise Refused(
                    f"the store holds {a.name} version {a.version} with sha256 "
                    f"{mv.manifest.sha256}, but TUF signs {sha}: versions never change"
                )
            # Stored before a restart: what the download left is not needed any more.
            await asyncio.to_thread(self.tuf.discard, info)
            return ModelSource(mv.manifest, mv.file)
        self.state = "downloading"
        progress = self.progress.setdefault(a.name, {"version": a.version})
        throttle = Throttle(info.length)
        what = f"download {a.name} {a.version}"

        def on_progress(done: int, total: int) -> None:  # called from the download thread
            progress.update(bytes=done, total=total)
            if throttle.due(done):  # every 10 % (at most once a second) or 5 s, and the end
                log.info(
                    "%s", describe(what, done, total, throttle.elapsed),
                    extra={"fields": {"model": a.name, "version": a.version, "bytes": done,
                                      "total": total}},
                )  # fmt: skip
            if done >= total:
                self.state = "verifying"

        with tracing.span("sync.download", _attributes(a)):
            path = await asyncio.to_thread(self.tuf.download, info, on_progress)
        self.state = "storing"
        manifest = custom["manifest"]
        backend = custom.get("backend")
        try:
            mv = await asyncio.to_thread(
                functools.partial(
                    self.registry.add,
                    a.name,
                    path,
                    a.version,
                    activate=False,
                    backend=str(backend) if backend else None,
                    preprocess=_object(manifest.get("preprocess")),
                    postprocess=_object(manifest.get("postprocess")),
                    steps=_object(manifest.get("steps")),
                )
            )
        except StoreFull:
            path.unlink(missing_ok=True)  # the space it holds is needed; it downloads again
            raise
        except ApplianceError as exc:
            path.unlink(missing_ok=True)  # verified, but no runtime here can open it
            raise LoadFailed(exc.message) from None
        if mv.manifest.sha256 != sha:  # the copy in the store is what will be served
            await asyncio.to_thread(self.registry.remove, a.name, a.version)
            raise Refused(f"{a.name} version {a.version}: the stored copy does not match TUF")
        path.unlink(missing_ok=True)
        return ModelSource(mv.manifest, mv.file)

    def _versions(self, name: str) -> list[str]:
        try:
            return self.registry.versions(name)
        except NotFound:
            return []

    async def _activate(
        self, a: Assignment, source: ModelSource, custom: dict[str, Any], sha: str
    ) -> None:
        self.state = "activating"
        previous = self._serving_version(a.name)
        acceptance: list[Any] = custom["acceptance"]
        stage = "load"
        pipeline = source.manifest.backend == PIPELINE

        switched_at: dict[str, int] | None = None

        async def check(model: LoadedModel) -> None:
            nonlocal stage, switched_at
            stage = "acceptance"
            await self._acceptance(
                model, acceptance, functools.partial(self.engine.infer_on, model)
            )
            # The engine switches to it right after this returns, with no await between, then
            # drains the old version (which can take a while): the counts are taken here, so
            # the requests it answers from the switch on, during the drain too, are watched.
            switched_at = self._counts(model)

        async def check_pipeline(model: LoadedModel, infer: Infer) -> None:
            nonlocal stage
            stage = "acceptance"
            await self._acceptance(model, acceptance, infer)

        try:
            with tracing.span("sync.activate", _attributes(a)):
                if pipeline:
                    if self.pipelines is None:
                        raise LoadFailed("this device serves no pipelines")
                    stage = "bind"
                    await self.pipelines.activate_checked(source, check_pipeline)
                elif self.pipelines is not None and a.name in self.pipelines:
                    raise LoadFailed(f"a pipeline is called {a.name!r} on this device")
                else:
                    await self.engine.activate(source, check)
        except (ApplianceError, AcceptanceFailed, LoadFailed) as exc:
            reason = exc.message if isinstance(exc, ApplianceError) else str(exc)
            await self._version_failed(a, sha, stage, reason, previous)
            return
        # It serves: a model's counts were taken at the switch (in `check`); a pipeline's
        # switch is the last thing activate_checked does, so its counts are taken now, before
        # anything else awaits (the ACTIVE write below hops to a thread).
        model = self._serving(a.name)
        assert model is not None
        counts = switched_at if switched_at is not None else self._counts(model)
        try:
            await asyncio.to_thread(self.registry.activate, a.name, a.version)
        except StoreFull as exc:  # it serves; ACTIVE is written once there is room
            self.unrecorded[a.name] = a.version
            self._fail(f"{a.name} version {a.version} serves, but is not recorded yet: {exc}")
        self.updates["activated"] += 1
        self.watches[a.name] = Watch(
            a.name,
            a.version,
            previous,
            sha,
            time.monotonic() + self.hub.error_window_s,
            counts,
        )
        if self.last_error and self.last_error.startswith(f"{a.name} "):
            self.last_error = None
        await self.event("activated", {"model": a.name, "version": a.version, "previous": previous})

    async def _version_failed(
        self, a: Assignment, sha: str, stage: str, reason: str, previous: str | None
    ) -> None:
        """The new version never served: the old one goes on. Refused for good (kept on disk),
        reported as a failed update and a rollback to the version still serving."""
        await self._reject(a.name, a.version, sha, reason)
        self.updates["failed"] += 1
        self.updates["rolled_back"] += 1
        self._fail(f"{a.name} version {a.version} failed at {stage}: {reason}")
        await self.event(
            "update_failed",
            {"model": a.name, "version": a.version, "stage": stage, "reason": reason},
        )
        await self.event(
            "rolled_back", {"model": a.name, "from": a.version, "to": previous, "reason": reason}
        )

    def _serving_version(self, name: str) -> str | None:
        model = self._serving(name)
        return model.version if model is not None else None

    async def _acceptance(self, model: LoadedModel, cases: list[Any], infer: Infer) -> None:
        """Run the signed acceptance inputs on the loaded, not yet serving version; without
        any, one smoke inference must answer (for a pipeline: one on zeros where its inputs
        are all numeric; that it bound to the serving models is its check otherwise)."""
        if not cases:
            if model.platform != PIPELINE:
                await self._smoke(model)
            elif all(t.datatype != "BYTES" for t in model.signature.inputs):
                try:
                    await infer(_zeros(model))
                except ApplianceError as exc:
                    raise AcceptanceFailed(f"run on zeros failed: {exc.message}") from None
            return
        for i, case in enumerate(cases):
            if not isinstance(case, dict):
                raise AcceptanceFailed(f"acceptance case {i} is not an object")
            try:
                request = decode_request(orjson.dumps({"inputs": case.get("inputs", [])}))
                response = await infer(request)
            except ApplianceError as exc:
                raise AcceptanceFailed(f"acceptance case {i}: {exc.message}") from None
            rtol = float(case.get("rtol", 1e-4))
            atol = float(case.get("atol", 1e-5))
            for expected in case.get("outputs", []):
                _compare(i, expected, response.outputs, rtol, atol)

    async def _smoke(self, model: LoadedModel) -> None:
        backend = model.backend
        try:
            if isinstance(backend, TextModel):
                # Not serving yet, so nothing else uses this backend: call it directly.
                if backend.mode == "embedding":
                    await asyncio.to_thread(backend.embed, ["smoke test"])
                else:
                    gen = Generation("completion", prompt="Hello", sampling=Sampling(max_tokens=1))
                    await asyncio.to_thread(backend.generate, gen, None, lambda: False)
                return
            await self.engine.infer_on(model, _zeros(model))
        except ApplianceError as exc:
            raise AcceptanceFailed(f"smoke inference failed: {exc.message}") from None
        except Exception as exc:
            raise AcceptanceFailed(f"smoke inference failed: {type(exc).__name__}: {exc}") from None

    # -- failures ----------------------------------------------------------------------------
    async def _refused(self, a: Assignment, exc: SyncError) -> None:
        """Verification refused this version: event once per reason, retried with backoff (the
        hub may be fixed), never activated."""
        previous = self.retry.get((a.name, a.version))
        self._schedule_retry(a, exc.reason)
        self._fail(f"{a.name} version {a.version} refused: {exc.reason}")
        if previous is not None and previous[2] == exc.reason:
            return
        self.updates["refused"] += 1
        await self.event(
            "verification_failed", {"model": a.name, "version": a.version, "reason": exc.reason}
        )

    def _schedule_retry(self, a: Assignment, reason: str, escalate: bool = True) -> None:
        key = (a.name, a.version)
        tries = self.retry.get(key, (0.0, 0, ""))[1] + 1 if escalate else 1
        delay = min(3600.0, self.hub.poll_interval_s * 2 ** min(tries - 1, 12))
        self.retry[key] = (time.monotonic() + delay, tries, reason)

    async def _reject(self, name: str, version: str, sha: str, reason: str) -> None:
        self.rejected[(name, version)] = (sha, reason)
        await asyncio.to_thread(self._save_rejected)

    def _load_rejected(self) -> dict[tuple[str, str], tuple[str, str]]:
        path = self.sync_dir / "rejected.json"
        try:
            raw = orjson.loads(path.read_bytes())
            return {
                (str(r["model"]), str(r["version"])): (str(r["sha256"]), str(r["reason"]))
                for r in raw
            }
        except FileNotFoundError:
            return {}
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}

    def _save_rejected(self) -> None:
        rows = [
            {"model": n, "version": v, "sha256": sha, "reason": why}
            for (n, v), (sha, why) in self.rejected.items()
        ]
        atomic_write(self.sync_dir / "rejected.json", orjson.dumps(rows))

    # -- watching a new version --------------------------------------------------------------
    async def _check_watches(self) -> None:
        now = time.monotonic()
        for name, w in list(self.watches.items()):
            model = self._serving(name)
            if model is None or model.version != w.version:
                del self.watches[name]
                continue
            counts = self._counts(model)
            total = sum(counts.get(k, 0) - w.base.get(k, 0) for k in _COUNTED)
            failed = sum(counts.get(k, 0) - w.base.get(k, 0) for k in _FAILED)
            if total >= max(1, self.hub.min_requests) and failed / total > (
                self.hub.error_rate_threshold
            ):
                del self.watches[name]
                await self._roll_back(w, f"error rate {failed}/{total} within the watch window")
            elif now >= w.until:
                del self.watches[name]

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._check_watches()

    async def _roll_back(self, w: Watch, reason: str) -> None:
        await self._reject(w.name, w.version, w.sha256, reason)
        if w.previous is None:
            self._fail(f"{w.name} version {w.version}: {reason}; no earlier version to go back to")
            return
        try:
            mv = self.registry.get(w.name, w.previous)
            source = ModelSource(mv.manifest, mv.file)
            if mv.manifest.backend == PIPELINE and self.pipelines is not None:
                await self.pipelines.activate_checked(source)
            else:
                await self.engine.activate(source)
            await asyncio.to_thread(self.registry.activate, w.name, w.previous)
        except ApplianceError as exc:
            self._fail(f"rollback of {w.name} to {w.previous} failed: {exc.message}")
            return
        self.updates["rolled_back"] += 1
        self._fail(f"{w.name} version {w.version} rolled back to {w.previous}: {reason}")
        await self.event(
            "rolled_back", {"model": w.name, "from": w.version, "to": w.previous, "reason": reason}
        )
        await self._report_status()

    # -- telemetry ---------------------------------------------------------------------------
    async def _upload_loop(self) -> None:
        """Send the outbox in order, oldest first; on failure back off (with jitter) up to
        twice the poll interval, and never drop anything the hub has not acknowledged."""
        cap = max(1.0, min(300.0, 2 * self.hub.poll_interval_s))
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311
            events = await asyncio.to_thread(self.outbox.batch, self.hub.upload_batch)
            if not events:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.hub.poll_interval_s)
                continue
            try:
                await self.client.upload([e.to_json() for e in events])
            except Unreachable as exc:
                self.uploads["failed"] += 1
                log.debug("telemetry upload failed: %s", exc.reason)
                delay = min(cap, max(0.5, delay * 2))
                continue
            self.uploads["ok"] += 1
            delay = 0.0
            try:
                await asyncio.to_thread(self.outbox.acknowledge, events[-1].seq)
            except (sqlite3.Error, OSError) as exc:  # the hub dedups what is sent again
                if not disk_full(exc):
                    raise
                log.warning("telemetry: cannot forget uploaded events, the disk is full: %s", exc)
                delay = cap

    async def _metrics_loop(self) -> None:
        watch = asyncio.ensure_future(self._watch_loop())
        last: dict[str, Any] = {}
        try:
            while True:
                await asyncio.sleep(self.hub.metrics_interval_s)
                snapshot = self.metrics.model_snapshot()
                if snapshot and snapshot != last:  # an idle device sends nothing new
                    last = snapshot
                    await self.event("metrics", {"models": snapshot})
        finally:
            watch.cancel()

    # -- the store on disk -------------------------------------------------------------------
    def _clean_store(self) -> None:
        """Remove what a killed process left half-done: staging and trash directories of the
        store, temporary ACTIVE files. Partial downloads stay, to be resumed."""
        root = self.registry.root
        if not root.is_dir():
            return
        for model_dir in root.iterdir():
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            for p in model_dir.iterdir():
                if p.name.startswith(".") and p.name.endswith((".partial", ".trash")):
                    log.info("removing %s, left by an interrupted store change", p)
                    _remove_tree(p)
                elif p.name.startswith(f".{ACTIVE_NAME}.") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)

    def _clean_downloads(self, updater: Updater) -> None:
        """Delete downloads that no current assignment needs any more."""
        wanted = set()
        for a in self.assignments:
            with contextlib.suppress(Exception):
                info = updater.get_targetinfo(a.target)
                if info is not None:
                    wanted.add(info.hashes.get("sha256", ""))
        directory = self.tuf.download_dir
        if not directory.is_dir():
            return
        for p in directory.iterdir():
            if p.name.split(".", 1)[0] not in wanted:
                p.unlink(missing_ok=True)


def _attributes(a: Assignment) -> dict[str, str]:
    return {"appliance.model.name": a.name, "appliance.model.version": a.version}


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.chmod(stat.S_IRWXU)
        for p in path.rglob("*"):
            if p.is_dir():
                p.chmod(stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


def _counts(model: LoadedModel) -> dict[str, int]:
    return dict(model.stats.outcomes) if model.stats is not None else {}


def _decoded(value: Any, kind: type, target: str, what: str) -> Any:
    """A signed custom field, given as an object or as JSON text; anything else is refused."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise Refused(f"target {target}: signed {what} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise Refused(f"target {target}: signed {what} is not a JSON {kind.__name__}")
    return value


def _object(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _iso(t: float) -> str | None:
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _zeros(model: LoadedModel) -> InferRequest:
    """A request of zeros (one item per dynamic dimension) for the model's every input."""
    inputs = {}
    datatypes = {}
    for spec in model.signature.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            array = np.full(shape, b"", dtype=object)
        else:
            array = np.zeros(shape, dtype=DATATYPES[spec.datatype])
        inputs[spec.name] = array
        datatypes[spec.name] = spec.datatype
    return InferRequest(inputs, datatypes=datatypes)


def _compare(
    case: int, expected: Any, outputs: dict[str, np.ndarray[Any, Any]], rtol: float, atol: float
) -> None:
    if not isinstance(expected, dict) or "name" not in expected:
        raise AcceptanceFailed(f"acceptance case {case}: an expected output has no name")
    name = str(expected["name"])
    if name not in outputs:
        raise AcceptanceFailed(f"acceptance case {case}: the model gave no output {name!r}")
    got = outputs[name]
    datatype = str(expected.get("datatype", ""))
    try:
        want = np.asarray(expected["data"], dtype=DATATYPES.get(datatype, got.dtype))
        want = want.reshape(expected.get("shape", got.shape))
    except (KeyError, ValueError, TypeError) as exc:
        raise AcceptanceFailed(f"acceptance case {case}: output {name!r}: {exc}") from None
    if got.shape != want.shape:
        raise AcceptanceFailed(
            f"acceptance case {case}: output {name!r} has shape {list(got.shape)}, "
            f"expected {list(want.shape)}"
        )
    if datatype in FLOAT_TYPES or got.dtype.kind == "f":
        ok = bool(np.allclose(got.astype(np.float64), want.astype(np.float64), rtol, atol))
    else:
        ok = bool(np.array_equal(got, want))
    if not ok:
        raise AcceptanceFailed(
            f"acceptance case {case}: output {name!r} differs from the expected values "
            f"(rtol {rtol}, atol {atol})"
        )
