"""Configuration: defaults < TOML file < APPLIANCE_* environment < command-line flags.

Every section is a dataclass. A bad value is refused when the config is loaded, with an error
that names the key and the value ("models.m.max_concurrency = 0: must be at least 1") instead
of failing later somewhere deep in the server. Three layers check a value, in this order:

1. The field's type, from its annotation: int, float, bool, str, Literal[...], list[...], a
   nested section (dataclass) or a dict of tables. Integers and numbers are never negative
   (no setting needs one), NaN is never a number.
2. At most one constraint per field, declared next to the field as its metadata::

       max_concurrency: int = field(default=1, metadata=at_least(1))
       worker_nice: int = field(default=5, metadata=between(0, 19))
       error_rate: float = field(default=0.5, metadata=fraction(above=0, at_most=1))
       url: str = field(default="", metadata=url_scheme("http://", "https://"))
       fallback: str = field(default="", metadata=name_of("a model", optional=True))

   The helpers (at_least, above, below, between, one_of, fraction, finite_above, not_empty,
   url_scheme, matches, name_of, device_name, valid) each return that metadata: a function
   giving the reason a value is refused, or None. A new kind of constraint is a new helper
   built on `constraint(...)`; a model, task or device name follows appliance/names.py, the
   one name rule.
3. Rules across fields in the section's `check(self)` method, which raises
   `Invalid(key, reason)`; it runs once every field passed its own constraint:

       def check(self) -> None:
           if self.reconnect_max_s < self.reconnect_min_s:
               raise Invalid("reconnect_max_s", "must not be below reconnect_min_s")

The checker (`_build`) reads all three; no check of a value lives anywhere else. A helper may
not share a field's name: a class body sees its own fields before the module's functions.
Porting a range check written the old way (`if obj.n < 1: raise bad("n", "must be at least
1")` in a function far below) means moving it onto the field: `n: int = field(default=4,
metadata=at_least(1))`; a check that reads two fields goes into `check()`.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from . import names
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

ENV_PREFIX = "APPLIANCE_"
#: Most priority levels a model may have (each is a queue its workers look at).
MAX_PRIORITY_LEVELS = 16
T = TypeVar("T")

Device = Literal["auto", "cuda", "cpu"]

# -- constraints (field metadata) ----------------------------------------------------------------

#: A constraint: the reason a value is refused ("must be at least 1"), or None to accept it.
Check = Callable[[Any], "str | None"]
_CHECK = "appliance.config.check"


class Invalid(Exception):
    """Raised by a section's `check()`: `key` is the field to blame, `reason` why."""

    def __init__(self, key: str, reason: str, value: Any = None) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
        #: The value to show, for a key that is not a field of the section (`queues[0].level`).
        self.value = value


def constraint(check: Check) -> dict[str, Check]:
    """Field metadata holding `check`; every helper below is one of these."""
    return {_CHECK: check}


def at_least(low: float) -> dict[str, Check]:
    return constraint(lambda v: None if v >= low else f"must be at least {low}")


def above(low: float) -> dict[str, Check]:
    return constraint(lambda v: None if v > low else f"must be greater than {low}")


def below(high: float) -> dict[str, Check]:
    return constraint(lambda v: None if v < high else f"must be below {high}")


def between(low: float, high: float) -> dict[str, Check]:
    """Inclusive at both ends."""
    return constraint(lambda v: None if low <= v <= high else f"must be between {low} and {high}")


def finite_above(low: float) -> dict[str, Check]:
    return constraint(
        lambda v: None if low < v < math.inf else f"must be a finite number greater than {low}"
    )


def fraction(*, above: float = 0, at_most: float = 1) -> dict[str, Check]:
    """A share: fraction(above=0, at_most=1) takes 0 < v <= 1."""
    return constraint(
        lambda v: (
            None
            if above < v <= at_most
            else f"must be a fraction above {above} and at most {at_most}"
        )
    )


def one_of(*values: object) -> dict[str, Check]:
    words = " or ".join(", ".join(map(str, values)).rsplit(", ", 1))
    return constraint(lambda v: None if v in values else f"must be {words}")


