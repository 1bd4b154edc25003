"""The pipelines a server serves: declared in the config or stored like a model.

To the layers above, a pipeline looks like a model: `model()` gives a LoadedModel whose
backend is "pipeline" and whose signature is the pipeline's own inputs and outputs, so
metadata, readiness, the repository index and the MQTT raw payloads treat it as one. Whether
it is ready is worked out from the engine when asked: it waits for its models (503 naming the
one it waits for) and becomes ready when they are; it is bound again (checked against the
models' signatures) whenever one of its models switches version.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson

from ..codec import InferRequest, InferResponse
from ..config import Config, ModelConfig, PipelineConfig
from ..engine import Engine, LoadedModel, ModelSource
from ..errors import (
    ApplianceError,
    ConfigError,
    InferenceFailed,
    InvalidInput,
    ModelError,
    NotFound,
    NotReady,
)
from ..llm import Cancelled, EmbeddingResult, Emit, Generation, GenerationResult
from ..manifest import Manifest, sha256_file
from ..metrics import Metrics
from ..registry import PIPELINE, PIPELINE_FILE, Registry
from ..tensors import Signature, TensorSpec

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .declaration import Declaration
    from .executor import Plan, Stats

log = logging.getLogger("appliance.pipelines")

#: The manifest `backend` of a stored pipeline (the engine does not load these), and the file
#: a stored pipeline version keeps its declaration in.
BACKEND, FILE_NAME = PIPELINE, PIPELINE_FILE


def read_declaration(path: Path, name: str, max_nodes: int = 64) -> Declaration:
    """Read and check a declaration file (ModelError naming the file, the node and the key)."""
    from .declaration import parse  # a server that serves no pipeline never imports it

    try:
        doc = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"pipeline {name!r}: cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ModelError(f"pipeline {name!r}: {path} is not valid JSON: {exc}") from None
    return parse(doc, name, max_nodes)


def _new_stats() -> Stats:
    """A new entry's counters. executor.py (and declaration.py, which it imports) are imported
    with the first pipeline, not with this module: ~0.4 MiB a device serving none never holds."""
    from .executor import Stats

    return Stats()


@dataclass
class Entry:
    """One served pipeline: its declaration, settings, state and the model it shows as."""

    name: str
    config: PipelineConfig
    facade: LoadedModel
    decl: Declaration | None
    stats: Stats = field(default_factory=_new_stats)
    plan: Plan | None = None
    #: The engine's models the plan was bound to: (name, version, object id) per model.
    key: tuple[tuple[str, str, int], ...] | None = None
    #: The models its nodes call, and the loaded versions the plan was bound to.
    models: list[tuple[str, str | None]] = field(default_factory=list)
    using: list[tuple[str, LoadedModel]] = field(default_factory=list)
    #: The model of the plan's first node when it is a plain model node with no version pin:
    #: current whenever `using` is (`_current`), so a run need not look it up again.
    first: LoadedModel | None = None

    def __post_init__(self) -> None:
        if self.decl is not None:
            self.models = self.decl.models()

    @property
    def version(self) -> str:
        return self.facade.version


class Pipelines:
    #: executor.execute, bound when the first pipeline is added (an entry exists only then).
    _execute: Callable[..., Awaitable[InferResponse]]

    def __init__(self, engine: Engine, config: Config, metrics: Metrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        #: By name; the router tests membership on this dict directly (the hot path).
        self.entries: dict[str, Entry] = {}
        for name, table in config.pipelines.items():
            settings = config.pipeline_config(name)
            if not settings.file:
                if table:
                    log.debug("pipelines.%s: settings for a stored pipeline", name)
                continue
            path = Path(settings.file)
            try:
                decl = read_declaration(path, name, settings.max_nodes)
            except ModelError as exc:
                raise ConfigError(
                    f"pipelines.{name}.file = {settings.file!r}: {exc.message}"
                ) from None
            digest, size = sha256_file(path)
            manifest = Manifest(
                name=name, version="1", backend=BACKEND, file=path.name, sha256=digest,
                size=size, signature=Signature(decl.inputs, ()),
                created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                source=str(path.resolve()),
            )  # fmt: skip
            self._add(ModelSource(manifest, path, verify=False), settings, decl)
        metrics.collectors.append(self._collect)

    # -- sources -----------------------------------------------------------------------------
    def add(self, source: ModelSource) -> None:
        """A stored pipeline version (manifest backend "pipeline"); a broken one is served as
        failed, with the reason, like a model that does not load."""
        name = source.manifest.name
        settings = self.config.pipeline_config(name)
        decl = None
        reason = None
        try:
            if source.verify:
                from ..manifest import verify_file

                verify_file(source.path, source.manifest)
            decl = read_declaration(source.path, name, settings.max_nodes)
        except ApplianceError as exc:
            reason = exc.message
            log.error("pipeline %s version %s: %s", name, source.manifest.version, reason)
        entry = self._add(source, settings, decl)
        if reason is not None:
            entry.facade.status, entry.facade.reason = "failed", reason

    def activate(self, source: ModelSource) -> LoadedModel:
        """Serve a stored version in place of the one serving, with no gap: the new
        declaration is read and checked first (the old version serves on if it fails); the
        switch is one assignment, so a request runs wholly on one version."""
        name = source.manifest.name
        if source.verify:
            from ..manifest import verify_file

            verify_file(source.path, source.manifest)
        settings = self.config.pipeline_config(name)
        decl = read_declaration(source.path, name, settings.max_nodes)
        old = self.entries.pop(name, None)
        try:
            entry = self._add(source, settings, decl)
        except BaseException:
            if old is not None:
                self.entries[name] = old
            raise
        if old is not None:
            entry.stats = old.stats  # the counters of a name go on across versions
        self._refresh(entry)
        log.info("pipeline %s now served by version %s", name, entry.version)
        return entry.facade

    async def activate_checked(
        self, source: ModelSource, check: Check | None = None
    ) -> LoadedModel:
        """Serve a stored version only once it is known to work (the hub's rollouts): read,
        bound to the models serving now (strict: a model it names must serve, with the
        signatures it wires), then `check` runs on it (acceptance inputs through `run`) while
        the old version still serves; the switch is one assignment. Any failure leaves the old
        version serving and raises (ModelError for a declaration that does not bind)."""
        name = source.manifest.name
        if self.engine.model_or_none(name) is not None:
            raise ModelError(f"pipeline {name!r}: a model is also called {name!r}")
        if source.verify:
            from ..manifest import verify_file

            verify_file(source.path, source.manifest)
        settings = self.config.pipeline_config(name)
        decl = read_declaration(source.path, name, settings.max_nodes)
        facade = LoadedModel(source, ModelConfig(timeout_s=settings.timeout_s), status="loading")
        entry = Entry(name, settings, facade, decl)
        self._bind_executor()  # its check runs it before it serves
        if self._refresh(entry) is None:
            raise ModelError(
                f"pipeline {name!r} version {source.manifest.version}: {facade.reason}"
            )
        if check is not None:
            await check(facade, lambda request: self._run(entry, request))
        old = self.entries.get(name)
        if old is not None:
            entry.stats = old.stats  # the counters of a name go on across versions
        self.entries[name] = entry
        log.info("pipeline %s now served by version %s", name, entry.version)
        return facade

    def outcomes(self, name: str) -> dict[str, int]:
        """The request counters of pipeline `name` by outcome (across its versions)."""
        return dict(self._entry(name, None).stats.outcomes)

    def reload_store(self, registry: Registry) -> list[str]:
        """Serve the store's active version of every stored pipeline whose version changed."""
        changed = []
        for name in registry.names():
            try:
                mv = registry.active(name)
            except ApplianceError:
                continue
            if mv.manifest.backend != BACKEND:
                continue
            serving = self.entries.get(name)
            if serving is not None and serving.version == mv.manifest.version:
                continue
            try:
                self.activate(ModelSource(mv.manifest, mv.file))
            except ApplianceError as exc:
                log.error("reload: pipeline %s version %s: %s", name, mv.manifest.version,
                          exc.message)  # fmt: skip
                continue
            changed.append(f"{name}/{mv.manifest.version}")
        return changed

    def _add(
        self, source: ModelSource, settings: PipelineConfig, decl: Declaration | None
    ) -> Entry:
        name = source.manifest.name
        if name in self.entries:
            raise ConfigError(f"pipelines.{name}: a pipeline of this name is declared twice")
        facade = LoadedModel(source, ModelConfig(timeout_s=settings.timeout_s), status="loading")
        entry = Entry(name, settings, facade, decl)
        self.entries[name] = entry
        self._bind_executor()
        return entry

    def _bind_executor(self) -> None:
        """executor.execute, imported with the first pipeline (see _new_stats), whichever way
        it comes: the config (`_add`) or a hub rollout (`activate_checked`)."""
        from .executor import execute

        self._execute = execute

    # -- lookups -----------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def models(self) -> list[LoadedModel]:
        """Every pipeline as a model, its state brought up to date."""
        for entry in self.entries.values():
            self._refresh(entry)
        return [e.facade for e in self.entries.values()]

    def _entry(self, name: str, version: str | None) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"unknown model {name!r}")
        if version is not None and version != entry.version:
            raise NotFound(
                f"pipeline {name!r} has no version {version!r} loaded (serving version "
                f"{entry.version!r})"
            )
        return entry

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The pipeline as a model, in whatever state (metadata, readiness)."""
        entry = self._entry(name, version)
        self._refresh(entry)
        return entry.facade

    def ready(self, name: str, version: str | None = None) -> LoadedModel:
        entry = self._entry(name, version)
        self._ready(entry)
        return entry.facade

    def _current(self, entry: Entry) -> bool:
        """Whether the models the plan was bound to still serve, all ready (the hot path)."""
        models = self.engine.model_or_none
        for name, bound_to in entry.using:
            if models(name) is not bound_to or bound_to.status != "ready":
                return False
        return True

    def _ready(self, entry: Entry) -> Plan:
        plan = self._refresh(entry)
        if plan is None:
            facade = entry.facade
            why = f": {facade.reason}" if facade.reason else ""
            raise NotReady(
                f"pipeline {entry.name!r} version {entry.version} is {facade.status}{why}"
            )
        return plan

    def _refresh(self, entry: Entry) -> Plan | None:
        """Bind the pipeline to the models serving now, if they changed; None if not ready."""
        decl = entry.decl
        facade = entry.facade
        if decl is None:
            return None  # a declaration that does not parse stays failed
        engine = self.engine
        if entry.plan is not None and self._current(entry):
            return entry.plan
        key = []
        waiting = []
        for model_name, pin in entry.models:
            try:
                m = engine.model(model_name)
            except NotFound:
                if engine.loaded:
                    facade.status, facade.reason = "failed", f"model {model_name!r} is not served"
                else:
                    facade.status, facade.reason = "loading", f"waiting for model {model_name!r}"
                entry.plan = None
                return None
            if m.status != "ready" or (pin is not None and m.version != pin):
                state = m.status if m.status != "ready" else f"serving version {m.version}"
                waiting.append(f"model {model_name!r}" + (f" version {pin}" if pin else "")
                               + f" ({state})")  # fmt: skip
            key.append((model_name, m.version, id(m)))
        if waiting:
            facade.status, facade.reason = "loading", "waiting for " + ", ".join(waiting)
            entry.plan = None
            return None
        frozen = tuple(key)
        if entry.key == frozen and (entry.plan is not None or facade.status == "failed"):
            return entry.plan  # bound (or refused) against these very models already
        from .declaration import bind
        from .executor import Plan

        try:
            bound = bind(decl, self._lookup, strict=True)
        except ApplianceError as exc:
            facade.status, facade.reason = "failed", exc.message
            entry.plan, entry.key = None, frozen
            log.error("%s", exc.message)
            return None
        entry.plan = Plan(bound, lambda node: self.metrics.for_step(entry.name, node))
        entry.key = frozen
        entry.using = [(name, engine.model(name)) for name, _ in entry.models]
        chain = entry.plan.chain
        head = chain[0][1] if chain else None
        entry.first = (
            dict(entry.using).get(head.model) if head is not None and head.version is None else None
        )
        if entry.first is None or entry.first.chain is not None:
            # its own steps see the inputs before its checks do: the pipeline checks them
            entry.plan.first_checks = False
        facade.source = replace(
            facade.source, manifest=replace(facade.source.manifest, signature=bound.signature)
        )
        if facade.status != "ready":
            log.info(
                "pipeline %s version %s ready (%s)", entry.name, entry.version,
                ", ".join(f"{m} {v}" for m, v in bound.versions),
            )  # fmt: skip
        facade.status, facade.reason = "ready", None
        return entry.plan

    def _lookup(self, name: str, pin: str | None) -> tuple[str, Signature] | None:
        try:
            m = self.engine.ready_model(name, pin)
        except ApplianceError:
            return None
        sig = m.signature
        image = m.chain.image if m.chain is not None else None
        if image is not None:  # the model decodes pictures itself: its image input takes BYTES
            inputs = tuple(
                TensorSpec(t.name, "BYTES", (-1,)) if t.name == image.input else t
                for t in sig.inputs
            )
            sig = Signature(inputs, sig.outputs)
        return m.version, sig

    # -- requests ----------------------------------------------------------------------------
    def infer(
        self, name: str, version: str | None, request: InferRequest
    ) -> Awaitable[InferResponse]:
        """Run `request` on pipeline `name` (the run's coroutine itself: no frame of its own
        on the hot path)."""
        entry = self.entries.get(name)
        if entry is None or version is not None:
            entry = self._entry(name, version)
        return self._run(entry, request)

    def _run(self, entry: Entry, request: InferRequest) -> Awaitable[InferResponse]:
        """The run's coroutine (executor.execute: it accounts for the request); what fails
        before it starts is counted here."""
        t0 = time.perf_counter()
        try:
            plan = entry.plan
            if plan is None or not self._current(entry):
                plan = self._ready(entry)
        except ApplianceError as exc:
            outcomes = entry.stats.outcomes
            from .executor import OUTCOME

            outcome = OUTCOME.get(exc.status, "error")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            raise
        limit = entry.config.timeout_s
        if request.timeout_s is not None and request.timeout_s < limit:
            limit = request.timeout_s
        return self._execute(
            plan, self.engine, request, t0 + limit,
            entry.config.max_fan_out, entry.stats, entry.name, entry.version, entry.first,
        )  # fmt: skip

    # -- the OpenAI routes --------------------------------------------------------------------
    def embedder(self, name: str) -> tuple[LoadedModel, Embedder]:
        """A pipeline usable as an embedding model: one BYTES input (the texts, one per row)
        and an FP32 output of shape [N, D] (the first such is the embedding)."""
        facade = self.ready(name)
        sig = facade.signature
        vectors = [t for t in sig.outputs if t.datatype in ("FP32", "FP16") and len(t.shape) == 2]
        if not _is_embedding(sig):
            raise InvalidInput(
                f"pipeline {name!r} is not an embedding pipeline: that takes one BYTES input "
                "(the texts) and gives an FP32 output of shape [N, D]"
            )
        return facade, Embedder(self, name, sig.inputs[0], vectors[0].name)

    def generator(self, name: str) -> tuple[LoadedModel, Generator]:
        """A pipeline usable as a text model on /v1/completions and /v1/chat/completions:
        one BYTES input (the prompt) and one BYTES output (the answer)."""
        facade = self.ready(name)
        sig = facade.signature
        if not _is_text(sig):
            raise InvalidInput(
                f"pipeline {name!r} is not a text pipeline: that takes one BYTES input (the "
                "prompt) and gives one BYTES output (the text)"
            )
        return facade, Generator(self, name, sig.inputs[0], sig.outputs[0].name)

    def text_models(self) -> list[LoadedModel]:
        """The ready pipelines the OpenAI routes serve: text ones and embedding ones."""
        out = []
        for facade in self.models():
            if facade.status != "ready":
                continue
            sig = facade.signature
            if _is_text(sig) or _is_embedding(sig):
                out.append(facade)
        return out

    # -- metadata ----------------------------------------------------------------------------
    def describe(self, name: str, version: str | None = None) -> dict[str, Any]:
        """KServe v2 model metadata of a pipeline: its own inputs and outputs, platform
        "pipeline", and its nodes in `parameters`."""
        entry = self._entry(name, version)
        self._refresh(entry)
        facade = entry.facade
        sig = facade.signature
        params: dict[str, Any] = {"status": facade.status, "sha256": facade.source.manifest.sha256}
        if facade.reason:
            params["reason"] = facade.reason
        if entry.decl is not None:
            params["nodes"] = [_describe_node(entry, n) for n in entry.decl.nodes]
            if entry.decl.templates:
                params["templates"] = sorted(entry.decl.templates)
        params["max_fan_out"] = entry.config.max_fan_out
        return {
            "name": name,
            "versions": [entry.version],
            "platform": BACKEND,
            "inputs": [t.to_json() for t in sig.inputs],
            "outputs": [t.to_json() for t in sig.outputs],
            "parameters": params,
        }

    def _collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        requests = CounterMetricFamily(
            "appliance_pipeline_requests", "Requests to a pipeline by outcome",
            labels=["pipeline", "version", "outcome"],
        )  # fmt: skip
        optional = CounterMetricFamily(
            "appliance_pipeline_optional_failures",
            "Failures of an optional node (its outputs were left out, the request went on)",
            labels=["pipeline", "node"],
        )
        for entry in self.entries.values():
            for outcome, n in entry.stats.outcomes.items():
                requests.add_metric([entry.name, entry.version, outcome], n)
            for node, n in entry.stats.optional_failed.items():
                optional.add_metric([entry.name, node], n)
        yield requests
        yield optional


class Embedder:
    """A pipeline seen as an embedding model (appliance.llm.TextModel): `embed_async` on the
    event loop; `embed` from another thread, through the loop."""

    mode: Literal["chat", "embedding"] = "embedding"

    def __init__(self, pipelines: Pipelines, name: str, text: TensorSpec, output: str) -> None:
        self.pipelines = pipelines
        self.name = name
        self.text = text
        self.output = output
        self.loop = asyncio.get_running_loop()

    async def embed_async(self, texts: list[str], priority: int | None = None) -> EmbeddingResult:
        items = np.empty(len(texts), dtype=object)
        items[:] = [t.encode() for t in texts]
        shape = (len(texts),) + (1,) * (len(self.text.shape) - 1)
        request = InferRequest(
            {self.text.name: items.reshape(shape)},
            outputs={self.output: False},
            priority=priority,
            datatypes={self.text.name: "BYTES"},
        )
        response = await self.pipelines.infer(self.name, None, request)
        vectors = response.outputs.get(self.output)
        if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(texts):
            got = "nothing" if vectors is None else f"shape {list(vectors.shape)}"
            raise InferenceFailed(
                f"pipeline {self.name!r}: output {self.output!r} gave {got} for {len(texts)} texts"
            )
        # tokens are the pipeline's business: count the words, as a usage estimate
        return EmbeddingResult(vectors.astype(np.float32), sum(len(t.split()) for t in texts))

    def embed(self, texts: list[str]) -> EmbeddingResult:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            future = asyncio.run_coroutine_threadsafe(self.embed_async(texts), self.loop)
            return future.result()
        raise RuntimeError("Embedder.embed blocks: on the event loop, await embed_async")

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        raise InvalidInput(f"pipeline {self.name!r} is an embedding pipeline, not a language model")


class Generator:
    """A text pipeline (prompt -> text) seen as a language model (appliance.llm.TextModel):
    `generate_async` on the event loop. The answer comes whole: a pipeline does not stream
    tokens, so a streaming client gets it as one piece. Sampling settings do not apply."""

    mode: Literal["chat", "embedding"] = "chat"
    #: What `_sampling` checks max_tokens against: a pipeline has no context window.
    n_ctx = 1 << 20

    def __init__(self, pipelines: Pipelines, name: str, text: TensorSpec, output: str) -> None:
        self.pipelines = pipelines
        self.name = name
        self.text = text
        self.output = output

    def prompt_of(self, request: Generation) -> str:
        """The prompt: a completion's own, or a chat's last user message (a pipeline keeps
        no conversation)."""
        if request.schema is not None or request.tools:
            raise InvalidInput(
                f"pipeline {self.name!r} gives plain text: response_format and tools do not apply"
            )
        if request.kind == "completion":
            return request.prompt
        for message in reversed(request.messages):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # parts: the text ones, in order
                    return "".join(
                        str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") == "text"
                    )  # fmt: skip
                return content if isinstance(content, str) else ""
        raise InvalidInput(f"pipeline {self.name!r} needs a user message (the prompt)")

    async def generate_async(self, request: Generation) -> GenerationResult:
        prompt = self.prompt_of(request)
        items = np.empty(1, dtype=object)
        items[0] = prompt.encode()
        shape = (1,) * max(1, len(self.text.shape))
        infer = InferRequest(
            {self.text.name: items.reshape(shape)},
            outputs={self.output: False},
            priority=request.priority,
            datatypes={self.text.name: "BYTES"},
        )
        response = await self.pipelines.infer(self.name, None, infer)
        out = response.outputs.get(self.output)
        if out is None or out.size < 1:
            raise InferenceFailed(f"pipeline {self.name!r}: output {self.output!r} gave no text")
        first = out.reshape(-1)[0]
        text = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
        # tokens are the pipeline's business: count the words, as a usage estimate
        return GenerationResult(text, "stop", len(prompt.split()), len(text.split()))

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        raise RuntimeError("Generator.generate blocks: on the event loop, await generate_async")

    def embed(self, texts: list[str]) -> EmbeddingResult:
        raise InvalidInput(f"pipeline {self.name!r} is a text pipeline, not an embedding model")


#: A check run on a pipeline version before it serves: (the version as a model, a function
#: that runs a request on it).
Check = Callable[[LoadedModel, Callable[[InferRequest], Awaitable[InferResponse]]], Awaitable[None]]


def _is_text(sig: Signature) -> bool:
    return (
        len(sig.inputs) == 1 and sig.inputs[0].datatype == "BYTES"
        and len(sig.outputs) == 1 and sig.outputs[0].datatype == "BYTES"
    )  # fmt: skip


def _is_embedding(sig: Signature) -> bool:
    return (
        len(sig.inputs) == 1 and sig.inputs[0].datatype == "BYTES"
        and any(t.datatype in ("FP32", "FP16") and len(t.shape) == 2 for t in sig.outputs)
    )  # fmt: skip


def _describe_node(entry: Entry, name: str) -> dict[str, Any]:
    assert entry.decl is not None
    node = entry.decl.nodes[name]
    out: dict[str, Any] = {"name": name}
    if node.model is not None:
        out["model"] = node.model
        if node.version is not None:
            out["version"] = node.version
    else:
        bound = entry.plan.bound.nodes.get(name) if entry.plan is not None else None
        step = bound.step if bound is not None else None
        out["step"] = step.describe() if step is not None else {"type": node.step_type}
    out["inputs"] = {k: [str(r) for r in v] if len(v) > 1 else str(v[0])
                     for k, v in node.inputs.items()}  # fmt: skip
    for key in ("fan_out", "optional"):
        if getattr(node, key):
            out[key] = True
    if node.gather is not None:
        out["gather"] = node.gather
    if node.when is not None:
        out["when"] = {"source": [str(r) for r in node.when.source], "op": node.when.op,
                       "value": node.when.value}  # fmt: skip
    return out
