"""Configuration: defaults < TOML file < APPLIANCE_* environment < command-line flags.

Every section is a dataclass; values are checked against the field types so that a bad file names
the key and the value instead of failing later somewhere deep in the server.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import string
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

ENV_PREFIX = "APPLIANCE_"
#: Model and task names: the model store's rule (registry.check_name), safe in URLs and topics.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Most priority levels a model may have (each is a queue its workers look at).
MAX_PRIORITY_LEVELS = 16
T = TypeVar("T")

Device = Literal["auto", "cuda", "cpu"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Bearer token required on every route but health; empty disables auth.
    auth_token: str = ""
    #: File holding the token (keeps it out of the config and the process list).
    auth_token_file: str = ""
    max_body_bytes: int = 64 * 1024 * 1024
    #: One JSON log line per request.
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Ready only when every model loaded (Triton's strict readiness).
    strict_readiness: bool = True
    shutdown_timeout_s: float = 10.0
    #: Infer and liveness answered by api/http_server.py's own protocol; false: all by aiohttp.
    fast_path: bool = True


@dataclass
class MqttConfig:
    """The MQTT interface (api/mqtt.py); off while `url` is empty."""

    #: mqtt://user:pass@host:1883 or mqtts://... for TLS.
    url: str = ""
    #: This appliance's id in topics; empty means the host name.
    device_id: str = ""
    #: MQTT client id; empty means the device id (stable, so the broker keeps the session).
    client_id: str = ""
    protocol: Literal["5", "3.1.1"] = "5"
    topic_prefix: str = "appliance"
    qos: int = 1
    keepalive_s: int = 60
    #: How long the broker keeps the session (and queued QoS 1 requests) while disconnected.
    session_expiry_s: int = 86400
    #: Also take requests from <prefix>/groups/<group>/infer/# as a shared subscription.
    shared_group: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    #: Requests handled at once; more are answered with an overload error reply.
    max_inflight: int = 64
    max_payload_bytes: int = 16 * 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


@dataclass
class HubConfig:
    """Fleet sync with a hub (appliance/sync/); off while `url` is empty."""

    #: The hub's base URL, e.g. https://hub.example:8443; empty = no sync (offline only).
    url: str = ""
    #: This device's id as enrolled on the hub; empty means the host name.
    device_id: str = ""
    #: File holding the device token printed by `appliance hub enroll`.
    token_file: str = ""
    #: The hub's root.json the device is bootstrapped with (`appliance hub export-root`).
    root_file: str = ""
    #: Seconds between polls of the hub's assignments (a conditional request when unchanged).
    poll_interval_s: float = 60.0
    #: Each wait is poll_interval_s times a random factor in [1 - jitter, 1 + jitter].
    poll_jitter: float = 0.2
    #: Connect/read timeout of one request to the hub.
    request_timeout_s: float = 30.0
    #: Largest model file the device downloads, whatever the signed length says.
    max_download_bytes: int = 8 * 1024 * 1024 * 1024
    #: Roll a new version back when its failed requests pass this fraction within the window.
    error_rate_threshold: float = 0.5
    #: Seconds after a switch during which the new version's error rate is watched.
    error_window_s: float = 300.0
    #: Requests the new version must have answered before its error rate counts.
    min_requests: int = 20
    #: The telemetry outbox (SQLite); empty means <store>/.sync/outbox.sqlite.
    outbox_path: str = ""
    #: Disk the outbox may use; beyond it the oldest events are dropped (and the drop reported).
    outbox_max_bytes: int = 16 * 1024 * 1024
    #: Events per upload request (the hub takes at most 500).
    upload_batch: int = 200
    #: Seconds between metrics snapshots written to the outbox.
    metrics_interval_s: float = 60.0


@dataclass
class StoreConfig:
    path: str = "models"


@dataclass
class OnnxConfig:
    """onnxruntime session settings (see backends/onnx.py)."""

    #: Threads inside one operator; 0 lets onnxruntime use one per physical core.
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    #: Busy-waiting threads lower latency a little but burn CPU between requests on small devices.
    allow_spinning: bool = False
    cuda_device_id: int = 0
    tensorrt_fp16: bool = False
    #: Where TensorRT keeps built engines; empty means <store>/.cache/tensorrt.
    tensorrt_cache_dir: str = ""


@dataclass
class GgufConfig:
    """llama.cpp settings for GGUF models (see backends/gguf.py)."""

    #: What the model serves: "auto" reads it from the file (BERT-like -> embedding).
    mode: Literal["auto", "chat", "embedding"] = "auto"
    #: Context window in tokens; 0 uses the model's own.
    n_ctx: int = 2048
    #: Threads for generation; 0 means one per CPU core.
    n_threads: int = 0
    n_batch: int = 512
    #: Layers offloaded to the GPU when the device is cuda (999 = all of them).
    gpu_layers: int = 999
    #: Independent llama contexts per model: requests run in parallel, one per context.
    instances: int = 1
    #: Jinja chat template for models whose file carries none (or a wrong one).
    chat_template: str = ""
    #: max_tokens when a request gives none.
    default_max_tokens: int = 256
    #: Embeddings scaled to unit length, like OpenAI's.
    normalize_embeddings: bool = True
    use_mmap: bool = True


@dataclass
class TfliteConfig:
    """LiteRT / TensorFlow Lite interpreter settings (see backends/tflite.py)."""

    #: Threads of one interpreter's kernels; 0 means one per CPU core. Each concurrent request
    #: (max_concurrency) has an interpreter of its own.
    threads: int = 0
    #: The XNNPACK delegate (fast float and int8 CPU kernels); off uses the builtin kernels.
    xnnpack: bool = True
    #: auto: LiteRT (ai-edge-litert), else tflite_runtime if that is what the device has.
    runtime: Literal["auto", "litert", "tflite_runtime"] = "auto"
    #: Quantized inputs and outputs take and give real values (scale and zero point applied);
    #: off exposes the raw integer tensors. A request can ask for raw ones either way.
    dequantize: bool = True
    #: The signature to serve when the model has several; empty: serving_default, else the first.
    signature: str = ""


@dataclass
class ImageConfig:
    """Limits on images decoded for models that declare image pre-processing."""

    #: Largest image (width x height) decoded; larger ones are refused before decoding.
    max_pixels: int = 4096 * 4096
    #: Most images in one request.
    max_images: int = 64


@dataclass
class TextConfig:
    """ONNX models whose manifest declares "text" preprocessing (appliance/preprocess/text.py)."""

    #: Longest text accepted, in characters; a longer one is refused (400) before tokenizing.
    max_chars: int = 20000
    #: Texts run together in one runtime call. 1 keeps each text's vector independent of the
    #: others in its request: dynamic INT8 models scale activations per batch (padding too).
    batch_size: int = 1


@dataclass
class BatchingConfig:
    """Dynamic batching: queued requests merged along dim 0 into one runtime call
    (see engine/batching.py)."""

    #: "auto": on for models whose inputs and outputs all have a dynamic first dimension, on a
    #: backend that can batch (ONNX); true: the same, but a model that cannot batch is an error
    #: in the log; false: never.
    enabled: Literal["auto", True, False] = "auto"
    #: Most rows (the sum of the requests' first dimensions) in one runtime call.
    max_batch_size: int = 32
    #: Longest the first request of a batch waits for more; 0 never holds a request: a batch is
    #: what queued while the previous one ran.
    max_queue_delay_us: float = 0.0
    #: Batch sizes (rows) the model runs best at: a batch is cut at the largest one reachable,
    #: and a max_queue_delay_us wait ends early on reaching the largest.
    preferred_batch_sizes: list[int] = field(default_factory=list)


@dataclass
class BreakerConfig:
    """A model's circuit breaker (engine/breaker.py): stop sending requests to a failing model."""

    enabled: bool = False
    #: Open when at least this fraction of the requests in the window failed (0 < rate <= 1).
    error_rate: float = 0.5
    #: Seconds of recent requests the error rate is measured over.
    window_s: float = 30.0
    #: Fewer requests than this in the window never open the breaker.
    min_requests: int = 20
    #: Seconds an open breaker refuses requests before it lets probes through (half-open).
    open_s: float = 10.0
    #: Probe requests that must all succeed, while half-open, to close it again.
    half_open_probes: int = 1


