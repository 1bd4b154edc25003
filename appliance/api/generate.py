"""The Open Inference Protocol's generate extension: `POST /v2/models/{name}[/versions/{v}]/
generate` and `/generate_stream` (server-sent events), for language models, and for tensor
models that take one BYTES input and give a BYTES output (the prompt in, the first element of
that output back: one event, then the end).

The schema is KServe's `generate_rest.yaml` (tests/schemas/generate_rest.yaml): a request is
`{"text_input": str, "parameters": {...}}`, an answer `{"model_name", "model_version",
"text_output"}`. Like Triton, fields beside `text_input` are parameters too (TensorRT-LLM's
examples send `{"text_input": ..., "max_tokens": 20}`); `parameters` wins over them. The
sampling parameters this server knows are checked (a 400 names the field); any other scalar
parameter is passed on (a task's sticky key may be one).

Streaming: each event is `{"text_output": piece, "model_name", "model_version", "done":
false}`, the last one `"done": true` with the `finish_reason`. An error before the first piece
is a plain HTTP error (JSON, with its status); an error after it is one last event
`{"error": "...", "status": N}` in a stream that already said 200 (Triton's convention: a
client must check every event for `error`). Only protocol code lives here: the text runs
through `RequestPath.generate`, which applies the guardrails (streamed text is masked too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from ..codec import InferRequest, json_object
from ..engine import LoadedModel
from ..errors import ApplianceError, InvalidInput
from ..llm import Generation, GenerationResult, TextModel
from ..request import Request, RequestPath
from ..tensors import TensorSpec
from .openai import _SSE_HEADERS, _n_ctx, _sampling, stream_generation
from .openai_structured import BadField

#: The sampling parameters checked here (openai.py's rules, narrowed where the published
#: schema is narrower: at most 512 new tokens, up to 5 stop strings as an array, a frequency
#: penalty of at least 0).
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repeat_penalty",
             "presence_penalty", "frequency_penalty")  # fmt: skip
MAX_STOP = 5
MAX_TOKENS = 512


def _request(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The prompt and the parameters (those beside `text_input`, then `parameters`)."""
    body = json_object(raw)
    text = body.pop("text_input", None)
    if not isinstance(text, str):
        raise BadField("text_input", "a string is required")
    given = body.pop("parameters", None)
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise BadField("parameters", "must be an object")
    params: dict[str, Any] = {}
    for where, source in (("", body), ("parameters.", given)):
        for key, value in source.items():
            if isinstance(value, list) and key == "stop":
                pass
            elif value is not None and not isinstance(value, (str, int, float, bool)):
                raise BadField(where + key, "a parameter must be a string, number or boolean")
            params[key] = value
    return text, params


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if (
        isinstance(value, list)
        and len(value) <= MAX_STOP
        and all(isinstance(s, str) for s in value)
    ):
        return [s for s in value if s]  # an empty string stops nothing
    raise BadField("parameters.stop", f"must be an array of up to {MAX_STOP} strings")


def generation(raw: bytes, n_ctx: int) -> tuple[Generation, dict[str, Any]]:
    """A generate request's body -> the completion to run, and its parameters."""
    text, params = _request(raw)
    stream = params.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadField("parameters.stream", "must be true or false")
    best_of = params.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of not in (0, 1)):
        raise BadField("parameters.best_of", "only 1 is supported")
    known = {k: params[k] for k in _SAMPLING if k in params}
    penalty = known.get("frequency_penalty")
    if isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and penalty < 0:
        raise BadField("parameters.frequency_penalty", f"must be between 0 and 2, got {penalty}")
    try:
        sampling = _sampling(known, min(n_ctx, MAX_TOKENS))
    except BadField as exc:
        raise BadField(f"parameters.{exc.param}", exc.message.partition(": ")[2]) from None
    sampling.stop = _stops(params.get("stop"))
    return Generation("completion", prompt=text, sampling=sampling), params


@dataclass
class _Job:
    name: str
    version: str | None
    gen: Generation
    params: dict[str, Any]
    #: For a tensor model: its BYTES input, and the BYTES output that is the text.
    tensors: tuple[TensorSpec, str] | None