def not_empty(reason: str) -> dict[str, Check]:
    return constraint(lambda v: None if v else reason)


def url_scheme(*schemes: str) -> dict[str, Check]:
    """A URL starting with one of `schemes` ("mqtt://"), or empty (the feature is off)."""
    words = " or ".join(schemes)
    return constraint(
        lambda v: None if not v or v.startswith(schemes) else f"must start with {words}"
    )


def matches(pattern: str, reason: str) -> dict[str, Check]:
    """Empty, or the whole value matches `pattern`."""
    regex = re.compile(pattern)
    return constraint(lambda v: None if not v or regex.fullmatch(v) else reason)


def name_of(what: str, optional: bool = False) -> dict[str, Check]:
    """A model or task name (appliance/names.py); `optional`: empty is allowed too."""

    def check(v: str) -> str | None:
        problem = None if optional and not v else names.name_problem(v)
        if problem is None:
            return None
        empty = " (or be empty)" if optional else ""
        return f"must name {what}{empty}: {names.rule()} ({problem})"

    return constraint(check)


def device_name(what: str) -> dict[str, Check]:
    """A device id or group name (an MQTT topic level, a hub path segment), or empty:
    the name rule with the length of a host name (appliance/names.py)."""
    limit = names.DEVICE_ID_MAX_LENGTH

    def check(v: str) -> str | None:
        problem = names.name_problem(v, limit) if v else None
        if problem is None:
            return None
        return f"must be {what} (or empty): {names.rule(limit)} ({problem})"

    return constraint(check)


def valid(parse: Callable[[Any], object]) -> dict[str, Check]:
    """`parse(value)` succeeds; the text of its ValueError is the reason."""

    def check(v: Any) -> str | None:
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None

    return constraint(check)


def template_fields(template: str) -> list[str]:
    """The {field} names of a prompt template; ValueError for anything but plain names
    ({0}, {x.attr}, {x[0]}, {x!r}, {x:>8} and unbalanced braces are refused)."""
    found: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conversion:
            raise ValueError(f"{{{name}}}: fields must be plain names like {{device}}")
        if name not in found:
            found.append(name)
    return found


# -- sections ----------------------------------------------------------------------------------


@dataclass
class TokenConfig:
    """One bearer token of [[server.tokens]] (api/auth.py): its secret in a file, or only the
    secret's SHA-256 in the config; `scopes` says what it may call."""

    #: Named in logs and errors (the token itself never is).
    name: str = field(default="", metadata=not_empty("must not be empty"))
    #: File holding the token.
    token_file: str = ""
    #: The token's SHA-256, hex (`printf %s TOKEN | sha256sum`): no secret in the config.
    token_sha256: str = field(
        default="", metadata=matches(r"[0-9a-fA-F]{64}", "must be 64 hexadecimal digits")
    )
    #: "infer" (inference, metadata) and/or "admin" (repository, activation, trace settings;
    #: admin implies infer).
    scopes: list[str] = field(default_factory=lambda: ["infer"])

    def check(self) -> None:
        if bool(self.token_file) == bool(self.token_sha256):
            raise Invalid("token_file", "give exactly one of token_file and token_sha256")
        if not self.scopes:
            raise Invalid("scopes", 'must name at least one scope ("infer" or "admin")')
        for i, scope in enumerate(self.scopes):
            if scope not in ("infer", "admin"):
                raise Invalid(f"scopes[{i}]", 'must be "infer" or "admin"', scope)