@dataclass
class PriorityQueueConfig:
    """The queue policy of one priority level (Triton's ModelQueuePolicy)."""

    #: The level this policy applies to (1 is the highest).
    level: int = 0
    #: Requests of this level waiting at once; more are refused at once with 503. 0: only the
    #: model's max_queue bounds it.
    max_queue: int = 0
    #: Longest a request of this level waits for a worker before `timeout_action` applies, in
    #: seconds; 0: no limit but the request's own deadline.
    timeout_s: float = 0.0
    #: "reject": answered 503 (Triton's UNAVAILABLE, "Request timeout expired"); "delay": moved
    #: behind every request of its level still within its wait, still ahead of lower levels.
    timeout_action: Literal["reject", "delay"] = "reject"
    #: Most rows in one run of this level's requests; 0: the model's batching.max_batch_size.
    #: Runs are never preempted: a small one for a background level bounds how long a higher
    #: level's request can wait behind it.
    max_batch_size: int = 0


@dataclass
class PriorityConfig:
    """Priority levels of a model's queue (engine/priority.py): a request's `priority` parameter
    picks one, 1 being the highest; 0, none or one out of range take `default_level`."""

    #: 1: one queue in arrival order (no priorities).
    levels: int = 1
    #: The level of requests that give no priority (or 0, or one above `levels`); 0 here
    #: means the lowest level.
    default_level: int = 0
    #: Policies of the levels that have one ([[models.NAME.priority.queues]] tables).
    queues: list[PriorityQueueConfig] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Serving settings for a model; [model_defaults] applies to all, [models.NAME] overrides."""

    device: Device = "auto"
    #: Requests running at once on this model (worker threads).
    max_concurrency: int = 1
    #: Requests waiting beyond those running; more are refused at once with 503.
    max_queue: int = 64
    #: Longest a request may wait plus run, in seconds.
    timeout_s: float = 30.0
    #: Accept NaN and infinity in float inputs.
    allow_non_finite: bool = False
    #: A model whose measured runs stay under this many microseconds runs on the event loop
    #: thread, skipping the thread hand-off (see engine/scheduler.py); 0 always uses workers.
    inline_max_us: float = 250.0
    #: CPU priority of the model's worker and runtime threads below the event loop's (Linux
    #: nice steps, 0-19): on a saturated CPU the loop still answers health checks and refuses
    #: excess requests at once instead of queueing them behind inference.
    worker_nice: int = 5
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    #: Result cache budget in bytes (engine/cache.py); 0 turns the cache off.
    cache_bytes: int = 0
    #: Extra attempts after a transient failure (queue full, runtime error); 0 = none.
    retries: int = 0
    #: First delay before a retry; it doubles each attempt, with jitter, up to the maximum.
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 1.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    priority: PriorityConfig = field(default_factory=PriorityConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    gguf: GgufConfig = field(default_factory=GgufConfig)
    tflite: TfliteConfig = field(default_factory=TfliteConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class VariantConfig:
    """One model a task sends a share of its requests to."""

    #: The model's name (as served: each A/B version is stored under its own name).
    model: str = ""
    #: Answer only while this version serves the model; empty = whichever version serves.
    version: str = ""
    #: Share of the task's requests, relative to the other variants' weights.
    weight: float = 1.0


@dataclass
class TaskConfig:
    """An operator-facing name routed to models (engine/routing.py); [tasks.NAME] tables."""

    variants: list[VariantConfig] = field(default_factory=list)
    #: Request parameter (or X-Header, MQTT 5 user property) whose value pins a variant.
    sticky_key: str = ""
    #: Model that answers when the chosen variant fails or its circuit breaker is open.
    fallback: str = ""
    #: LLM tasks: text with {field} names, filled from the request's `fields`.
    prompt_template: str = ""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    model_defaults: ModelConfig = field(default_factory=ModelConfig)
    #: Raw per-model overrides, merged over model_defaults by `model_config`.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Raw task tables, checked and built by `task_config`.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def task_config(self, name: str) -> TaskConfig:
        """The settings of one task, checked (names, weights, template fields)."""
        if not _NAME_RE.match(name) or ".." in name:
            raise ConfigError(
                f"tasks.{name}: invalid task name: use 1-128 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        return _build(TaskConfig, self.tasks.get(name, {}), f"tasks.{name}")

    def model_config(self, name: str) -> ModelConfig:
        """The effective settings of one model: defaults with its [models.NAME] table on top."""
        base = _to_dict(self.model_defaults)
        return _build(ModelConfig, _merge(base, self.models.get(name, {})), f"models.{name}")

    def token(self) -> str:
        if self.server.auth_token_file:
            path = Path(self.server.auth_token_file)
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"server.auth_token_file = {str(path)!r}: cannot read: {exc.strerror}"
                ) from None
            if not token:
                raise ConfigError(f"server.auth_token_file = {str(path)!r}: the file is empty")
            return token
        return self.server.auth_token


def _to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(
            str(a).lower() if isinstance(a, bool) else repr(a) for a in get_args(tp)
        )
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _check_value(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        # type too: `1 == True`, but enabled = 1 is not enabled = true
        if not any(value == a and type(value) is type(a) for a in get_args(tp)):
            raise ConfigError(f"{where} = {value!r}: must be {_type_name(tp)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: must be an integer")
        if value < 0:
            raise ConfigError(f"{where} = {value!r}: must not be negative")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{where} = {value!r}: must be a number")
        if value < 0:
            raise ConfigError(f"{where} = {value!r}: must not be negative")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: must be a string")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: must be a list")
        (item,) = get_args(tp)
        return [_check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r}: must be a table")
        return _build(typing.cast(type, tp), value, where)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r}: must be a table")
        for key, sub in value.items():
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{where}.{key} = {sub!r}: must be a table")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: must be a list")
        return [_check_value(get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - not used yet
        raise ConfigError(f"{where}: unsupported union type")
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"{path}: unknown key (known keys: {', '.join(names)})")
        kwargs[key] = _check_value(hints[key], value, path)
    obj = cls(**kwargs)
    _check_ranges(obj, where)
    return obj


def _check_ranges(obj: Any, where: str) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where + '.' if where else ''}{key} = {getattr(obj, key)!r}: {why}")

    if isinstance(obj, ServerConfig):
        if not 0 <= obj.port <= 65535:
            raise bad("port", "must be between 0 and 65535")
        if obj.max_body_bytes < 1024:
            raise bad("max_body_bytes", "must be at least 1024")
    if isinstance(obj, ModelConfig):
        if obj.max_concurrency < 1:
            raise bad("max_concurrency", "must be at least 1")
        if obj.timeout_s <= 0:
            raise bad("timeout_s", "must be greater than 0")
        if obj.worker_nice > 19:
            raise bad("worker_nice", "must be between 0 and 19")
    if isinstance(obj, BatchingConfig):
        if obj.max_batch_size < 1:
            raise bad("max_batch_size", "must be at least 1")
        if any(n < 1 or n > obj.max_batch_size for n in obj.preferred_batch_sizes):
            raise bad("preferred_batch_sizes", "each must be between 1 and max_batch_size")
    if isinstance(obj, MqttConfig):
        if obj.qos not in (0, 1):
            raise bad("qos", "must be 0 or 1")
        if obj.url and not obj.url.startswith(("mqtt://", "mqtts://")):
            raise bad("url", "must start with mqtt:// or mqtts://")
        if obj.max_inflight < 1:
            raise bad("max_inflight", "must be at least 1")
        if obj.reconnect_max_s < obj.reconnect_min_s:
            raise bad("reconnect_max_s", "must not be below reconnect_min_s")
    if isinstance(obj, ImageConfig):
        if obj.max_pixels < 1:
            raise bad("max_pixels", "must be at least 1")
        if obj.max_images < 1:
            raise bad("max_images", "must be at least 1")
    if isinstance(obj, ModelConfig) and obj.retry_backoff_max_s < obj.retry_backoff_s:
        raise bad("retry_backoff_max_s", "must not be below retry_backoff_s")
    if isinstance(obj, BreakerConfig):
        if not 0 < obj.error_rate <= 1:
            raise bad("error_rate", "must be a fraction above 0 and at most 1")
        if obj.window_s <= 0:
            raise bad("window_s", "must be greater than 0")
        if obj.min_requests < 1:
            raise bad("min_requests", "must be at least 1")
        if obj.half_open_probes < 1:
            raise bad("half_open_probes", "must be at least 1")
    if isinstance(obj, VariantConfig):
        if not _NAME_RE.match(obj.model):
            raise bad("model", "must name a model")
        if obj.weight <= 0 or math.isinf(obj.weight):
            raise bad("weight", "must be a number greater than 0")
    if isinstance(obj, TaskConfig):
        if not obj.variants:
            raise bad("variants", 'must list at least one {model = "NAME", weight = W}')
        if obj.fallback and not _NAME_RE.match(obj.fallback):
            raise bad("fallback", "must name a model (or be empty)")
        if obj.sticky_key and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", obj.sticky_key):
            raise bad("sticky_key", "must be a parameter name: letters, digits and '_'")
        try:
            template_fields(obj.prompt_template)
        except ValueError as exc:
            raise bad("prompt_template", str(exc)) from None
    if isinstance(obj, HubConfig):
        if obj.url and not obj.url.startswith(("http://", "https://")):
            raise bad("url", "must start with http:// or https://")
        if obj.poll_interval_s <= 0:
            raise bad("poll_interval_s", "must be greater than 0")
        if obj.poll_jitter >= 1:
            raise bad("poll_jitter", "must be below 1")
        if obj.request_timeout_s <= 0:
            raise bad("request_timeout_s", "must be greater than 0")
        if obj.error_rate_threshold > 1:
            raise bad("error_rate_threshold", "must be between 0 and 1")
        if not 1 <= obj.upload_batch <= 500:
            raise bad("upload_batch", "must be between 1 and 500")
        if obj.outbox_max_bytes < 64 * 1024:
            raise bad("outbox_max_bytes", "must be at least 65536")
        if obj.metrics_interval_s <= 0:
            raise bad("metrics_interval_s", "must be greater than 0")
    if isinstance(obj, GgufConfig):
        if obj.instances < 1:
            raise bad("instances", "must be at least 1")
        if obj.n_batch < 1:
            raise bad("n_batch", "must be at least 1")
        if obj.default_max_tokens < 1:
            raise bad("default_max_tokens", "must be at least 1")
    if isinstance(obj, PriorityConfig):
        _check_priority(obj, where)
    if isinstance(obj, TextConfig):
        if obj.max_chars < 1:
            raise bad("max_chars", "must be at least 1")
        if obj.batch_size < 1:
            raise bad("batch_size", "must be at least 1")


def _check_priority(obj: PriorityConfig, where: str) -> None:
    """The priority table's own rules (the types of its queue tables are checked by `_build`)."""
    at = f"{where}." if where else ""
    if not 1 <= obj.levels <= MAX_PRIORITY_LEVELS:
        raise ConfigError(f"{at}levels = {obj.levels}: must be between 1 and {MAX_PRIORITY_LEVELS}")
    if obj.default_level > obj.levels:
        raise ConfigError(
            f"{at}default_level = {obj.default_level}: must be between 1 and levels "
            f"({obj.levels}), or 0 for the lowest level"
        )
    seen: set[int] = set()
    for i, queue in enumerate(obj.queues):
        if not 1 <= queue.level <= obj.levels:
            raise ConfigError(
                f"{at}queues[{i}].level = {queue.level}: must be between 1 and levels "
                f"({obj.levels})"
            )
        if queue.level in seen:
            raise ConfigError(
                f"{at}queues[{i}].level = {queue.level}: another queue table has this level"
            )
        seen.add(queue.level)


