"""The real runtimes behind `isolation = "process"` answer exactly as they do in-process: ONNX
(every sample datatype, BYTES, large tensors that outgrow the shared memory, concurrent batched
requests), TFLite (quantized models) and GGUF (streamed chat, embeddings)."""

from __future__ import annotations

import asyncio
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import openai
import orjson
import pytest

from appliance.registry import Registry
from appliance.server import sources_from_store
from tests.api.test_http import multi_io_request
from tests.api.test_images import INFER, pictures

ISOLATED = {"model_defaults": {"isolation": "process"}}
MODES: tuple[dict[str, Any], ...] = ({}, ISOLATED)


def strings_binary() -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", "é".encode()))
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [3],
                 "parameters": {"binary_data_size": len(blob)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def sample_binary(rows: int) -> tuple[bytes, dict[str, str]]:
    """Rows of random input for `sample`, tensors in binary both ways."""
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 4],
                        "parameters": {"binary_data_size": len(x)}}],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    return header + x, {"Inference-Header-Content-Length": str(len(header))}


REQUESTS: list[tuple[str, Any]] = [
    ("sample", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                            "data": [1, 2, 3, 4, -1, 0.5, 9, 2]}]}),
    ("multi_io", multi_io_request()),
    ("multi_io", multi_io_request(outputs=[{"name": "pixel_mean"}, {"name": "sum"}])),
    ("strings", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                             "data": ["héllo", "x"]}]}),
    ("strings", strings_binary()),
    ("fp16", {"inputs": [{"name": "a", "datatype": "FP16", "shape": [1, 2], "data": [1.5, -2]}]}),
    ("sample", sample_binary(80_000)),  # 1.3 MB in, 1.6 MB out: more than a segment starts with
    ("sample", sample_binary(3)),
    ("sample", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                            "data": [1, 2, 3]}]}),  # a 400 from the engine's checks
    ("multi_io", {"inputs": [*multi_io_request()["inputs"][:1],
                             {"name": "y", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
                             multi_io_request()["inputs"][2]]}),  # a 400 from the worker's backend
]  # fmt: skip


async def post(client: Any, model: str, request: Any) -> tuple[int, bytes]:
    if isinstance(request, tuple):
        body, headers = request
        data = io.BytesIO(body)  # aiohttp warns about large bytes bodies
        r = await client.post(f"/v2/models/{model}/infer", data=data, headers=headers)
    else:
        r = await client.post(f"/v2/models/{model}/infer", json=request)
    return r.status, await r.read()


async def test_onnx_answers_are_identical(serve) -> None:
    answers = []
    for mode in MODES:
        client = await serve(mode)
        answers.append([await post(client, model, req) for model, req in REQUESTS])
    inproc, isolated = answers
    errors = []
    for (model, _), a, b in zip(REQUESTS, inproc, isolated, strict=True):
        assert a[0] == b[0], (model, a, b)
        if a[0] != 200:  # errors: the same status and message
            assert a[0] == 400 and orjson.loads(a[1])["error"] == orjson.loads(b[1])["error"]
            errors.append(orjson.loads(b[1])["error"])
            continue
        assert a[1] == b[1], model
    assert "so they must be equal" in errors[-1]  # raised by the backend, in the worker


async def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(serve) -> None:
    client = await serve(ISOLATED)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(64)]

    async def one(x: np.ndarray) -> list[float]:
        req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                           "data": x.reshape(-1).tolist()}]}  # fmt: skip
        r = await client.post("/v2/models/sample/infer", json=req)
        assert r.status == 200
        return (await r.json())["outputs"][0]["data"]  # type: ignore[no-any-return]

    got = await asyncio.gather(*(one(x) for x in xs))
    reference = await serve()
    for x, out in zip(xs, got, strict=True):
        req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                           "data": x.reshape(-1).tolist()}]}  # fmt: skip
        r = await reference.post("/v2/models/sample/infer", json=req)
        np.testing.assert_allclose(out, (await r.json())["outputs"][0]["data"], rtol=1e-6)
    metrics = await (await client.get("/metrics")).text()
    assert 'appliance_batch_size_count{model="sample"' in metrics