def load_tokens_file(path: str) -> list[TokenConfig]:
    """The [[tokens]] tables of `server.tokens_file`, each checked like [[server.tokens]]."""
    where = f"server.tokens_file = {path!r}"
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    extra = set(data) - {"tokens"}
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (expected [[tokens]] tables)")
    tables = _check_value(list[TokenConfig], data.get("tokens", []), f"{path}: tokens")
    return typing.cast(list[TokenConfig], tables)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=between(0, 65535))
    #: Bearer token required on every route but health; empty disables auth. An admin token
    #: (named "auth_token") beside those of `tokens`.
    auth_token: str = ""
    #: File holding the token (keeps it out of the config and the process list).
    auth_token_file: str = ""
    #: Several tokens, each with its scopes ([[server.tokens]], api/auth.py).
    tokens: list[TokenConfig] = field(default_factory=list)
    #: A TOML file of [[tokens]] tables (the same keys), added to `tokens`: the list can be
    #: managed apart from this file, readable by fewer users.
    tokens_file: str = ""
    #: Failed authentication attempts per client address per minute; then 429 until the
    #: minute has passed.
    auth_failures_per_minute: int = field(default=10, metadata=at_least(1))
    #: TLS for HTTP (and gRPC, unless grpc.cert_file is set): certificate chain and key (PEM);
    #: both empty: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    #: Mutual TLS: clients must present a certificate signed by this CA (PEM).
    tls_client_ca: str = ""
    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata=at_least(1024))
    #: One JSON log line per request.
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Ready only when every model loaded (Triton's strict readiness).
    strict_readiness: bool = True
    shutdown_timeout_s: float = 10.0
    #: Infer and liveness answered by api/http_server.py's own protocol; false: all by aiohttp.
    fast_path: bool = True
    #: Client connections at most (api/limits.py); also capped below RLIMIT_NOFILE.
    max_connections: int = field(default=1024, metadata=at_least(1))
    #: Seconds a request's head may take to arrive, and its body (slowloris); then 408.
    header_timeout_s: float = field(default=10.0, metadata=finite_above(0))
    body_timeout_s: float = field(default=60.0, metadata=finite_above(0))
    #: Seconds an idle keep-alive connection stays open.
    keepalive_timeout_s: float = field(default=75.0, metadata=finite_above(0))

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise Invalid(
                "tls_key" if self.tls_cert else "tls_cert", "TLS needs both tls_cert and tls_key"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise Invalid("tls_client_ca", "client certificates need TLS: set tls_cert and tls_key")
        names = [t.name for t in self.tokens]
        for i, name in enumerate(names):
            if name in names[:i] or (
                name == "auth_token" and (self.auth_token or self.auth_token_file)
            ):
                raise Invalid(f"tokens[{i}].name", "is used twice", name)


@dataclass
class WebSocketConfig:
    """WebSocket streams, GET /v2/models/NAME/stream (api/ws.py): limits per connection."""

    #: A larger message closes the connection (WebSocket close code 1009).
    max_message_bytes: int = field(default=16 * 1024 * 1024, metadata=at_least(1024))
    #: Requests of one connection that run at once (answers still go out in order).
    max_inflight: int = field(default=2, metadata=at_least(1))
    #: Requests of one connection waiting to run, beyond those running.
    queue: int = field(default=8, metadata=at_least(1))
    #: When the queue is full: drop the oldest waiting request (its id is reported), or stop
    #: reading the socket until there is room.
    policy: Literal["drop_oldest", "backpressure"] = "drop_oldest"
    #: Seconds between pings, so a dead peer is noticed; 0: none.
    heartbeat_s: float = field(default=30.0, metadata=at_least(0))


@dataclass
class MqttConfig:
    """The MQTT interface (api/mqtt.py); off while `url` is empty."""

    #: mqtt://user:pass@host:1883 or mqtts://... for TLS.
    url: str = field(default="", metadata=url_scheme("mqtt://", "mqtts://"))
    #: This appliance's id in topics; empty means the host name.
    device_id: str = field(default="", metadata=device_name("a device id"))
    #: MQTT client id; empty means the device id (stable, so the broker keeps the session).
    client_id: str = ""
    protocol: Literal["5", "3.1.1"] = "5"
    topic_prefix: str = "appliance"
    qos: int = field(default=1, metadata=one_of(0, 1))
    keepalive_s: int = 60
    #: How long the broker keeps the session (and queued QoS 1 requests) while disconnected.
    session_expiry_s: int = 86400
    #: Also take requests from <prefix>/groups/<group>/infer/# as a shared subscription.
    shared_group: str = field(default="", metadata=device_name("a group name"))
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    #: Requests handled at once; more are answered with an overload error reply.
    max_inflight: int = field(default=64, metadata=at_least(1))
    max_payload_bytes: int = 16 * 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def check(self) -> None:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise Invalid("reconnect_max_s", "must not be below reconnect_min_s")


@dataclass
class GrpcConfig:
    """KServe v2 / Open Inference Protocol over gRPC (api/grpc.py, the `grpc` extra): off while
    `port` is 0. Same engine, auth token, limits and request path as HTTP."""

    #: The port to serve gRPC on (Triton's is 8001); 0: no gRPC.
    port: int = field(default=0, metadata=between(0, 65535))
    #: The address to bind; empty: server.host (127.0.0.1 by default, like HTTP).
    host: str = ""
    #: Largest message either way, in bytes; a larger request is refused (RESOURCE_EXHAUSTED).
    max_message_bytes: int = field(default=64 * 1024 * 1024, metadata=at_least(1024))
    #: Requests of one ModelStreamInfer stream being worked on at once; beyond it the server
    #: stops reading the stream until the oldest is answered (answers keep request order).
    max_stream_inflight: int = field(default=64, metadata=at_least(1))
    #: TLS: the server's certificate chain and key (PEM); both empty: plaintext.
    cert_file: str = ""
    key_file: str = ""
    #: Mutual TLS: clients must present a certificate signed by this CA (PEM).
    client_ca_file: str = ""

    def check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise Invalid(missing, "TLS needs both cert_file and key_file")
        if self.client_ca_file and not self.cert_file:
            raise Invalid(
                "client_ca_file", "client certificates need TLS: set cert_file and key_file"
            )


def _http_urls(value: list[str]) -> str | None:
    for i, item in enumerate(value):
        if not item.startswith(("http://", "https://")):
            return f"[{i}] {item!r} must start with http:// or https://"
    return None


@dataclass
class HubConfig:
    """Fleet sync with a hub (appliance/sync/); off while `url` is empty."""

    #: The hub's base URL, e.g. https://hub.example:8443; empty = no sync (offline only).
    url: str = field(default="", metadata=url_scheme("http://", "https://"))
    #: Static TUF mirrors (hub serve --static-dir) for metadata and models, tried in order;
    #: empty = the hub's own /tuf/. Untrusted: everything is verified, no token is sent.
    mirrors: list[str] = field(default_factory=list, metadata=constraint(_http_urls))
    #: This device's id as enrolled on the hub; empty means the host name.
    device_id: str = field(default="", metadata=device_name("a device id"))
    #: File holding the device token printed by `appliance hub enroll`.
    token_file: str = ""
    #: The hub's root.json the device is bootstrapped with (`appliance hub export-root`).
    root_file: str = ""
    #: Seconds between polls of the hub's assignments (a conditional request when unchanged).
    poll_interval_s: float = field(default=60.0, metadata=above(0))
    #: Each wait is poll_interval_s times a random factor in [1 - jitter, 1 + jitter].
    poll_jitter: float = field(default=0.2, metadata=below(1))
    #: Connect/read timeout of one request to the hub.
    request_timeout_s: float = field(default=30.0, metadata=above(0))
    #: Largest model file the device downloads, whatever the signed length says.
    max_download_bytes: int = 8 * 1024 * 1024 * 1024
    #: Roll a new version back when its failed requests pass this fraction within the window.
    error_rate_threshold: float = field(default=0.5, metadata=between(0, 1))
    #: Seconds after a switch during which the new version's error rate is watched.
    error_window_s: float = 300.0
    #: Requests the new version must have answered before its error rate counts.
    min_requests: int = 20
    #: The telemetry outbox (SQLite); empty means <store>/.sync/outbox.sqlite.
    outbox_path: str = ""
    #: Disk the outbox may use; beyond it the oldest events are dropped (and the drop reported).
    outbox_max_bytes: int = field(default=16 * 1024 * 1024, metadata=at_least(64 * 1024))
    #: Events per upload request (the hub takes at most 500).
    upload_batch: int = field(default=200, metadata=between(1, 500))
    #: Seconds between metrics snapshots written to the outbox.
    metrics_interval_s: float = field(default=60.0, metadata=above(0))


def _absolute_paths(value: list[str]) -> str | None:
    for i, item in enumerate(value):
        if not Path(item).is_absolute():
            return f"[{i}] {item!r} is not an absolute path"
    return None


@dataclass
class PluginsConfig:
    """Directories of plugin packages (`pip install --target DIR appliance-plugin-x`), for
    the frozen binary (see appliance/plugins.py): put on sys.path at start-up; each must be
    writable by root (or the server's user) only."""

    dirs: list[str] = field(default_factory=list, metadata=constraint(_absolute_paths))


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
    #: Threads for generation; 0 means one per CPU core (the README's "n_threads" says why).
    n_threads: int = 0
    n_batch: int = field(default=512, metadata=at_least(1))
    #: Layers offloaded to the GPU when the device is cuda (999 = all of them).
    gpu_layers: int = 999
    #: Independent llama contexts per model: requests run in parallel, one per context.
    instances: int = field(default=1, metadata=at_least(1))
    #: Jinja chat template for models whose file carries none (or a wrong one).
    chat_template: str = ""
    #: max_tokens when a request gives none.
    default_max_tokens: int = field(default=256, metadata=at_least(1))
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
    max_pixels: int = field(default=4096 * 4096, metadata=at_least(1))
    #: Most images in one request.
    max_images: int = field(default=64, metadata=at_least(1))


@dataclass
class TextConfig:
    """ONNX models whose manifest declares "text" preprocessing (appliance/preprocess/text.py)."""

    #: Longest text accepted, in characters; a longer one is refused (400) before tokenizing.
    max_chars: int = field(default=20000, metadata=at_least(1))
    #: Texts run together in one runtime call. 1 keeps each text's vector independent of the
    #: others in its request: dynamic INT8 models scale activations per batch (padding too).
    batch_size: int = field(default=1, metadata=at_least(1))


@dataclass
class FormatsConfig:
    """Limits on answers given in a format other than JSON (appliance/formats/): XML, CSV and
    the model's report templates (Jinja2, sandboxed; see formats/templates.py)."""

    #: Most output elements an XML, CSV or templated answer may hold; a larger answer is
    #: refused (406: ask for JSON, or binary tensors, instead). JSON has no such limit.
    max_elements: int = field(default=200_000, metadata=at_least(1))
    #: Longest a template may render, in seconds; it is stopped there (500 naming the limit).
    render_timeout_s: float = field(default=1.0, metadata=above(0))
    #: Largest rendered report, in bytes; also the largest string or list a template may build.
    max_output_bytes: int = field(default=1024 * 1024, metadata=at_least(1024))
    #: Largest template file accepted at `models add` and at load.
    max_template_bytes: int = field(default=256 * 1024, metadata=at_least(1))


@dataclass
class BatchingConfig:
    """Dynamic batching: queued requests merged along dim 0 into one runtime call
    (see engine/batching.py)."""

    #: "auto": on for models whose inputs and outputs all have a dynamic first dimension, on a
    #: backend that can batch (ONNX); true: the same, but a model that cannot batch is an error
    #: in the log; false: never.
    enabled: Literal["auto", True, False] = "auto"
    #: Most rows (the sum of the requests' first dimensions) in one runtime call.
    max_batch_size: int = field(default=32, metadata=at_least(1))
    #: Longest the first request of a batch waits for more; 0 never holds a request: a batch is
    #: what queued while the previous one ran.
    max_queue_delay_us: float = 0.0
    #: Batch sizes (rows) the model runs best at: a batch is cut at the largest one reachable,
    #: and a max_queue_delay_us wait ends early on reaching the largest.
    preferred_batch_sizes: list[int] = field(default_factory=list)

    def check(self) -> None:
        if any(n < 1 or n > self.max_batch_size for n in self.preferred_batch_sizes):
            raise Invalid(
                "preferred_batch_sizes",
                f"each must be between 1 and max_batch_size ({self.max_batch_size})",
            )


@dataclass
class BreakerConfig:
    """A model's circuit breaker (routing/breaker.py): stop sending requests to a failing model."""

    enabled: bool = False
    #: Open when at least this fraction of the requests in the window failed (0 < rate <= 1).
    error_rate: float = field(default=0.5, metadata=fraction(above=0, at_most=1))
    #: Seconds of recent requests the error rate is measured over.
    window_s: float = field(default=30.0, metadata=above(0))
    #: Fewer requests than this in the window never open the breaker.
    min_requests: int = field(default=20, metadata=at_least(1))
    #: Seconds an open breaker refuses requests before it lets probes through (half-open).
    open_s: float = 10.0
    #: Probe requests that must all succeed, while half-open, to close it again.
    half_open_probes: int = field(default=1, metadata=at_least(1))


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
    levels: int = field(default=1, metadata=between(1, MAX_PRIORITY_LEVELS))
    #: The level of requests that give no priority (or 0, or one above `levels`); 0 here
    #: means the lowest level.
    default_level: int = 0
    #: Policies of the levels that have one ([[models.NAME.priority.queues]] tables).
    queues: list[PriorityQueueConfig] = field(default_factory=list)
    #: Worker threads beside max_concurrency that take only requests above the lowest level,
    #: at the event loop's CPU priority: an urgent request never waits for a background batch
    #: to finish (engine/priority.py). 0: none; ignored with one level.
    urgent_workers: int = field(default=1, metadata=between(0, 8))

    def check(self) -> None:
        if self.default_level > self.levels:
            raise Invalid(
                "default_level",
                f"must be between 1 and levels ({self.levels}), or 0 for the lowest level",
            )
        seen: set[int] = set()
        for i, queue in enumerate(self.queues):
            key = f"queues[{i}].level"
            if not 1 <= queue.level <= self.levels:
                raise Invalid(key, f"must be between 1 and levels ({self.levels})", queue.level)
            if queue.level in seen:
                raise Invalid(key, "another queue table has this level", queue.level)
            seen.add(queue.level)


@dataclass
class ProcessConfig:
    """A model served with `isolation = "process"` (appliance/isolation/): how its worker
    process is restarted after it dies."""

    #: Wait before the first restart; it doubles with each crash that follows soon after.
    restart_backoff_s: float = field(default=0.5, metadata=above(0))
    #: The longest wait between restarts.
    restart_backoff_max_s: float = 30.0
    #: A worker that served this long before it died restarts after restart_backoff_s again.
    healthy_after_s: float = 60.0
    #: The most microseconds each side of a call made on the event loop (an inline run) polls
    #: for the other's next packet before it sleeps; self-tuning, 0: never (isolation/spin.py).
    spin_us: float = field(default=200.0, metadata=between(0, 10000))

    def check(self) -> None:
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise Invalid("restart_backoff_max_s", "must not be below restart_backoff_s")


@dataclass
class ModelConfig:
    """Serving settings for a model; [model_defaults] applies to all, [models.NAME] overrides."""

    device: Device = "auto"
    #: Requests running at once on this model (worker threads).
    max_concurrency: int = field(default=1, metadata=at_least(1))
    #: Requests waiting beyond those running; more are refused at once with 503.
    max_queue: int = 64
    #: Longest a request may wait plus run, in seconds.
    timeout_s: float = field(default=30.0, metadata=above(0))
    #: Accept NaN and infinity in float inputs.
    allow_non_finite: bool = False
    #: A model whose measured runs stay under this many microseconds runs on the event loop
    #: thread, skipping the thread hand-off (see engine/scheduler.py); 0 always uses workers.
    inline_max_us: float = 250.0
    #: CPU priority of the model's worker and runtime threads below the event loop's (Linux
    #: nice steps, 0-19): on a saturated CPU the loop still answers health checks and refuses
    #: excess requests at once instead of queueing them behind inference.
    worker_nice: int = field(default=5, metadata=between(0, 19))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    #: Result cache budget in bytes (routing/cache.py); 0 turns the cache off.
    cache_bytes: int = 0
    #: Extra attempts after a transient failure (queue full, runtime error); 0 = none.
    retries: int = 0
    #: First delay before a retry; it doubles each attempt, with jitter, up to the maximum.
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 1.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    priority: PriorityConfig = field(default_factory=PriorityConfig)
    #: "process": the backend runs in a worker process of its own, so a native crash (segfault,
    #: abort, out-of-memory kill) fails only this model's requests in flight and the worker is
    #: restarted; "none": in the server's process (see appliance/isolation/).
    isolation: Literal["none", "process"] = "none"
    #: Load a model file the first time (per sha256) in a throwaway child process before the
    #: server loads it, so a runtime crashing on a malformed file kills the child only.
    probe_first_load: bool = True
    #: Address space (RLIMIT_AS) in MiB of the model's worker process and of its first-load
    #: probe; a model that does not fit fails to load, saying so, and the others serve. 0: none.
    max_memory_mb: int = 0
    process: ProcessConfig = field(default_factory=ProcessConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    gguf: GgufConfig = field(default_factory=GgufConfig)
    tflite: TfliteConfig = field(default_factory=TfliteConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    formats: FormatsConfig = field(default_factory=FormatsConfig)

    def check(self) -> None:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise Invalid("retry_backoff_max_s", "must not be below retry_backoff_s")
        if self.max_memory_mb and self.isolation == "none" and not self.probe_first_load:
            raise Invalid(
                "max_memory_mb",
                'limits a child process: needs isolation = "process" or probe_first_load = true',
            )


@dataclass
class VariantConfig:
    """One model a task sends a share of its requests to."""

    #: The model's name (as served: each A/B version is stored under its own name).
    model: str = field(default="", metadata=name_of("a model"))
    #: Answer only while this version serves the model; empty = whichever version serves.
    version: str = ""
    #: Share of the task's requests, relative to the other variants' weights.
    weight: float = field(default=1.0, metadata=finite_above(0))


@dataclass
class TaskConfig:
    """An operator-facing name routed to models (routing/router.py); [tasks.NAME] tables."""

    variants: list[VariantConfig] = field(
        default_factory=list,
        metadata=not_empty('must list at least one {model = "NAME", weight = W}'),
    )
    #: Request parameter (or X-Header, MQTT 5 user property) whose value pins a variant.
    sticky_key: str = field(
        default="",
        metadata=matches(
            r"[A-Za-z][A-Za-z0-9_]{0,63}",
            "must be a parameter name: a letter, then up to 63 letters, digits and '_'",
        ),
    )
    #: Model that answers when the chosen variant fails or its circuit breaker is open.
    fallback: str = field(default="", metadata=name_of("a model", optional=True))
    #: LLM tasks: text with {field} names, filled from the request's `fields`.
    prompt_template: str = field(default="", metadata=valid(template_fields))
    #: Priority level of the task's requests that name none (1 = highest; 0 = the model's
    #: default level).
    priority: int = 0


@dataclass
class PipelineConfig:
    """A pipeline (appliance/pipelines/): a DAG of models and steps served as a model.

    [pipeline_defaults] holds the limits every pipeline gets; [pipelines.NAME] declares one from
    a file (`file`) and may override them. A pipeline stored with `appliance models add NAME
    --pipeline FILE` needs no table; its limits are the defaults or its table's."""

    #: The declaration (NAME.pipeline.json), relative to the working directory; empty for a
    #: pipeline from the model store.
    file: str = ""
    #: Most nodes in the declaration (checked at load).
    max_nodes: int = field(default=64, metadata=between(1, 4096))
    #: Most rows a fan-out node may produce for one request (past it: 400 naming the node).
    max_fan_out: int = field(default=1024, metadata=between(1, 100_000))
    #: Longest a request may take through the whole graph (a client's timeout may shorten it).
    timeout_s: float = field(default=30.0, metadata=above(0))


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    model_defaults: ModelConfig = field(default_factory=ModelConfig)
    #: Raw per-model overrides, merged over model_defaults by `model_config`.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Raw task tables, checked and built by `task_config`.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Guardrails (appliance/guards/config.py): the server-wide default; a [models.NAME.guards]
    #: or [tasks.NAME.guards] table overrides it for one model or task (`guards_for`).
    guards: GuardsConfig = field(default_factory=lambda: GuardsConfig())
    pipeline_defaults: PipelineConfig = field(default_factory=PipelineConfig)
    #: Raw pipeline tables, merged over pipeline_defaults by `pipeline_config`.
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: OpenTelemetry traces (appliance/tracing/config.py); off by default.
    tracing: TracingConfig = field(default_factory=lambda: TracingConfig())

    def task_config(self, name: str) -> TaskConfig:
        """The settings of one task, checked (names, weights, template fields)."""
        _check_table_name("tasks", name, "task name")
        table = {k: v for k, v in self.tasks.get(name, {}).items() if k != "guards"}
        return _build(TaskConfig, table, f"tasks.{name}")

    def model_config(self, name: str) -> ModelConfig:
        """The effective settings of one model: defaults with its [models.NAME] table on top."""
        base = _to_dict(self.model_defaults)
        table = {k: v for k, v in self.models.get(name, {}).items() if k != "guards"}
        return _build(ModelConfig, _merge(base, table), f"models.{name}")

    def guards_for(self, name: str) -> GuardsConfig:
        """The guards of model or task `name`: [guards] with its own guards table on top."""
        section, where = (self.tasks, "tasks") if name in self.tasks else (self.models, "models")
        own = section.get(name, {}).get("guards")
        if own is None:
            return self.guards
        if not isinstance(own, Mapping):
            raise ConfigError(f"{where}.{name}.guards = {own!r}: must be a table")
        return _build(GuardsConfig, _merge(_to_dict(self.guards), own), f"{where}.{name}.guards")

    def pipeline_config(self, name: str) -> PipelineConfig:
        """The settings of one pipeline: the defaults with its [pipelines.NAME] table on top."""
        _check_table_name("pipelines", name, "pipeline name")
        base = _to_dict(self.pipeline_defaults)
        return _build(
            PipelineConfig, _merge(base, self.pipelines.get(name, {})), f"pipelines.{name}"
        )

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


def _check_table_name(section: str, name: str, what: str) -> None:
    """[tasks.NAME] and [models.NAME]: NAME follows the one name rule (appliance/names.py)."""
    problem = names.name_problem(name)
    if problem is not None:
        raise ConfigError(f"{section}.{name}: invalid {what}: {names.rule()} ({problem})")


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
        strings = get_args(tp)[1:] == (str,)  # dict[str, str]: a table of strings
        for key, sub in value.items():
            if strings and not isinstance(sub, str):
                raise ConfigError(f"{where}.{key} = {sub!r}: must be a string")
            if not strings and not isinstance(sub, Mapping):
                raise ConfigError(f"{where}.{key} = {sub!r}: must be a table")
        return dict(value)
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
    _check_constraints(obj, where)
    return obj


def _check_constraints(obj: Any, where: str) -> None:
    """Each field's constraint (its metadata), then the section's own `check()`."""

    def bad(key: str, reason: str, value: Any = None) -> ConfigError:
        shown = getattr(obj, key) if hasattr(obj, key) else value
        return ConfigError(f"{where + '.' if where else ''}{key} = {shown!r}: {reason}")

    for f in dataclasses.fields(obj):
        check = f.metadata.get(_CHECK)
        if check is not None:
            reason = check(getattr(obj, f.name))
            if reason is not None:
                raise bad(f.name, reason)
    section_check = getattr(obj, "check", None)
    if section_check is not None:
        try:
            section_check()
        except Invalid as exc:
            raise bad(exc.key, exc.reason, exc.value) from None


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
        if tp is Config and parts[i] in ("models", "tasks", "pipelines"):
            i += 1  # models.NAME.key: NAME is a model, the rest a ModelConfig
            hint = {"models": ModelConfig, "tasks": TaskConfig}.get(parts[i - 1], PipelineConfig)
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
        _check_table_name("models", name, "model name")
        config.model_config(name)  # validate every per-model table now, not at first use
        config.guards_for(name)
    for name in config.tasks:
        config.task_config(name)
        config.guards_for(name)
    for name in config.pipelines:
        config.pipeline_config(name)
    return config


# The guards' section lives beside their code and uses the constraint helpers above.
from .guards.config import GuardsConfig  # noqa: E402
from .tracing.config import TracingConfig  # noqa: E402
