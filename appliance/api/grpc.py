"""KServe v2 / Open Inference Protocol over gRPC (grpc.aio), on the HTTP server's event loop and
engine: what tritonclient.grpc calls, with Triton's additions clients use (ModelStreamInfer,
ModelConfig, ModelStatistics, the repository RPCs).

A front like the others: its codec is api/grpc_codec.py, its status mapping is `code_of`, and
every RPC goes through the request path (begin, admit, infer, finish). Requests are read as
bytes and parsed here, so a message that is not protobuf is answered INVALID_ARGUMENT (grpcio
would answer INTERNAL). Metadata carries what HTTP headers carry: `authorization: Bearer ...`,
`x-request-id`, `traceparent`, `x-request-timeout-ms`, `x-request-priority`, a task's sticky
key; the gRPC deadline is the request's timeout. The request id comes back in the trailing
metadata (`x-request-id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from .. import __version__
from ..config import Config
from ..engine import LoadedModel
from ..errors import ApplianceError, ConfigError, InferenceFailed, InvalidInput, ModelError
from ..formats import JSON
from ..metrics import ModelStats
from ..registry import Registry, check_name
from ..request import Request, RequestPath
from . import auth as auth_mod
from .auth import Auth, client_address
from .grpc_codec import decode_infer, encode_infer
from .http_parts import PRIORITY_HEADER, TIMEOUT_HEADER
from .oip import grpc_service_pb2 as pb
from .oip import model_config_pb2 as mc
from .routes import Scope

log = logging.getLogger("appliance.grpc")

SERVICE = "inference.GRPCInferenceService"
#: RPCs that need no bearer token (health checks), like HTTP's /v2/health routes.
PUBLIC = frozenset({"ServerLive", "ServerReady"})
#: RPCs that need the admin scope, like HTTP's repository routes; the others need infer.
ADMIN = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})


def rpc_scope(rpc: str) -> Scope:
    return "public" if rpc in PUBLIC else "admin" if rpc in ADMIN else "infer"


EXTENSIONS = ["model_repository", "statistics"]
#: Counted (never sent) for an RPC whose client went away or whose deadline passed first.
CLIENT_GONE = 499
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    406: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_TIMEOUT = TIMEOUT_HEADER.lower()
_PRIORITY = PRIORITY_HEADER.lower()
_DATA_TYPES = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64, "BYTES": mc.TYPE_STRING,
}  # fmt: skip
M = TypeVar("M", bound=Message)


def _trailer(paths: RequestPath, req: Request) -> list[tuple[str, str]]:
    """What an answer's trailing metadata carries back: the request id, and a traced
    request's traceparent (its own span)."""
    out = [("x-request-id", req.id)]
    parent = paths.reply_traceparent(req)
    if parent is not None:
        out.append(("traceparent", parent))
    return out


def code_of(status: int) -> grpc.StatusCode:
    """The one status mapping of this front: an error's HTTP status as a gRPC code."""
    code = _CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


