"""The loaded models: load, activate (the gap-free version switch), look up, run.

It sits below the router (appliance/routing/), which alone knows tasks; the engine knows
nothing of them and never calls back up."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .. import heap, tracing
from ..backends.base import Backend, LoadContext
from ..codec import InferRequest, InferResponse
from ..config import Config, ModelConfig
from ..device import Placement
from ..errors import ApplianceError, InvalidInput, ModelError, NotFound, NotReady
from ..formats import available as formats_available
from ..isolation import StateHook, load_backend
from ..llm import EmbeddingResult, Generation, GenerationResult, TextModel
from ..manifest import Manifest, verify_file
from ..metrics import Metrics, ModelGauges, ModelStats
from ..registry import Registry
from ..tensors import Signature
from .batching import policy_for
from .scheduler import ModelRunner, Timing, lower_priority
from .validation import validate

if TYPE_CHECKING:
    from ..formats.templates import Templates
    from ..steps.chain import Chain

log = logging.getLogger("appliance.engine")

#: "restarting": an isolated model whose worker process died (appliance/isolation).
Status = Literal["loading", "ready", "restarting", "failed", "stopped"]
T = TypeVar("T")


@dataclass
class ModelSource:
    """A model version to serve: its manifest and the file it names."""

    manifest: Manifest
    path: Path
    #: Check the file against the manifest's sha256 before loading.
    verify: bool = True


@dataclass
class LoadedModel:
    source: ModelSource
    config: ModelConfig
    status: Status = "loading"
    reason: str | None = None
    backend: Backend | None = None
    runner: ModelRunner | None = None
    load_seconds: float = 0.0
    #: Unix time the model finished loading (OpenAI's `created`).
    loaded_at: float = 0.0
    stats: ModelStats | None = None
    versions: list[str] = field(default_factory=list)
    #: The steps around the model: image decoding, classification answers, raw quantized
    #: tensors (None: nothing declared, nothing quantized).
    chain: Chain | None = None
    #: Its report templates, compiled at load (None: its manifest names none).
    templates: Templates | None = None

    @property
    def name(self) -> str:
        return self.source.manifest.name

    @property
    def version(self) -> str:
        return self.source.manifest.version

    @property
    def signature(self) -> Signature:
        return self.backend.signature if self.backend else self.source.manifest.signature

    @property
    def placement(self) -> Placement | None:
        return self.backend.placement if self.backend else None

    @property
    def platform(self) -> str:
        return self.backend.platform if self.backend else self.source.manifest.backend


_OUTCOME = {400: "invalid", 503: "overloaded", 504: "timeout"}


class Engine:
    def __init__(
        self, config: Config, metrics: Metrics, sources: list[ModelSource], cache_dir: Path
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.cache_dir = cache_dir
        self._models: dict[str, LoadedModel] = {}
        #: The model that serves a name, if any: the dict's own `get` (no Python frame: the
        #: pipelines check their bound models with it on every request).
        self.model_or_none: Callable[[str], LoadedModel | None] = self._models.get
        for src in sources:
            name = src.manifest.name
            if name in self._models:
                raise ModelError(f"model {name!r} is listed twice")
            self._models[name] = LoadedModel(src, config.model_config(name))
        self.started = False
        self.loaded = False
        #: One version switch at a time per model name.
        self._switching: dict[str, asyncio.Lock] = {}
        metrics.gauge_source = self._gauges

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model, one at a time (small devices have little memory to spare)."""
        self.started = True
        for model in list(self._models.values()):
            if self._models.get(model.name) is not model:
                continue  # replaced by activate() before its turn came
            await self._load(model)
            if self._models.get(model.name) is not model:
                await self._retire(model)
        self.loaded = True

    async def _load(self, model: LoadedModel) -> None:
        t0 = time.perf_counter()
        try:
            backend = await self._in_worker_thread(model)
        except ApplianceError as exc:
            model.status, model.reason = "failed", exc.message
            log.error(
                "model %s version %s failed to load: %s", model.name, model.version, exc.message
            )
            return
        except Exception as exc:
            model.status, model.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("model %s version %s failed to load", model.name, model.version)
            return
        model.load_seconds = time.perf_counter() - t0
        model.loaded_at = time.time()
        model.backend = backend
        model.stats = self.metrics.for_model(model.name, model.version)
        if model.chain is not None:
            name = model.name
            model.chain.bind(lambda step: self.metrics.for_step(name, step))
        label = f"{model.name}/{model.version}"
        model.runner = ModelRunner(
            backend,
            label,
            backend.parallelism or model.config.max_concurrency,
            model.config.max_queue,
            model.stats,
            inline_max_us=model.config.inline_max_us,
            batching=policy_for(model.config.batching, backend, label),
            nice=model.config.worker_nice,
            priority=model.config.priority,
        )
        model.status = "ready"
        p = backend.placement
        policy = model.runner.batching
        log.info(
            "model %s version %s ready on %s (%s) in %.3f s, %s",
            model.name,
            model.version,
            p.device,
            p.detail,
            model.load_seconds,
            f"batching up to {policy.max_rows} rows" if policy else "unbatched",
        )

    async def _in_worker_thread(self, model: LoadedModel) -> Backend:
        """Load in a thread of its own at the workers' priority: the runtime's thread pools,
        started now, inherit it (see scheduler.lower_priority). An isolated model's worker
        process starts at the loop's and lowers itself but for its loop channel (isolation)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Backend] = loop.create_future()

        def deliver(result: Backend | None, error: BaseException | None) -> None:
            if future.cancelled():
                if result is not None:
                    result.unload()
            elif error is not None:
                future.set_exception(error)
            else:
                assert result is not None
                future.set_result(result)

        def on_state(status: str, reason: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown)
                loop.call_soon_threadsafe(self._worker_state, model, status, reason)

        def load() -> None:
            if model.config.isolation != "process":  # (an isolated model's worker lowers itself)
                lower_priority(model.config.worker_nice)
            result: Backend | None = None
            error: BaseException | None = None
            try:
                result = self._load_backend(model, on_state)
            except BaseException as exc:
                error = exc
            heap.release()  # what loading allocated and freed again (appliance/heap.py)
            try:
                loop.call_soon_threadsafe(deliver, result, error)
            except RuntimeError:  # the loop closed while loading (shutdown)
                if result is not None:
                    result.unload()

        threading.Thread(target=load, name=f"load-{model.name}", daemon=True).start()
        return await future

    def _load_backend(self, model: LoadedModel, on_state: StateHook | None = None) -> Backend:
        src = model.source
        if src.verify:
            verify_file(src.path, src.manifest)
        context = LoadContext(model.config, self.cache_dir)
        backend = load_backend(src.manifest, src.path, context, on_state)
        try:
            manifest, chain = src.manifest, None
            if manifest.declared("input") or manifest.declared("output") or backend.quantization:
                # the steps are imported by the first model that has some (build_chain gives
                # None for the others)
                from ..steps.chain import build_chain

                chain = build_chain(manifest, backend.signature, backend.quantization, model.config)
            model.chain = chain
            if src.manifest.templates:
                from ..formats.templates import load_templates  # a model with templates only

                where = f"model {model.name!r} version {model.version}"
                model.templates = load_templates(
                    src.path.parent, src.manifest.templates, model.config.formats, where
                )
        except BaseException:
            backend.unload()
            raise
        return backend

    def _worker_state(self, model: LoadedModel, status: str, reason: str | None) -> None:
        """An isolated model's worker process died, or serves again (loop thread)."""
        if model.status in ("ready", "restarting"):  # not one loading, failed or retired
            model.status = "ready" if status == "ready" else "restarting"
            model.reason = reason

    async def activate(
        self,
        source: ModelSource,
        check: Callable[[LoadedModel], Awaitable[None]] | None = None,
    ) -> LoadedModel:
        """Serve `source` in place of whatever version now serves its name, with no gap.

        The new version loads, and passes `check` (a smoke test, acceptance inputs), while the
        old one keeps serving. The switch is one assignment on the loop thread, and a request
        picks its version and enters that version's queue without yielding, so each request
        runs wholly on one version. The old version then finishes what it had queued and
        unloads. A version that fails to load or fails `check` raises and changes nothing.
        """
        name = source.manifest.name
        async with self._switching.setdefault(name, asyncio.Lock()):
            new = LoadedModel(source, self.config.model_config(name))
            await self._load(new)
            if new.status != "ready":
                raise ModelError(
                    f"model {name!r} version {new.version} failed to load: {new.reason}; "
                    "the version serving before still serves"
                )
            if check is not None:
                try:
                    await check(new)
                except BaseException:
                    await self._retire(new)
                    raise
            old = self._models.get(name)
            self._models[name] = new
            log.info(
                "model %s now served by version %s%s",
                name,
                new.version,
                f" (was {old.version}, draining)" if old is not None else "",
            )
            if old is not None:
                await self._retire(old)
        return new

    async def activate_stored(
        self, registry: Registry, name: str, version: str | None = None
    ) -> LoadedModel:
        """Serve a version from the store (its active one by default); on success that version
        also becomes the store's active one, so a restart serves the same."""
        mv = registry.get(name, version) if version is not None else registry.active(name)
        model = await self.activate(ModelSource(mv.manifest, mv.file))
        if version is not None:
            registry.activate(name, version)
        return model

    async def reload_store(self, registry: Registry) -> list[str]:
        """Serve the store's active version of every model whose version changed or is new.

        Models that left the store keep serving until unloaded. Returns what changed."""
        changed = []
        for name in registry.names():
            try:
                mv = registry.active(name)
            except ApplianceError as exc:
                log.warning("reload: skipping model %s: %s", name, exc.message)
                continue
            if mv.manifest.backend == "pipeline":
                continue  # served by the pipelines layer, not loaded here
            serving = self._models.get(name)
            if serving is not None and serving.version == mv.manifest.version:
                continue
            try:
                await self.activate(ModelSource(mv.manifest, mv.file))
            except ApplianceError as exc:
                log.error("reload: model %s version %s: %s", name, mv.manifest.version, exc.message)
                continue
            changed.append(f"{name}/{mv.manifest.version}")
        return changed

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests get 404, queued ones finish first."""
        async with self._switching.setdefault(name, asyncio.Lock()):
            model = self._models.pop(name, None)
            if model is None:
                raise NotFound(f"unknown model {name!r}")
            await self._retire(model)

    async def _retire(self, model: LoadedModel) -> None:
        """Drain and unload a version no longer reachable through `_models`."""
        model.status = "stopped"  # before the first await: nothing new may enter its queue
        if model.runner is not None:
            await model.runner.stop()
            model.runner = None
        if model.backend is not None:
            model.backend.unload()
            model.backend = None
            heap.release()
        model.status = "stopped"

    async def stop(self) -> None:
        for model in list(self._models.values()):
            await self._retire(model)

    def _gauges(self) -> list[ModelGauges]:
        out = []
        for m in self._models.values():
            p, runner = m.placement, m.runner
            running = runner.running if runner else 0
            out.append(
                ModelGauges(
                    name=m.name,
                    version=m.version,
                    ready=m.status == "ready",
                    device=p.device if p else None,
                    detail=p.detail if p else "",
                    fallback=bool(p and p.fallback_reason),
                    load_seconds=m.load_seconds,
                    queue_depth=(runner.pending - running) if runner else 0,
                    inflight=running,
                    queued_by_level=runner.queued_by_level() if runner else (),
                )
            )
        return out

    # -- queries ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        if not self.loaded:
            return False
        if self.config.server.strict_readiness:
            return all(m.status == "ready" for m in self._models.values())
        return True

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The model that serves `name` (and `version`, if given); NotFound otherwise."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}")
        if version is not None and version != model.version:
            raise NotFound(
                f"model {name!r} has no version {version!r} loaded (serving version "
                f"{model.version!r})"
            )
        return model

    def ready_model(self, name: str, version: str | None = None) -> LoadedModel:
        model = self._models.get(name)
        if (  # the common case, in one lookup
            model is not None
            and model.status == "ready"
            and (version is None or version == model.version)
        ):
            return model
        model = self.model(name, version)  # NotFound, saying why
        if model.status != "ready":
            why = f": {model.reason}" if model.reason else ""
            raise NotReady(f"model {name!r} version {model.version} is {model.status}{why}")
        return model

    # -- inference -------------------------------------------------------------------------
    def check_capacity(self, model: LoadedModel, priority: int | None = None) -> None:
        """503 at once for a request known by its head (see ModelRunner.admit_head)."""
        runner, metrics = model.runner, model.stats
        if runner is None or metrics is None:
            return
        try:
            runner.admit_head(priority)
        except ApplianceError:
            metrics.outcomes["overloaded"] += 1
            raise

    async def infer_on(
        self, model: LoadedModel, request: InferRequest, inline: bool = True
    ) -> InferResponse:
        """Run `request` on this loaded version (also one not yet switched to, for checks).
        `inline=False`: never on the event loop thread, so that requests sent together are
        batched (see ModelRunner.run). `infer_now` is this method for the inline case, written
        out: keep the two in step."""
        runner, metrics = model.runner, model.stats
        assert runner is not None and metrics is not None
        t0 = time.perf_counter()
        chain = model.chain
        plan = None
        try:
            if runner.priority_levels > 1:
                # its level is known now: under a flood, refuse before preparing or validating
                runner.check_capacity(request.priority)
            if chain is not None:
                plan = await chain.prepare(request)
                if model.status != "ready":  # switched to another version while decoding
                    model, runner, metrics = self._successor(model)
            outputs = validate(model.signature, request, model.config.allow_non_finite)
            timeout = model.config.timeout_s
            if request.timeout_s is not None:
                timeout = min(timeout, request.timeout_s)
            result, timing = await runner.run(
                request.inputs, outputs, timeout, request.priority, inline
            )
            if tracing.tracer is not None:
                _trace_run(model, timing)
            if chain is not None:
                result = await chain.finish(request, result, plan)
        except ApplianceError as exc:
            metrics.outcomes[_OUTCOME.get(exc.status, "error")] += 1
            if chain is not None:
                chain.restore(request, plan)
            raise
        metrics.outcomes["success"] += 1
        metrics.total.observe(time.perf_counter() - t0)
        return InferResponse(
            model.name, model.version, result, request.id, templates=model.templates
        )

    def infer_now(self, model: LoadedModel, request: InferRequest) -> InferResponse | None:
        """`infer_on` whole and at once, with no coroutine, for the common case: a model with
        no steps and one priority level whose runner takes this request inline (measured fast,
        nothing queued: see ModelRunner.inline_bytes). None when it does not: nothing was done
        (no count, no run), `infer_on` takes the request as always."""
        runner, metrics = model.runner, model.stats
        if runner is None or metrics is None or model.chain is not None or runner.has_levels:
            return None
        nbytes = runner.inline_bytes(request.inputs)
        if nbytes < 0:
            return None
        t0 = time.perf_counter()
        try:
            outputs = validate(model.signature, request, model.config.allow_non_finite)
            timeout = model.config.timeout_s
            if request.timeout_s is not None and request.timeout_s < timeout:
                timeout = request.timeout_s
            result = runner.run_now(request.inputs, outputs, timeout, nbytes)
        except ApplianceError as exc:
            metrics.outcomes[_OUTCOME.get(exc.status, "error")] += 1
            raise
        if tracing.tracer is not None:
            start, compute_s = runner.inline_start, runner.inline_s
            _trace_run(model, Timing(0.0, compute_s, True, 1, start))
        metrics.outcomes["success"] += 1
        metrics.total.observe(time.perf_counter() - t0)
        return InferResponse(
            model.name, model.version, result, request.id, templates=model.templates
        )

    def _successor(self, model: LoadedModel) -> tuple[LoadedModel, ModelRunner, ModelStats]:
        """The version that replaced `model`, if it declares the same steps (so it prepares
        inputs and answers the same way)."""
        current = self.ready_model(model.name)
        if current.source.manifest.processing != model.source.manifest.processing:
            raise NotReady(
                f"model {model.name!r} switched to version {current.version}, which prepares "
                "its inputs differently, while this request was being prepared; send it again"
            )
        assert current.runner is not None and current.stats is not None
        return current, current.runner, current.stats

    def text_model(self, name: str, mode: str) -> tuple[LoadedModel, TextModel]:
        """The ready model `name`, which must be a language ("chat") or embedding model."""
        model = self.ready_model(name)
        backend = model.backend
        if not isinstance(backend, TextModel):
            raise InvalidInput(
                f"model {name!r} is a {model.platform} tensor model, not a text model"
            )
        if backend.mode != mode:
            what = "language" if mode == "chat" else "embedding"
            raise InvalidInput(f"model {name!r} is not a {what} model (it serves {backend.mode})")
        return model, backend

    async def _call(self, model: LoadedModel, fn: Callable[[Any, Callable[[], bool]], T],
                    stop: Callable[[], bool] | None, priority: int | None = None) -> T:  # fmt: skip
        runner, metrics = model.runner, model.stats
        assert runner is not None and metrics is not None
        t0 = time.perf_counter()
        try:
            result = await runner.call(fn, model.config.timeout_s, stop, priority)
        except ApplianceError as exc:
            metrics.outcomes[_OUTCOME.get(exc.status, "error")] += 1
            raise
        cancelled = getattr(result, "finish_reason", None) == "cancelled"
        metrics.outcomes["cancelled" if cancelled else "success"] += 1
        t1 = time.perf_counter()
        metrics.total.observe(t1 - t0)
        if tracing.tracer is not None:  # a generation or embedding: its wait and run together
            attributes = {
                "appliance.model.name": model.name,
                "appliance.model.version": model.version,
            }
            tracing.record("run", t0, t1, attributes)
        return result

    async def generate_on(
        self,
        model: LoadedModel,
        request: Generation,
        emit: Callable[[str], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Run a generation on this loaded version (at its priority level)."""
        from_worker = None if emit is None else worker_to_loop(emit)

        return await self._call(
            model,
            lambda backend, cancelled: backend.generate(request, from_worker, cancelled),
            stop,
            request.priority,
        )

    async def embed_on(
        self, model: LoadedModel, texts: list[str], priority: int | None = None
    ) -> EmbeddingResult:
        return await self._call(
            model, lambda backend, _cancelled: backend.embed(texts), None, priority
        )

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        """KServe v2 model metadata, plus where the model runs."""
        sig = model.signature
        meta: dict[str, Any] = {
            "name": model.name,
            "versions": [model.version],
            "platform": model.platform,
            "inputs": [t.to_json() for t in sig.inputs],
            "outputs": [t.to_json() for t in sig.outputs],
        }
        params: dict[str, Any] = {"status": model.status, "sha256": model.source.manifest.sha256}
        if model.reason:
            params["reason"] = model.reason
        p = model.placement
        if p is not None:
            params["device"] = p.device
            params["runtime_detail"] = p.detail
            if p.fallback_reason:
                params["fallback_reason"] = p.fallback_reason
        if model.chain is not None:
            params.update(model.chain.describe())
        params["formats"] = formats_available(model.templates)
        meta["parameters"] = params
        return meta


