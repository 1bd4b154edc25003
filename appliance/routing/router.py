"""Tasks and the guards around a model: which model answers a request, and what happens when it
fails.

A task ([tasks.NAME] in the config) is an operator-facing name, such as `defect-detect`, that
clients address wherever they would address a model. Each request to it goes to one of its
variants, drawn by weight (A/B tests, canaries), or, with `sticky_key`, by a hash of the
request's key so that one device always meets the same variant. Variants name models, resolved
by name at request time, so a task follows a model through its version switches; a variant's
`version` pin answers only while that version serves. When the variant fails (after its
retries), is not ready, or its circuit breaker is open, the task's `fallback` model answers.

Per model, whether reached through a task or directly: the result cache (cache.py), the
circuit breaker (breaker.py) and bounded retries with backoff. Inference has no side effects,
so running a request again is safe; it is done only for transient faults (a full queue, the
runtime raising), never for a client's mistake (4xx), a model that is not ready, or a request
whose deadline has passed (504), and never past the request's deadline. A streamed generation
is retried, or handed to the fallback, only while none of its text has been sent.

The router is the single entry below the fronts (through request.py): every request to a model
or a task goes through it, and it calls down into the engine (the loaded models) only. A model
with none of the guards configured goes straight to its engine runner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import string
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..codec import InferRequest, InferResponse
from ..config import Config, ModelConfig, TaskConfig, template_fields
from ..engine import Engine, LoadedModel, ModelSource
from ..errors import (
    ApplianceError,
    ConfigError,
    InferenceFailed,
    InvalidInput,
    NotFound,
    NotReady,
    OutputInvalid,
    Overloaded,
)
from ..llm import EmbeddingResult, Generation, GenerationResult, TextModel
from ..metrics import Metrics
from ..pipelines import Pipelines
from . import cache as rc
from .breaker import STATE_VALUE, Breaker, CircuitOpen, verdict

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("appliance.routing")
T = TypeVar("T")


def guarded(config: ModelConfig) -> bool:
    """Whether requests to a model go through the router (cache, retries or a breaker)."""
    return bool(config.cache_bytes or config.retries or config.breaker.enabled)


def header_name(key: str) -> str:
    """The HTTP header that carries a sticky key: device_id -> X-Device-Id."""
    return "X-" + "-".join(part.capitalize() for part in key.split("_"))


@dataclass
class Served:
    """Who answered a request: filled in by the router, reported by every protocol."""

    model: str = ""
    version: str = ""
    task: str | None = None
    fallback: bool = False
    cached: bool = False

    def headers(self) -> dict[str, str]:
        out = {"X-Model-Name": self.model, "X-Model-Version": self.version}
        if self.task is not None:
            out["X-Task"] = self.task
            out["X-Fallback"] = "true" if self.fallback else "false"
        if self.cached:
            out["X-Cache"] = "hit"
        return out

    def parameters(self) -> dict[str, Any] | None:
        """The KServe response's `parameters` (None when there is nothing beyond the model)."""
        out: dict[str, Any] = {}
        if self.task is not None:
            out["task"] = self.task
            out["fallback"] = self.fallback
        if self.cached:
            out["cached"] = True
        return out or None