def template_fields(template: str) -> list[str]:
    """The {field} names of a prompt template; ValueError for anything but plain names
    ({0}, {x.attr}, {x[0]}, {x!r}, {x:>8} and unbalanced braces are refused)."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conversion:
            raise ValueError(f"{{{name}}}: fields must be plain names like {{device}}")
        if name not in names:
            names.append(name)
    return names


def _declared_type(parts: list[str]) -> Any:
    """The type a config path is declared with (None if it names no field)."""
    tp: Any = Config
    i = 0
    while i < len(parts):
        if not dataclasses.is_dataclass(tp):
            return None
        hint = typing.get_type_hints(tp).get(parts[i])
        if hint is None:
            return None
        if tp is Config and parts[i] in ("models", "tasks"):
            i += 1  # models.NAME.key: NAME is a model, the rest a ModelConfig
            hint = ModelConfig if parts[i - 1] == "models" else TaskConfig
        tp = hint
        i += 1
    return tp


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """APPLIANCE_SERVER__PORT=9000 -> {"server": {"port": 9000}}; values are read as TOML,
    except that a string setting keeps the raw text (a token `12345` is not a number)."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if not isinstance(value, str) and _declared_type(parts) is str:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {key}: conflicts with another variable")
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the TOML file (if any), apply APPLIANCE_* variables, then explicit overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {str(p)!r}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r}: invalid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r}: not UTF-8 text") from None
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    data = _merge(data, overrides or {})
    config = _build(Config, data, "")
    for name in config.models:
        config.model_config(name)  # validate every per-model table now, not at first use
    for name in config.tasks:
        config.task_config(name)
    return config