def worker_to_loop(deliver: Callable[[str], None]) -> Callable[[str], None]:
    """`deliver` (which runs on the event loop) for a worker thread's pieces of text.

    One wake-up of the loop takes every piece queued so far: a piece finding a wake-up already
    on its way is only queued, so a loop that lags behind the generator catches up in one
    turn instead of one turn per piece, and no piece waits for anything but the loop.

    A `deliver` with a `from_worker` method of its own takes the pieces on the worker's thread
    itself (api/stream_pieces.py: a stream that writes them to its socket from there)."""
    own: Callable[[str], None] | None = getattr(deliver, "from_worker", None)
    if own is not None:
        return own
    loop = asyncio.get_running_loop()
    pending: collections.deque[str] = collections.deque()
    scheduled = [False]

    def drain() -> None:
        scheduled[0] = False  # first: a piece queued from now on schedules another turn
        while pending:
            deliver(pending.popleft())

    def from_worker(text: str) -> None:
        pending.append(text)
        if not scheduled[0]:
            scheduled[0] = True
            loop.call_soon_threadsafe(drain)

    return from_worker


def _trace_run(model: LoadedModel, timing: Timing) -> None:
    """The `queue` and `compute` spans of a traced request (nothing for one that is not)."""
    if tracing.current.get() is None:
        return
    attributes = {"appliance.model.name": model.name, "appliance.model.version": model.version}
    started = timing.start + timing.queue_s
    if not timing.inline:
        tracing.record("queue", timing.start, started, attributes)
    tracing.record(
        "compute",
        started,
        started + timing.compute_s,
        {**attributes, "appliance.batch_size": timing.batch, "appliance.inline": timing.inline},
    )