class Task:
    def __init__(self, name: str, config: TaskConfig) -> None:
        self.name = name
        self.config = config
        self.fields = template_fields(config.prompt_template)
        total = sum(v.weight for v in config.variants)
        bounds, acc = [], 0.0
        for v in config.variants:
            acc += v.weight
            bounds.append(acc / total)
        self._bounds = bounds
        self._salt = name.encode() + b"\0"

    def pick(self, key: str | None, draw: Callable[[], float]) -> int:
        """The index of the variant for this request: by weight, the same one for the same key."""
        if key is not None:
            digest = hashlib.blake2b(self._salt + key.encode(), digest_size=8).digest()
            u = int.from_bytes(digest, "big") / 2**64
        else:
            u = draw()
        return min(bisect_right(self._bounds, u), len(self._bounds) - 1)

    def candidates(self) -> list[tuple[str, str | None]]:
        out = [(v.model, v.version or None) for v in self.config.variants]
        if self.config.fallback:
            out.append((self.config.fallback, None))
        return out

    def render(self, fields: Any) -> str:
        """The prompt template with the request's fields filled in; every field is required."""
        if not isinstance(fields, Mapping):
            raise InvalidInput(
                f"task {self.name!r} fills a prompt template: send 'fields' as an object with "
                f"{', '.join(self.fields) or 'no fields'}"
            )
        missing = [f for f in self.fields if f not in fields]
        extra = sorted(set(fields) - set(self.fields))
        if missing or extra:
            what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"
            raise InvalidInput(
                f"task {self.name!r}: 'fields' {what} (the template takes "
                f"{', '.join(self.fields) or 'no fields'})"
            )
        for k, v in fields.items():
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise InvalidInput(f"task {self.name!r}: field {k!r} must be a string or number")
        # str.format would also reach attributes ({x.__class__}); the fields were checked to be
        # plain names, but substitute by hand all the same.
        parts = []
        for literal, name, _spec, _conv in string.Formatter().parse(self.config.prompt_template):
            parts.append(literal)
            if name is not None:
                parts.append(str(fields[name]))
        return "".join(parts)


def _fallback_reason(exc: ApplianceError) -> str | None:
    """Why the fallback answers, or None when it must not (the client's mistake, a timeout)."""
    if isinstance(exc, CircuitOpen):
        return "breaker_open"
    if isinstance(exc, (NotReady, NotFound)):
        return "not_ready"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, OutputInvalid):
        return "invalid_output" if exc.fallback else None
    if exc.status == 500:
        return "error"
    return None


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (Overloaded, InferenceFailed))


