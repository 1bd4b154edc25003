"""The KServe v2 HTTP surface over real loopback HTTP, with the real ONNX runtime."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.registry import Registry

X = [[1.0, -2.0, 3.5], [0.0, 4.0, -1.0]]
Y = [[1, 2, 3], [4, 5, 6]]
PIX = [[[0, 10], [20, 30]], [[255, 255], [0, 1]]]


def multi_io_request(**extra):
    return {
        "id": "req-1",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X},
            {"name": "y", "datatype": "INT64", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
            {"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 2], "data": PIX},
        ],
        **extra,
    }


def reference(samples: Path, name: str, feed: dict) -> dict:
    session = ort.InferenceSession(
        str(samples / f"{name}.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


async def test_health_metadata_and_readiness(serve):
    client = await serve()
    assert (await client.get("/v2/health/live")).status == 200
    r = await client.get("/v2/health/ready")
    assert r.status == 200
    assert (await r.json())["models"]["multi_io"] == {
        "version": "1",
        "status": "ready",
        "device": "cpu",
    }
    r = await client.get("/v2/models/multi_io/ready")
    assert (await r.json())["device"] == "cpu"
    meta = await (await client.get("/v2")).json()
    assert meta["name"] == "appliance" and "binary_tensor_data" in meta["extensions"]
    r = await client.get("/v2/models/multi_io")
    body = await r.json()
    assert r.status == 200
    assert body["name"] == "multi_io" and body["versions"] == ["1"]
    assert body["platform"] == "onnxruntime_onnx"
    assert body["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "y", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, 2, 2]},
    ]
    assert [o["name"] for o in body["outputs"]] == ["sum", "y_times_2", "x_positive", "pixel_mean"]
    assert body["parameters"]["device"] == "cpu"
    assert (await client.get("/v2/models/multi_io/versions/1")).status == 200
    assert (await client.get("/v2/models/multi_io/ready")).status == 200
    assert (await client.get("/v2/models/multi_io/versions/1/ready")).status == 200
    index = await (await client.post("/v2/repository/index")).json()
    assert {(m["name"], m["state"]) for m in index} >= {("sample", "READY"), ("multi_io", "READY")}


async def test_infer_json_matches_onnxruntime(serve, samples):
    client = await serve()
    r = await client.post("/v2/models/multi_io/infer", json=multi_io_request())
    assert r.status == 200, await r.text()
    assert r.content_type == "application/json"
    body = await r.json()
    assert body["model_name"] == "multi_io" and body["model_version"] == "1"
    assert body["id"] == "req-1"
    ref = reference(
        samples,
        "multi_io",
        {
            "x": np.array(X, np.float32),
            "y": np.array(Y, np.int64),
            "pixels": np.array(PIX, np.uint8),
        },
    )
    outs = {o["name"]: o for o in body["outputs"]}
    assert list(outs) == ["sum", "y_times_2", "x_positive", "pixel_mean"]
    for name, want in ref.items():
        got = outs[name]
        assert got["shape"] == list(want.shape)
        assert np.array_equal(np.array(got["data"]).reshape(want.shape), want), name
    assert outs["sum"]["datatype"] == "FP32"
    assert outs["y_times_2"]["datatype"] == "INT64"
    assert outs["x_positive"]["datatype"] == "BOOL"
    assert outs["pixel_mean"]["datatype"] == "INT32"


async def test_infer_requested_outputs_and_version_route(serve):
    client = await serve()
    req = multi_io_request(outputs=[{"name": "pixel_mean"}, {"name": "sum"}])
    r = await client.post("/v2/models/multi_io/versions/1/infer", json=req)
    body = await r.json()
    assert r.status == 200
    assert [o["name"] for o in body["outputs"]] == ["pixel_mean", "sum"]


async def test_infer_binary_request_and_response(serve, samples):
    client = await serve()
    x = np.array(X, np.float32)
    y = np.array(Y, np.int64)
    pix = np.array(PIX, np.uint8)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": x.nbytes},
                },
                {
                    "name": "y",
                    "datatype": "INT64",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": y.nbytes},
                },
                {"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 2], "data": PIX},
            ],
            "outputs": [
                {"name": "sum", "parameters": {"binary_data": True}},
                {"name": "y_times_2", "parameters": {"binary_data": False}},
            ],
        }
    )
    body = header + x.tobytes() + y.tobytes()
    r = await client.post(
        "/v2/models/multi_io/infer",
        data=body,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    raw = await r.read()
    assert r.status == 200, raw
    hlen = int(r.headers["Inference-Header-Content-Length"])
    head = orjson.loads(raw[:hlen])
    outs = {o["name"]: o for o in head["outputs"]}
    size = outs["sum"]["parameters"]["binary_data_size"]
    got_sum = np.frombuffer(raw[hlen : hlen + size], np.float32).reshape(outs["sum"]["shape"])
    ref = reference(samples, "multi_io", {"x": x, "y": y, "pixels": pix})
    assert np.array_equal(got_sum, ref["sum"])
    assert outs["y_times_2"]["data"] == ref["y_times_2"].reshape(-1).tolist()
    assert len(raw) == hlen + size


async def test_bytes_and_fp16_models(serve):
    client = await serve()
    r = await client.post(
        "/v2/models/strings/infer",
        json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["héllo", "x"]}]
        },
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["outputs"][0]["data"] == ["héllo", "x"]
    # binary BYTES: 4-byte little-endian length, then the bytes, per element
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b""))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    r = await client.post(
        "/v2/models/strings/infer",
        data=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    raw = await r.read()
    assert r.status == 200, raw
    hlen = int(r.headers["Inference-Header-Content-Length"])
    assert raw[hlen:] == blob
    r = await client.post(
        "/v2/models/fp16/infer",
        json={"inputs": [{"name": "a", "datatype": "FP16", "shape": [1, 2], "data": [1.5, -2]}]},
    )
    body = await r.json()
    assert r.status == 200, body
    assert body["outputs"][0]["datatype"] == "FP16"
    assert body["outputs"][0]["data"] == [3.0, -4.0]


def _bad(**override):
    req = multi_io_request()
    for index, patch in override.items():
        req["inputs"][int(index[1:])].update(patch)
    return req


BAD_REQUESTS = [
    # (description, body bytes, headers, expected status, fragment of the error)
    ("malformed json", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("not an object", b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    (
        "wrong datatype",
        orjson.dumps(_bad(i0={"datatype": "INT64", "data": [1] * 6})),
        {},
        400,
        "expects datatype FP32",
    ),
    ("unknown datatype", orjson.dumps(_bad(i0={"datatype": "FLOAT"})), {}, 400, "unknown datatype"),
    ("wrong shape", orjson.dumps(_bad(i0={"shape": [3, 2]})), {}, 400, "does not match"),
    ("wrong rank", orjson.dumps(_bad(i0={"shape": [6]})), {}, 400, "does not match"),
    ("data length", orjson.dumps(_bad(i0={"data": [1.0, 2.0]})), {}, 400, "needs 6"),
    (
        "string in floats",
        orjson.dumps(_bad(i0={"data": [1, 2, 3, 4, 5, "a"]})),
        {},
        400,
        "must be numbers",
    ),
    (
        "float in ints",
        orjson.dumps(_bad(i1={"data": [1, 2, 3, 4, 5, 6.5]})),
        {},
        400,
        "must be integers",
    ),
    ("uint8 overflow", orjson.dumps(_bad(i2={"data": [300] * 8})), {}, 400, "out of range"),
    (
        "ragged nested",
        orjson.dumps(_bad(i0={"data": [[1, 2, 3], [4, 5]]})),
        {},
        400,
        "regular array",
    ),
    ("negative dim", orjson.dumps(_bad(i0={"shape": [-1, 3]})), {}, 400, "non-negative"),
    (
        "missing input",
        orjson.dumps({"inputs": multi_io_request()["inputs"][:2]}),
        {},
        400,
        "missing input 'pixels'",
    ),
    (
        "unknown input",
        orjson.dumps(
            {
                "inputs": [
                    *multi_io_request()["inputs"],
                    {"name": "z", "datatype": "FP32", "shape": [1], "data": [1]},
                ]
            }
        ),
        {},
        400,
        "unknown input 'z'",
    ),
    (
        "duplicate input",
        orjson.dumps({"inputs": [*multi_io_request()["inputs"], multi_io_request()["inputs"][0]]}),
        {},
        400,
        "more than once",
    ),
    (
        "unknown output",
        orjson.dumps(multi_io_request(outputs=[{"name": "nope"}])),
        {},
        400,
        "unknown output 'nope'",
    ),
    ("null data", orjson.dumps(_bad(i0={"data": None})), {}, 400, "must be a JSON array"),
    (
        "no data",
        orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}),
        {},
        400,
        "needs 'data' or parameters.binary_data_size",
    ),
    (
        "bad header length",
        orjson.dumps(multi_io_request()),
        {"Inference-Header-Content-Length": "x"},
        400,
        "must be an integer",
    ),
    (
        "header length past end",
        orjson.dumps(multi_io_request()),
        {"Inference-Header-Content-Length": "100000"},
        400,
        "body has",
    ),
    (
        "binary section too long",
        orjson.dumps(multi_io_request()) + b"\0\0\0\0",
        {"Inference-Header-Content-Length": str(len(orjson.dumps(multi_io_request())))},
        400,
        "binary section has 4 bytes",
    ),
    ("non-utf8 json", b'{"inputs": "\xff"}', {}, 400, "malformed JSON"),
    (
        "NaN literal",
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
        {},
        400,
        "malformed JSON",
    ),
]


@pytest.mark.parametrize(
    ("what", "body", "headers", "status", "fragment"),
    BAD_REQUESTS,
    ids=[b[0] for b in BAD_REQUESTS],
)
async def test_bad_input_gets_4xx_and_server_keeps_serving(
    serve, what, body, headers, status, fragment
):
    client = await serve()
    r = await client.post("/v2/models/multi_io/infer", data=body, headers=headers)
    assert r.status == status, await r.text()
    assert r.content_type == "application/json"
    err = (await r.json())["error"]
    assert fragment in err, err
    ok = await client.post("/v2/models/multi_io/infer", json=multi_io_request())
    assert ok.status == 200


def _binary_request(declared: int, actual: bytes) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    )
    return header + actual, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("declared", "actual", "fragment"),
    [
        (16, b"\0" * 8, "runs past the end"),  # binary section shorter than declared
        (16, b"\0" * 20, "binary section has 20 bytes"),  # longer than declared
        (12, b"\0" * 12, "needs 16"),  # size does not fit the shape
        (16, np.array([1, np.nan, 0, 0], np.float32).tobytes(), "NaN or infinity"),
        (16, np.array([1, np.inf, 0, 0], np.float32).tobytes(), "NaN or infinity"),
    ],
)
async def test_bad_binary_sections(serve, declared, actual, fragment):
    client = await serve()
    body, headers = _binary_request(declared, actual)
    r = await client.post("/v2/models/sample/infer", data=body, headers=headers)
    assert r.status == 400
    assert fragment in (await r.json())["error"]
    good, headers = _binary_request(16, np.ones(4, np.float32).tobytes())
    assert (await client.post("/v2/models/sample/infer", data=good, headers=headers)).status == 200


async def test_non_finite_allowed_when_configured(serve):
    client = await serve({"models": {"sample": {"allow_non_finite": True}}})
    body, headers = _binary_request(16, np.array([1, np.nan, 0, 0], np.float32).tobytes())
    r = await client.post("/v2/models/sample/infer", data=body, headers=headers)
    assert r.status == 200


async def test_unknown_model_version_and_route(serve):
    client = await serve()
    r = await client.post("/v2/models/nope/infer", json=multi_io_request())
    assert r.status == 404 and "unknown model 'nope'" in (await r.json())["error"]
    r = await client.post("/v2/models/multi_io/versions/7/infer", json=multi_io_request())
    assert r.status == 404 and "no version '7'" in (await r.json())["error"]
    assert (await client.get("/v2/models/nope")).status == 404
    assert (await client.get("/v2/models/multi_io/versions/7/ready")).status == 404
    r = await client.get("/v2/nothing/here")
    assert r.status == 404 and r.content_type == "application/json"
    r = await client.get("/v2/models/multi_io/infer")
    assert r.status == 405 and r.content_type == "application/json"


async def test_body_over_limit_is_413(serve):
    client = await serve({"server": {"max_body_bytes": 2048}})
    big = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [300, 4], "data": [0.5] * 1200}]}
    )
    assert len(big) > 2048
    r = await client.post("/v2/models/sample/infer", data=big)
    assert r.status == 413
    assert "limit of 2048 bytes" in (await r.json())["error"]

    async def chunks():  # no Content-Length: aiohttp's own limit applies while reading
        yield big[:1000]
        yield big[1000:]

    r = await client.post("/v2/models/sample/infer", data=chunks())
    assert r.status == 413
    assert r.content_type == "application/json"
    ok = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    assert (await client.post("/v2/models/sample/infer", json=ok)).status == 200


async def test_bearer_token(serve):
    client = await serve({"server": {"auth_token": "s3cret"}})
    assert (await client.get("/v2/health/live")).status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    r = await client.get("/v2/models/sample")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get("/metrics")).status == 401
    bad = {"Authorization": "Bearer wrong"}
    assert (await client.get("/v2/models/sample", headers=bad)).status == 401
    good = {"Authorization": "Bearer s3cret"}
    assert (await client.get("/v2/models/sample", headers=good)).status == 200
    assert (await client.get("/metrics", headers=good)).status == 200


async def test_request_id_and_traceparent_are_logged(serve, caplog):
    client = await serve()
    caplog.set_level("INFO", logger="appliance.access")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = await client.get(
        "/v2/models/sample",
        headers={"X-Request-Id": "abc-123", "traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert r.headers["X-Request-Id"] == "abc-123"
    r2 = await client.get("/v2/models/sample", headers={"X-Request-Id": "bad id\twith spaces"})
    generated = r2.headers["X-Request-Id"]
    assert generated != "bad id\twith spaces" and len(generated) == 32
    from appliance.logs import JsonFormatter

    fmt = JsonFormatter()
    lines = [
        orjson.loads(fmt.format(rec)) for rec in caplog.records if rec.name == "appliance.access"
    ]
    assert any(x.get("request_id") == "abc-123" and x.get("trace_id") == trace for x in lines)
    assert any(x.get("request_id") == generated for x in lines)


async def test_metrics_count_requests(serve):
    client = await serve()
    ok = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    for _ in range(3):
        assert (await client.post("/v2/models/sample/infer", json=ok)).status == 200
    assert (await client.post("/v2/models/sample/infer", data=b"{")).status == 400
    bad_shape = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
    }
    assert (await client.post("/v2/models/sample/infer", json=bad_shape)).status == 400
    text = await (await client.get("/metrics")).text()
    samples_by_name: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples_by_name.setdefault(s.name, []).append(s)

    def value(name, **labels):
        return sum(
            s.value
            for s in samples_by_name.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("appliance_inference_requests_total", model="sample", outcome="success") == 3
    # a body that fails to decode never reaches the engine; one that fails validation does
    assert value("appliance_inference_requests_total", model="sample", outcome="invalid") == 1
    assert (
        value("appliance_http_responses_total", route="/v2/models/{name}/infer", status="200") == 3
    )
    assert (
        value("appliance_http_responses_total", route="/v2/models/{name}/infer", status="400") == 2
    )
    assert value("appliance_inference_compute_seconds_count", model="sample") == 3
    assert value("appliance_inference_queue_seconds_count", model="sample") == 3
    assert value("appliance_model_ready", model="sample") == 1
    assert value("appliance_model_device_info", model="sample", device="cpu") == 1
    assert value("appliance_model_load_seconds", model="sample") > 0
    assert "appliance_queue_depth" in samples_by_name
    assert "appliance_inflight_requests" in samples_by_name


async def test_tampered_model_is_refused(serve, store: Registry):
    mv = store.active("sample")
    mv.file.chmod(0o644)
    data = bytearray(mv.file.read_bytes())
    data[-1] ^= 0xFF
    mv.file.write_bytes(bytes(data))
    client = await serve()
    r = await client.get("/v2/health/ready")
    assert r.status == 503
    assert "does not match the manifest" in (await r.json())["error"]
    r = await client.get("/v2/models/sample/ready")
    assert r.status == 503
    r = await client.post("/v2/models/sample/infer", json={"inputs": []})
    assert r.status == 503 and "sha256" in (await r.json())["error"]
    # the other models still serve
    assert (await client.post("/v2/models/multi_io/infer", json=multi_io_request())).status == 200