async def test_tflite_quantized_models_answer_the_same(serve, image_store: Registry) -> None:
    answers = []
    for mode in MODES:
        client = await serve(mode, sources_from_store(image_store.root))
        meta = await (await client.get("/v2/models/tfl_int8")).json()
        ctype, data = pictures()[0]
        r = await client.post(f"{INFER}?top_k=3", data=data, headers={"Content-Type": ctype})
        assert r.status == 200, await r.text()
        spec = meta["inputs"][0]
        size = int(np.prod(spec["shape"][1:]))
        x = {"inputs": [{"name": spec["name"], "datatype": "FP32",
                         "shape": [1, *spec["shape"][1:]], "data": [0.25] * size}]}  # fmt: skip
        q = await client.post("/v2/models/tfl_int8/infer", json=x)
        assert q.status == 200, await q.text()
        answers.append((meta, await r.json(), await q.json()))
    (meta_a, img_a, q_a), (meta_b, img_b, q_b) = answers
    del meta_a["parameters"]["runtime_detail"], meta_b["parameters"]["runtime_detail"]
    assert meta_a == meta_b  # quantization parameters included
    assert img_a == img_b and q_a == q_b


GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1, "max_tokens": 16}
ASK: list[Any] = [{"role": "user", "content": "What is a model store?"}]


async def test_gguf_chat_stream_and_embeddings_answer_the_same(
    serve, store: Registry, gguf_models: Path
) -> None:
    store.add("tiny", gguf_models / "tiny-llama-q8_0.gguf")
    store.add("minilm", gguf_models / "minilm-q8_0.gguf")
    results = []
    for mode in MODES:
        client = await serve(mode)
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
        full = await api.chat.completions.create(model="tiny", messages=ASK, **GREEDY)
        pieces = []
        stream = await api.chat.completions.create(
            model="tiny", messages=ASK, stream=True, **GREEDY
        )
        async for chunk in stream:
            pieces += [c.delta.content or "" for c in chunk.choices]
        emb = await api.embeddings.create(model="minilm", input=["bananas", "a model store"])
        with pytest.raises(openai.BadRequestError):  # the worker's InvalidInput, as a 400
            await api.embeddings.create(model="minilm", input=["x" * 100_000])
        results.append(
            (full.choices[0].message.content, "".join(pieces), [d.embedding for d in emb.data])
        )
    (text_a, stream_a, emb_a), (text_b, stream_b, emb_b) = results
    assert text_a and text_a == text_b and stream_a == stream_b == text_a
    np.testing.assert_allclose(emb_a, emb_b, rtol=1e-5, atol=1e-6)


async def test_a_client_leaving_mid_stream_cancels_the_generation_in_the_worker(
    serve, store: Registry, plugin: None, tmp_path: Path
) -> None:
    f = tmp_path / "ticking.bin"
    f.write_bytes(b"fine")
    store.add("ticking", f, backend="ticking")
    client = await serve(ISOLATED)
    body = {"model": "ticking", "messages": ASK, "stream": True}
    r = await client.post("/v1/chat/completions", json=body)
    await r.content.readline()  # the first event arrived: generation is under way
    r.close()  # the client goes away
    cancelled = 'outcome="cancelled",version="1"} 1.0'
    for _ in range(250):  # the generation would run 10 s if the cancel did not reach it
        if cancelled in await (await client.get("/metrics")).text():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the generation was not cancelled")
    # the channel is clean: the next call gets its own answer
    req = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
    r = await client.post("/v2/models/ticking/infer", json=req)
    assert r.status == 200 and (await r.json())["outputs"][0]["data"] == [2, 4]