class Router:
    def __init__(self, engine: Engine, config: Config, metrics: Metrics) -> None:
        self.engine = engine
        self.tasks = {name: Task(name, config.task_config(name)) for name in config.tasks}
        #: Pipelines declared in the config; the server adds stored ones (`pipelines.add`).
        self.pipelines = Pipelines(engine, config, metrics)
        self._pipelines = self.pipelines.entries
        #: Injectable for tests: the breakers' clock, and the draw of a variant.
        self.clock: Callable[[], float] = time.monotonic
        self.draw: Callable[[], float] = random.random
        #: Request parameters that do not change an answer (not part of a cache key).
        self._ignored = frozenset(t.config.sticky_key for t in self.tasks.values()) | {
            "priority",
            "timeout",
        }
        self._breakers: dict[str, Breaker] = {}
        self._caches: dict[str, rc.ResultCache] = {}
        self.check_names([m.name for m in engine.models()])
        self.retries: dict[str, int] = {}
        #: (task, model, version, route, outcome) -> requests.
        self.routed: dict[tuple[str, str, str, str, str], int] = {}
        #: (task, model that failed, reason) -> requests the fallback answered.
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        metrics.collectors.append(self._collect)

    def _now(self) -> float:
        return self.clock()

    # -- names -----------------------------------------------------------------------------
    def check_names(self, models: list[str]) -> None:
        """A task may not share a model's name, nor route to another task."""
        for name in models:
            if name in self.tasks:
                raise ConfigError(f"tasks.{name}: a model is also called {name!r}; rename the task")
            if name in self.pipelines:
                raise ConfigError(
                    f"pipelines.{name}: a model is also called {name!r}; rename the pipeline"
                )
        for name in self.pipelines.names():
            if name in self.tasks:
                raise ConfigError(f"tasks.{name}: a pipeline is also called {name!r}")
        for task in self.tasks.values():
            for model, _ in task.candidates():
                if model in self.tasks:
                    raise ConfigError(
                        f"tasks.{task.name}: {model!r} is a task; variants and the fallback "
                        "must name models"
                    )

    def key_for(
        self, name: str, parameters: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> str | None:
        """The sticky key of a request to task `name`: a parameter, else an X- header (HTTP),
        else a user property of that name (MQTT 5)."""
        task = self.tasks.get(name)
        if task is None or not task.config.sticky_key:
            return None
        key = task.config.sticky_key
        value = parameters.get(key)
        if value is None and headers is not None:
            value = headers.get(header_name(key), headers.get(key))
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidInput(f"parameter {key!r} (the task's sticky key) must be a string")
        return str(value)

    def is_task(self, name: str) -> bool:
        return name in self.tasks

    def is_pipeline(self, name: str) -> bool:
        return name in self.pipelines

    def add_pipeline(self, source: ModelSource) -> None:
        """Serve a stored pipeline version (manifest backend "pipeline")."""
        name = source.manifest.name
        if name in self.tasks:
            raise ConfigError(f"tasks.{name}: a pipeline is also called {name!r}")
        self.pipelines.add(source)

    def models(self) -> list[LoadedModel]:
        """Every model and pipeline (as a model), for the repository index and status."""
        return self.engine.models() + self.pipelines.models()

    def describe(self, name: str, version: str | None = None) -> dict[str, Any]:
        """KServe v2 model metadata of a model, a task (the model it would use now) or a
        pipeline (its own inputs and outputs, platform "pipeline", its nodes)."""
        if name in self.pipelines:
            return self.pipelines.describe(name, version)
        meta = self.engine.describe(self.model_of(name, version))
        if name in self.tasks:  # a task: the signature of the first ready model it uses
            meta["name"] = name
            meta["parameters"]["task"] = self.task_parameters(name)
        return meta

    def task_parameters(self, name: str) -> dict[str, Any]:
        """What model metadata says of a task: its variants, fallback and sticky key."""
        task = self.tasks[name].config
        return {
            "variants": [dataclasses.asdict(v) for v in task.variants],
            "fallback": task.fallback,
            "sticky_key": task.sticky_key,
        }

    def default_priority(self, name: str) -> int | None:
        """The priority level of a request to `name` that names none (a task's setting)."""
        task = self.tasks.get(name)
        if task is None or not task.config.priority:
            return None
        return task.config.priority

    def resolve(
        self, name: str, version: str | None = None, mode: str | None = None
    ) -> LoadedModel:
        """The ready model a request to `name` would go to: the model itself, or for a task the
        first of its models that is ready (for `mode`: "chat" or "embedding" text models);
        NotFound/NotReady otherwise."""
        task = self.tasks.get(name)
        if task is None:
            if name in self._pipelines:
                if mode is not None:
                    raise InvalidInput(f"{name!r} is a pipeline, not a text model")
                return self.pipelines.ready(name, version)
            if mode is None:
                return self.engine.ready_model(name, version)
            return self.engine.text_model(name, mode)[0]
        if version is not None:
            raise NotFound(f"{name!r} is a task, not a model: it has no versions")
        first: ApplianceError | None = None
        for model_name, pin in task.candidates():
            try:
                if mode is None:
                    return self.engine.ready_model(model_name, pin)
                return self.engine.text_model(model_name, mode)[0]
            except ApplianceError as exc:
                first = first or exc
        assert first is not None
        raise first

    def model_of(self, name: str, version: str | None = None) -> LoadedModel:
        """For metadata and readiness: the model `name` (in whatever state), or the model a
        task would use now."""
        if name in self.tasks:
            return self.resolve(name, version)
        if name in self.pipelines:
            return self.pipelines.model(name, version)
        return self.engine.model(name, version)

    def text_model(self, name: str, mode: str) -> tuple[LoadedModel, TextModel]:
        """The ready language ("chat") or embedding model `name`, or a task's first one; a
        pipeline that takes texts and gives vectors serves as an embedding model."""
        if name in self.pipelines and name not in self.tasks:
            if mode != "embedding":
                return self.pipelines.generator(name)
            return self.pipelines.embedder(name)
        model = self.resolve(name, None, mode)
        assert isinstance(model.backend, TextModel)
        return model, model.backend

    def admit(
        self, name: str, version: str | None = None, priority: int | None = None
    ) -> LoadedModel:
        """The model a request to `name` goes to (404/503 if none), refused with 503 at once
        when its queue is full, before a body is read or decoded: under overload, refusals
        must stay cheap for the event loop. Not for tasks (a full queue sends them to their
        fallback) nor for models that retry a full queue. `priority`: the request's, when
        known before its body; None (not known yet) refuses only what the highest level
        would be refused (its body may ask for that level)."""
        model = self.resolve(name, version)
        if name not in self.tasks and not model.config.retries:
            self.engine.check_capacity(model, 1 if priority is None else priority)
        return model

    # -- the guards of one model -----------------------------------------------------------
    def _breaker(self, model: LoadedModel) -> Breaker:
        b = self._breakers.get(model.name)
        if b is None:
            b = self._breakers[model.name] = Breaker(model.name, model.config.breaker, self._now)
        if b.version != model.version:
            b.reset(model.version)
        return b

    def _cache(self, model: LoadedModel) -> rc.ResultCache:
        c = self._caches.get(model.name)
        if c is None:
            c = self._caches[model.name] = rc.ResultCache(model.name, model.config.cache_bytes)
        return c.for_version(model.version)

    async def _guard(
        self,
        name: str,
        version: str | None,
        mode: str | None,
        run: Callable[[LoadedModel, float], Awaitable[T]],
        key_of: Callable[[LoadedModel], str | None],
        size_of: Callable[[T], int | None],
        on_hit: Callable[[LoadedModel, T], T],
        served: Served,
        resumable: Callable[[], bool],
        timeout_s: float | None = None,
    ) -> T:
        """Run on model `name`: from the cache, else through its breaker, with retries."""
        engine = self.engine
        deadline: float | None = None
        attempt = 0
        while True:
            if mode is None:
                model = engine.ready_model(name, version)
            else:
                model, _ = engine.text_model(name, mode)
                if version is not None and model.version != version:
                    raise NotFound(
                        f"model {name!r} has no version {version!r} loaded (serving version "
                        f"{model.version!r})"
                    )
            served.model, served.version = model.name, model.version
            cfg = model.config
            if deadline is None:
                limit = cfg.timeout_s if timeout_s is None else min(timeout_s, cfg.timeout_s)
                deadline = time.monotonic() + limit
            cache = key = None
            if cfg.cache_bytes:
                key = key_of(model)
                if key is not None:
                    cache = self._cache(model)
                    hit = cache.get(key)
                    if hit is not None:
                        served.cached = True
                        return on_hit(model, hit)
            breaker = self._breaker(model) if cfg.breaker.enabled else None
            probe = breaker.admit() if breaker is not None else False
            try:
                result = await run(model, deadline - time.monotonic())
            except Exception as exc:
                if breaker is not None and breaker.version == model.version:
                    breaker.record(probe, verdict(exc))
                if attempt < cfg.retries and _transient(exc) and resumable():
                    delay = min(cfg.retry_backoff_max_s, cfg.retry_backoff_s * 2**attempt)
                    delay *= 0.5 + 0.5 * random.random()  # noqa: S311 - jitter, not a secret
                    if time.monotonic() + delay < deadline:
                        attempt += 1
                        self.retries[model.name] = self.retries.get(model.name, 0) + 1
                        await asyncio.sleep(delay)
                        continue
                raise
            except BaseException:  # cancelled: says nothing about the model
                if breaker is not None and breaker.version == model.version:
                    breaker.record(probe, None)
                raise
            # A version switch while this ran reset the breaker and emptied the cache for the
            # new version: this old version's outcome and answer belong to neither.
            if breaker is not None and breaker.version == model.version:
                breaker.record(probe, True)
            if cache is not None and key is not None and cache.version == model.version:
                size = size_of(result)
                if size is not None:
                    cache.put(key, result, size)
            return result

    async def _dispatch(
        self,
        name: str,
        version: str | None,
        key: str | None,
        attempt: Callable[[str, str | None], Awaitable[T]],
        served: Served,
        resumable: Callable[[], bool],
    ) -> T:
        """A model name runs on that model; a task name is routed to one of its variants."""
        task = self.tasks.get(name)
        if task is None:
            return await attempt(name, version)
        if version is not None:
            raise NotFound(f"{name!r} is a task, not a model: it has no versions")
        return await self._route(task, key, attempt, served, resumable)

    async def _route(
        self,
        task: Task,
        key: str | None,
        attempt: Callable[[str, str | None], Awaitable[T]],
        served: Served,
        resumable: Callable[[], bool],
    ) -> T:
        """Run on the variant drawn for this request, else on the fallback."""
        variant = task.config.variants[task.pick(key, self.draw)]
        served.task = task.name
        try:
            result = await attempt(variant.model, variant.version or None)
        except ApplianceError as exc:
            self._count(task.name, variant.model, served.version, "variant", "error")
            reason = _fallback_reason(exc)
            fallback = task.config.fallback
            if not fallback or reason is None or not resumable():
                raise
            k = (task.name, variant.model, reason)
            self.fallbacks[k] = self.fallbacks.get(k, 0) + 1
            log.warning(
                "task %s: model %s did not answer (%s); the fallback %s answers",
                task.name, variant.model, exc.message, fallback,
            )  # fmt: skip
            served.fallback, served.cached = True, False
            served.model, served.version = fallback, ""
            try:
                result = await attempt(fallback, None)
            except ApplianceError as exc2:
                self._count(task.name, fallback, served.version, "fallback", "error")
                err = ApplianceError(
                    f"task {task.name!r}: model {variant.model!r} did not answer "
                    f"({exc.message}), nor did the fallback {fallback!r} ({exc2.message})"
                )
                err.status, err.retry_after = exc2.status, exc2.retry_after
                raise err from None
            self._count(task.name, served.model, served.version, "fallback", "success")
            return result
        self._count(task.name, served.model, served.version, "variant", "success")
        return result

    def _count(self, task: str, model: str, version: str, route: str, outcome: str) -> None:
        k = (task, model, version, route, outcome)
        self.routed[k] = self.routed.get(k, 0) + 1

    # -- requests --------------------------------------------------------------------------
    def infer(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        key: str | None = None,
        check: Callable[[InferResponse, LoadedModel], None] | None = None,
    ) -> Awaitable[InferResponse]:
        """Run `request` on model, task or pipeline `name`; `key` is a task's sticky key, if
        any; `check` vets each model's answer (OutputInvalid with `fallback`: the fallback
        answers; a pipeline's answer is checked as a whole).

        A plain model (no task, cache, retries, breaker or check) is the engine's run itself,
        with no coroutine of the router's around it: the hot path of most edge requests."""
        if name not in self.tasks:
            if name in self._pipelines:
                if check is None:
                    return self.pipelines.infer(name, version, request)
                return self._checked_pipeline(name, version, request, check)
            if check is None:
                model = self.engine.ready_model(name, version)
                if not guarded(model.config):
                    return self.engine.infer_on(model, request)
        return self._infer(name, version, request, key, check)

    def infer_now(
        self, name: str, version: str | None, request: InferRequest
    ) -> InferResponse | None:
        """`infer` at once, with no coroutine, for a plain model (no task, pipeline, cache,
        retries or breaker) whose engine runs the request inline (Engine.infer_now); None
        when that does not apply and nothing was done: `infer` takes it then. An unknown or
        unready model raises here as in `infer`."""
        if name in self.tasks or name in self._pipelines:
            return None
        model = self.engine.ready_model(name, version)
        if guarded(model.config):
            return None
        return self.engine.infer_now(model, request)

    async def _checked_pipeline(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        check: Callable[[InferResponse, LoadedModel], None],
    ) -> InferResponse:
        pipeline = self.pipelines.ready(name, version)
        response = await self.pipelines.infer(name, version, request)
        check(response, pipeline)
        return response

    async def _infer(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        key: str | None,
        check: Callable[[InferResponse, LoadedModel], None] | None = None,
    ) -> InferResponse:
        served = Served()

        async def run(model: LoadedModel, remaining: float) -> InferResponse:
            if remaining <= 0:
                remaining = 1e-3  # the scheduler answers 504 at once
            request.timeout_s = remaining
            response = await self.engine.infer_on(model, request)
            if check is not None:
                check(response, model)
            rc.frozen(response.outputs)
            return response

        def hit(model: LoadedModel, cached: InferResponse) -> InferResponse:
            return InferResponse(
                model.name, model.version, cached.outputs, request.id, templates=model.templates
            )

        def attempt(model: str, pin: str | None) -> Awaitable[InferResponse]:
            return self._guard(
                model, pin, None, run,
                lambda m: rc.tensor_key(m.name, m.version, request, self._ignored),
                lambda r: rc.outputs_size(r.outputs), hit, served, _always,
                request.timeout_s,
            )  # fmt: skip

        response = await self._dispatch(name, version, key, attempt, served, _always)
        params = served.parameters()
        if params is not None:  # a new object: the cache may hold the one it came from
            response = InferResponse(
                response.model_name, response.model_version, response.outputs, request.id,
                params, response.templates,
            )  # fmt: skip
        return response

    async def generate(
        self,
        name: str,
        request: Generation,
        emit: Callable[[str], None] | None = None,
        stop: Callable[[], bool] | None = None,
        key: str | None = None,
        served: Served | None = None,
        check: Callable[[GenerationResult, LoadedModel], None] | None = None,
    ) -> tuple[LoadedModel, GenerationResult]:
        """Run a chat or completion on model or task `name`; `emit` gets each piece of text on
        the event loop thread; `served` is told which model answers, before its first piece;
        `check` vets each model's answer (see `infer`)."""
        served = served if served is not None else Served()
        if name in self.pipelines and name not in self.tasks:
            # A text pipeline answers whole: a streaming client gets the text as one piece.
            model, generator = self.pipelines.generator(name)
            served.model, served.version = model.name, model.version
            result = await generator.generate_async(request)
            if check is not None:
                check(result, model)
            if emit is not None and result.text:
                emit(result.text)
            return model, result
        if name not in self.tasks:
            model, _ = self.engine.text_model(name, "chat")
            if not guarded(model.config):
                served.model, served.version = model.name, model.version
                result = await self.engine.generate_on(model, request, emit, stop)
                if check is not None:
                    check(result, model)
                return model, result
        sent = [False]
        forward = emit
        if emit is not None:
            deliver = emit

            def forward(text: str) -> None:
                sent[0] = True
                deliver(text)

        def resumable() -> bool:
            return not sent[0]

        answered: list[LoadedModel] = []

        async def run(model: LoadedModel, _remaining: float) -> GenerationResult:
            answered.append(model)
            result = await self.engine.generate_on(model, request, forward, stop)
            if check is not None:
                check(result, model)
            return result

        def hit(model: LoadedModel, cached: GenerationResult) -> GenerationResult:
            answered.append(model)
            if forward is not None and cached.text:
                forward(cached.text)
            return cached

        def attempt(model: str, pin: str | None) -> Awaitable[GenerationResult]:
            return self._guard(
                model, pin, "chat", run,
                lambda m: rc.generation_key(m.name, m.version, request),
                rc.generation_size, hit, served, resumable,
            )  # fmt: skip

        result = await self._dispatch(name, None, key, attempt, served, resumable)
        return answered[-1], result

    async def embed(
        self,
        name: str,
        texts: list[str],
        key: str | None = None,
        served: Served | None = None,
        priority: int | None = None,
    ) -> tuple[LoadedModel, EmbeddingResult]:
        served = served if served is not None else Served()
        if name in self.pipelines and name not in self.tasks:
            model, embedder = self.pipelines.embedder(name)
            served.model, served.version = model.name, model.version
            return model, await embedder.embed_async(texts, priority)
        if name not in self.tasks:
            model, _ = self.engine.text_model(name, "embedding")
            if not guarded(model.config):
                served.model, served.version = model.name, model.version
                return model, await self.engine.embed_on(model, texts, priority)
        answered: list[LoadedModel] = []

        async def run(model: LoadedModel, _remaining: float) -> EmbeddingResult:
            answered.append(model)
            return await self.engine.embed_on(model, texts, priority)

        def hit(model: LoadedModel, cached: EmbeddingResult) -> EmbeddingResult:
            answered.append(model)
            return cached

        def attempt(model: str, pin: str | None) -> Awaitable[EmbeddingResult]:
            return self._guard(
                model, pin, "embedding", run,
                lambda m: rc.embedding_key(m.name, m.version, texts),
                rc.embedding_size, hit, served, _always,
            )  # fmt: skip

        result = await self._dispatch(name, None, key, attempt, served, _always)
        return answered[-1], result

    # -- metrics ---------------------------------------------------------------------------
    def _collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        routed = CounterMetricFamily(
            "appliance_task_requests",
            "Requests to a task by the model that answered, route (variant or fallback) and "
            "outcome",
            labels=["task", "model", "version", "route", "outcome"],
        )
        for labels, n in self.routed.items():
            routed.add_metric(list(labels), n)
        yield routed
        fallbacks = CounterMetricFamily(
            "appliance_task_fallbacks",
            "Requests a task's fallback answered, by the model that did not and why",
            labels=["task", "model", "reason"],
        )
        for labels3, n in self.fallbacks.items():
            fallbacks.add_metric(list(labels3), n)
        yield fallbacks
        retries = CounterMetricFamily(
            "appliance_inference_retries", "Requests run again after a transient fault",
            labels=["model"],
        )  # fmt: skip
        for model, n in self.retries.items():
            retries.add_metric([model], n)
        yield retries
        hits = CounterMetricFamily("appliance_cache_hits", "Answers from the result cache",
                                   labels=["model"])  # fmt: skip
        misses = CounterMetricFamily(
            "appliance_cache_misses", "Cacheable requests the cache could not answer",
            labels=["model"],
        )  # fmt: skip
        size = GaugeMetricFamily(
            "appliance_cache_bytes", "Bytes held by the result cache", labels=["model"]
        )
        entries = GaugeMetricFamily(
            "appliance_cache_entries", "Answers held by the result cache", labels=["model"]
        )
        for name, c in self._caches.items():
            hits.add_metric([name], c.hits)
            misses.add_metric([name], c.misses)
            size.add_metric([name], c.bytes)
            entries.add_metric([name], len(c))
        yield from (hits, misses, size, entries)
        state = GaugeMetricFamily(
            "appliance_breaker_state",
            "Circuit breaker of a model: 0 closed, 1 open, 2 half-open",
            labels=["model"],
        )
        trips = CounterMetricFamily(
            "appliance_breaker_opened", "Times a model's circuit breaker opened", labels=["model"]
        )
        for name, b in self._breakers.items():
            state.add_metric([name], STATE_VALUE[b.state])
            trips.add_metric([name], b.trips)
        yield from (state, trips)


def _always() -> bool:
    return True