def _text_tensors(model: LoadedModel, name: str) -> tuple[TensorSpec, str]:
    """A tensor model generates text when it takes one BYTES input and gives a BYTES output."""
    sig = model.signature
    outs = [o.name for o in sig.outputs if o.datatype == "BYTES"]
    if len(sig.inputs) != 1 or sig.inputs[0].datatype != "BYTES" or not outs:
        raise InvalidInput(
            f"model {name!r} is neither a language model nor a model with one BYTES input and "
            "a BYTES output: it cannot generate text (use /infer)"
        )
    return sig.inputs[0], outs[0]


async def _start(request: web.Request, paths: RequestPath) -> _Job:
    """404 for an unknown model or version (a task has none), 400 for one that makes no
    text, then the body."""
    name, version = request.match_info["name"], request.match_info.get("version")
    model = paths.router.resolve(name, version)
    backend = model.backend
    if isinstance(backend, TextModel):
        if backend.mode != "chat":
            raise InvalidInput(f"model {name!r} is an embedding model: it generates no text")
        gen, params = generation(await request.read(), _n_ctx(backend))
        return _Job(name, version, gen, params, None)
    tensors = _text_tensors(model, name)
    gen, params = generation(await request.read(), MAX_TOKENS)
    return _Job(name, version, gen, params, tensors)


async def _tensor_text(paths: RequestPath, req: Request, job: _Job) -> tuple[str, str]:
    """Run the prompt through a text-in, text-out tensor model: (its version, the text). The
    parameters beside the sampling ones go to the model as request parameters."""
    assert job.tensors is not None
    spec, output = job.tensors
    array = np.empty((1,) * max(1, len(spec.shape)), dtype=object)
    array.flat[0] = job.gen.prompt.encode("utf-8")
    known = {*_SAMPLING, "stop", "stream", "best_of", "format"}
    body = InferRequest(
        {spec.name: array},
        outputs={output: False},
        parameters={k: v for k, v in job.params.items() if k not in known and v is not None},
        datatypes={spec.name: "BYTES"},
    )
    result = await paths.infer(req, job.name, job.version, body)
    if not req.served.model:
        req.served.model, req.served.version = result.model_name, result.model_version
    value = result.outputs[output].reshape(-1)
    if not len(value):
        return result.model_version, ""
    item = value[0]
    text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
    return result.model_version, text


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _json(out: dict[str, Any], req: Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(out), content_type="application/json", headers=req.served.headers()
    )


async def generate(request: web.Request, paths: RequestPath, req: Request) -> web.Response:
    job = await _start(request, paths)
    name = job.name
    if job.tensors is not None:
        version, text = await _tensor_text(paths, req, job)
        return _json({"model_name": name, "model_version": version, "text_output": text}, req)
    model, result = await paths.generate(req, name, job.gen, job.params)
    out = {
        "model_name": name,
        "model_version": model.version,
        "text_output": result.text,
        "finish_reason": _finish(result),
        "usage": {"prompt_tokens": result.prompt_tokens,
                  "completion_tokens": result.completion_tokens},
    }  # fmt: skip
    return _json(out, req)


def error_event(exc: ApplianceError) -> dict[str, Any]:
    """An error after the stream started (its status is already 200)."""
    return {"error": exc.message, "status": exc.status}


async def generate_stream(
    request: web.Request, paths: RequestPath, req: Request
) -> web.StreamResponse:
    job = await _start(request, paths)
    name, served = job.name, req.served

    def event(text: str, done: bool) -> dict[str, Any]:
        return {"text_output": text, "model_name": name, "model_version": served.version,
                "done": done}  # fmt: skip

    if job.tensors is not None:  # the whole text at once: one event, then the end
        served.version, text = await _tensor_text(paths, req, job)
        response = web.StreamResponse(headers={**_SSE_HEADERS, **served.headers()})
        await response.prepare(request)
        for e in (event(text, False), event("", True)):
            await response.write(b"data: " + orjson.dumps(e) + b"\n\n")
        await response.write_eof()
        return response

    def last(result: GenerationResult) -> dict[str, Any]:
        return {**event("", True), "finish_reason": _finish(result)}

    return await stream_generation(
        request, paths, req, name, job.gen, job.params, False,
        first=None,
        piece=lambda text: [event(text, False)],
        last=last,
        usage_chunk=lambda usage: {},
        error=error_event,
        done=None,
    )  # fmt: skip


__all__ = ["error_event", "generate", "generate_stream", "generation"]