class _Metadata(dict[str, str]):
    """gRPC metadata keys are lower case; lookups by header name (`X-Device-Id`) work too."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


def _parse(kind: type[M], raw: bytes) -> M:
    try:
        return kind.FromString(raw)
    except DecodeError as exc:
        raise InvalidInput(f"the request is not a valid {kind.__name__} message: {exc}") from None


def _model_of(msg: Message) -> str:
    for field in ("model_name", "name"):
        value = getattr(msg, field, None)
        if isinstance(value, str):
            return value
    return ""


Handler = Callable[[Request, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]


class GrpcService:
    """The RPCs of inference.GRPCInferenceService over the request path."""

    def __init__(
        self, paths: RequestPath, auth: Auth, store: Registry | None, max_stream_inflight: int
    ) -> None:
        self.paths = paths
        self.router = paths.router
        self.engine = paths.engine
        self.auth = auth
        self.store = store
        self.max_stream_inflight = max_stream_inflight

    # -- plumbing ----------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, tuple[type[Message], Handler]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.model_load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.model_unload),
        }
        serialize = operator.methodcaller("SerializeToString")
        methods: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                self._unary(name, kind, fn), response_serializer=serialize
            )
            for name, (kind, fn) in unary.items()
        }
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, response_serializer=serialize
        )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _check(
        self, rpc: str, meta: _Metadata, context: grpc.aio.ServicerContext[Any, Any]
    ) -> str | None:
        """The bearer token in the `authorization` metadata grants this RPC's scope: its name."""
        if not self.auth.enabled:
            return None
        peer = client_address(context.peer())
        return self.auth.check(meta.get("authorization"), rpc_scope(rpc), peer)

    def _begin(self, rpc: str, meta: _Metadata, context: grpc.aio.ServicerContext[Any, Any]
               ) -> Request:  # fmt: skip
        remaining = context.time_remaining()
        return self.paths.begin(
            "grpc", "RPC", rpc, rpc,
            request_id=meta.get("x-request-id"),
            traceparent=meta.get("traceparent"),
            tracestate=meta.get("tracestate"),
            remote=context.peer(),
            meta=meta,
            timeout_ms=meta.get(_TIMEOUT),
            priority=meta.get(_PRIORITY),
            # the deadline: what is left of it when the request starts (never 0: that is none)
            expiry_s=None if remaining is None else max(remaining, 1e-6),
            timeout_name=f"metadata {_TIMEOUT!r}",
            priority_name=f"metadata {_PRIORITY!r}",
            format_name="parameters.format",
        )  # fmt: skip

    def _unary(
        self, rpc: str, kind: type[Message], fn: Handler
    ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]:
        paths = self.paths

        async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            meta = _Metadata(context.invocation_metadata() or ())
            req = self._begin(rpc, meta, context)
            error: ApplianceError
            try:
                req.token_name = self._check(rpc, meta, context)
                msg = _parse(kind, raw)
                model = _model_of(msg)
                if model:
                    req.path = f"{rpc}/{model}"
                out = await fn(req, msg, context)
            except ApplianceError as exc:
                paths.failed(req, exc)
                error = exc
            except asyncio.CancelledError:  # the client left, or its deadline passed
                paths.finish(req, CLIENT_GONE)
                raise
            except Exception:
                paths.crashed(req)
                error = InferenceFailed("internal server error")
            else:
                context.set_trailing_metadata(_trailer(paths, req))
                paths.finish(req, 200)
                return out
            paths.finish(req, error.status)
            trailer = _trailer(paths, req)
            if error.retry_after is not None:
                trailer.append(("retry-after", str(max(1, round(error.retry_after)))))
            await context.abort(code_of(error.status), error.message, tuple(trailer))
            raise AssertionError("context.abort returned")  # pragma: no cover

        return handle

    # -- health and metadata -----------------------------------------------------------------
    async def server_live(self, req: Request, msg: pb.ServerLiveRequest, context: Any) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, req: Request, msg: Any, context: Any) -> Message:
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def model_ready(self, req: Request, msg: pb.ModelReadyRequest, context: Any) -> Message:
        """Not ready (rather than an error) for an unknown model, as tritonclient expects."""
        try:
            model = self.router.model_of(msg.name, msg.version or None)
            self.engine.ready_model(model.name, model.version)
        except ApplianceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, req: Request, msg: Any, context: Any) -> Message:
        return pb.ServerMetadataResponse(
            name="appliance", version=__version__, extensions=EXTENSIONS
        )

    def _model(self, name: str, version: str) -> LoadedModel:
        return self.router.model_of(name, version or None)

    async def model_metadata(
        self, req: Request, msg: pb.ModelMetadataRequest, context: Any
    ) -> Message:
        meta = self.engine.describe(self._model(msg.name, msg.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=msg.name,  # a task's own name, as over HTTP
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_config(self, req: Request, msg: pb.ModelConfigRequest, context: Any) -> Message:
        """Triton's model configuration, as far as it describes this model: full shapes with
        max_batch_size 0 (a dynamic first dimension is -1), platform and tensors."""
        model = self._model(msg.name, msg.version)
        sig = model.signature
        config = mc.ModelConfig(
            name=msg.name,
            platform=model.platform,
            backend=model.source.manifest.backend,
            max_batch_size=0,
            input=[
                mc.ModelInput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=t.shape)
                for t in sig.inputs
            ],
            output=[
                mc.ModelOutput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=t.shape)
                for t in sig.outputs
            ],
        )
        return pb.ModelConfigResponse(config=config)

    async def model_statistics(
        self, req: Request, msg: pb.ModelStatisticsRequest, context: Any
    ) -> Message:
        """Counts and cumulative times since start, per served model (all of them when no
        name is given); an unknown name is NOT_FOUND."""
        models = [self._model(msg.name, msg.version)] if msg.name else self.engine.models()
        out = pb.ModelStatisticsResponse()
        for model in models:
            stats = self.paths.metrics.stats_of(model.name, model.version)
            out.model_stats.append(_statistics(model, stats))
        return out

    # -- repository --------------------------------------------------------------------------
    async def repository_index(
        self, req: Request, msg: pb.RepositoryIndexRequest, context: Any
    ) -> Message:
        out = pb.RepositoryIndexResponse()
        for m in self.engine.models():
            if msg.ready and m.status != "ready":
                continue
            out.models.add(name=m.name, version=m.version, state=m.status.upper(),
                           reason=m.reason or "")  # fmt: skip
        return out

    async def model_load(
        self, req: Request, msg: pb.RepositoryModelLoadRequest, context: Any
    ) -> Message:
        """Serve a stored version (the active one, or parameters["version"]) in place of the
        one serving, with no gap for clients: HTTP's repository load."""
        if self.store is None:
            raise InvalidInput(
                "this server serves model files named on its command line, not a model store: "
                "there is nothing to load from"
            )
        for key in msg.parameters:
            if key != "version":  # Triton's `config` and `file:` overrides
                raise InvalidInput(
                    f"parameters[{key[:40]!r}]: only 'version' is taken; a model's files and "
                    "settings come from the model store and the config"
                )
        version = None
        if "version" in msg.parameters:
            param = msg.parameters["version"]
            which = param.WhichOneof("parameter_choice")
            if which not in ("string_param", "int64_param"):
                raise InvalidInput('parameters["version"] must be a string (or an integer)')
            version = str(getattr(param, which))
        try:
            check_name(msg.model_name, "model name")
            if version is not None:
                check_name(version, "version")
        except ModelError as exc:
            raise InvalidInput(exc.message) from None
        await self.engine.activate_stored(self.store, msg.model_name, version)
        return pb.RepositoryModelLoadResponse()

    async def model_unload(
        self, req: Request, msg: pb.RepositoryModelUnloadRequest, context: Any
    ) -> Message:
        await self.engine.unload(msg.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference ---------------------------------------------------------------------------
    async def model_infer(self, req: Request, msg: pb.ModelInferRequest, context: Any) -> Message:
        return await self._infer(req, msg)

    async def _infer(self, req: Request, msg: pb.ModelInferRequest) -> pb.ModelInferResponse:
        paths = self.paths
        name, version = msg.model_name, msg.model_version or None
        paths.admit(req, name, version)  # 404/503 before decoding
        body = decode_infer(msg)
        fmt = body.parameters.pop("format", JSON)
        if fmt != JSON:
            raise InvalidInput(
                f"parameters.format {str(fmt)[:40]!r}: gRPC answers are tensors; ask for other "
                "formats over HTTP"
            )
        result = await paths.infer(req, name, version, body)
        return encode_infer(result)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: one answer per request, in request order; a failed
        request is an answer with `error_message` and the stream goes on. Up to
        max_stream_inflight requests are worked on at once; beyond that the stream is not read
        (HTTP/2 flow control holds the client back)."""
        meta = _Metadata(context.invocation_metadata() or ())
        token: str | None = None
        try:
            token = self._check("ModelStreamInfer", meta, context)
        except ApplianceError as exc:
            await context.abort(code_of(exc.status), exc.message)
        pending: asyncio.Queue[asyncio.Future[pb.ModelStreamInferResponse] | None]
        pending = asyncio.Queue(self.max_stream_inflight)

        async def read() -> None:
            with contextlib.suppress(Exception):  # the client went away: answer what came
                async for raw in requests:
                    await pending.put(
                        asyncio.ensure_future(self._stream_one(raw, meta, context, token))
                    )
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(
        self,
        raw: bytes,
        meta: _Metadata,
        context: grpc.aio.ServicerContext[Any, Any],
        token: str | None,
    ) -> pb.ModelStreamInferResponse:
        paths = self.paths
        req = self._begin("ModelStreamInfer", meta, context)
        req.token_name = token
        msg: pb.ModelInferRequest | None = None
        try:
            msg = _parse(pb.ModelInferRequest, raw)
            req.path = f"ModelStreamInfer/{msg.model_name}"
            with req.bound():
                out = await self._infer(req, msg)
        except ApplianceError as exc:
            status = paths.failed(req, exc)
            paths.finish(req, status)
            answer = pb.ModelStreamInferResponse(error_message=exc.message)
            if msg is not None:
                answer.infer_response.model_name = msg.model_name
                answer.infer_response.model_version = msg.model_version
                answer.infer_response.id = msg.id
            return answer
        except asyncio.CancelledError:
            paths.finish(req, CLIENT_GONE)
            raise
        except Exception:
            paths.crashed(req)
            paths.finish(req, 500)
            return pb.ModelStreamInferResponse(error_message="internal server error")
        paths.finish(req, 200)
        return pb.ModelStreamInferResponse(infer_response=out)


def _statistics(model: LoadedModel, stats: ModelStats | None) -> pb.ModelStatistics:
    out = pb.ModelStatistics(name=model.name, version=model.version)
    if stats is None:
        return out
    ok = stats.outcomes["success"]
    failed = sum(n for key, n in stats.outcomes.items() if key not in ("success", "cancelled"))
    computed = sum(stats.compute.counts)
    out.inference_count = ok
    out.execution_count = computed
    s = out.inference_stats
    s.success.count, s.success.ns = ok, round(stats.total.sum * 1e9)
    s.fail.count = failed
    s.queue.count, s.queue.ns = sum(stats.queue.counts), round(stats.queue.sum * 1e9)
    s.compute_infer.count, s.compute_infer.ns = computed, round(stats.compute.sum * 1e9)
    return out


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} = {path!r}: cannot read: {exc.strerror}") from None


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    """grpc.cert_file's TLS, else server.tls_cert's (`serve --tls-cert` covers both fronts);
    with a client CA, client certificates are required (mTLS)."""
    cfg, server = config.grpc, config.server
    if cfg.cert_file:
        files = {"cert_file": cfg.cert_file, "key_file": cfg.key_file,
                 "client_ca_file": cfg.client_ca_file}  # fmt: skip
        section = "grpc"
    elif server.tls_cert:
        files = {"tls_cert": server.tls_cert, "tls_key": server.tls_key,
                 "tls_client_ca": server.tls_client_ca}  # fmt: skip
        section = "server"
    else:
        return None
    cert, key, client_ca = (files[k] for k in files)
    keys = list(files)
    pair = (_read(key, f"{section}.{keys[1]}"), _read(cert, f"{section}.{keys[0]}"))
    ca = _read(client_ca, f"{section}.{keys[2]}") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)  # fmt: skip


class GrpcServer:
    """A started gRPC server: its bound port, and the graceful stop."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)


async def start(
    config: Config, paths: RequestPath, store: Registry | None, auth: Auth | None = None
) -> GrpcServer:
    """Serve gRPC on config.grpc's address, on the running event loop; `auth`: the HTTP
    fronts' (one failed-attempt count per client for every front)."""
    cfg = config.grpc
    limit = cfg.max_message_bytes
    options: Iterable[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not shared
    ]
    server = grpc.aio.server(options=list(options))
    auth = auth or auth_mod.from_config(config)
    service = GrpcService(paths, auth, store, cfg.max_stream_inflight)
    server.add_generic_rpc_handlers((service.handler(),))
    host = cfg.host or config.server.host
    address = f"[{host}]:{cfg.port}" if ":" in host else f"{host}:{cfg.port}"
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"grpc.port = {cfg.port}: cannot listen on {address}: {exc}") from None
    await server.start()
    if host not in ("127.0.0.1", "localhost", "::1") and not auth.enabled:
        log.warning("gRPC on %s without a bearer token: anyone on the network can call it", host)
    log.info(
        "serving gRPC on %s%s",
        address,
        " (TLS)" if credentials is not None else "",
        extra={"fields": {"grpc_port": port}},
    )
    return GrpcServer(server, port)
