"""KServe v2 over gRPC (api/grpc.py): tritonclient.grpc's sync, asyncio and streaming clients,
with their default settings, against real servers (`appliance serve --grpc-port` in its own
process, or in the test's loop where a test needs a gated model or a token)."""

from __future__ import annotations

import asyncio
import queue
import socket
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from appliance.api.oip import grpc_service_pb2 as pb
from appliance.config import load_config
from appliance.errors import ConfigError
from tests.conftest import SAMPLE_NAMES, start_server_process, stop_server_process
from tests.support.certs import make_pki

TOKEN = "grpc-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def grpc_url(tmp_path_factory, samples):
    from appliance.registry import Registry

    root = tmp_path_factory.mktemp("grpc-store")
    registry = Registry(root)
    for name in SAMPLE_NAMES:
        registry.add(name, samples / f"{name}.onnx")
    port = free_port()
    server = start_server_process(["--models", str(root), "--grpc-port", str(port)])
    assert any('"grpc_port":' in line for line in server.lines)
    yield f"127.0.0.1:{port}"
    assert stop_server_process(server) == 0


@pytest.fixture(scope="module")
def client(grpc_url):
    c = grpcclient.InferenceServerClient(grpc_url)
    yield c
    c.close()


def _multi_io(samples: Path) -> tuple[list[Any], dict[str, Any]]:
    rng = np.random.default_rng(0)
    feed: dict[str, np.ndarray[Any, Any]] = {
        "x": rng.normal(size=(5, 3)).astype(np.float32),
        "y": rng.integers(-100, 100, size=(5, 3)).astype(np.int64),
        "pixels": rng.integers(0, 256, size=(5, 2, 2)).astype(np.uint8),
    }
    types = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8"}
    inputs = []
    for name, arr in feed.items():
        i = grpcclient.InferInput(name, list(arr.shape), types[str(arr.dtype)])
        i.set_data_from_numpy(arr)
        inputs.append(i)
    session = ort.InferenceSession(
        str(samples / "multi_io.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return inputs, dict(zip(names, session.run(None, feed), strict=True))


def _sample_input(rows: int = 1, cols: int = 4) -> grpcclient.InferInput:
    i = grpcclient.InferInput("input", [rows, cols], "FP32")
    i.set_data_from_numpy(np.ones((rows, cols), np.float32))
    return i


def _code(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


# -- the sync client ------------------------------------------------------------------------------
def test_health_metadata_config_statistics(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("multi_io")
    assert client.is_model_ready("multi_io", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "appliance" and "model_repository" in meta.extensions
    model = client.get_model_metadata("multi_io")
    assert [i.name for i in model.inputs] == ["x", "y", "pixels"]
    assert [i.datatype for i in model.inputs] == ["FP32", "INT64", "UINT8"]
    assert model.versions == ["1"] and model.platform == "onnxruntime_onnx"
    config = client.get_model_config("sample").config
    assert config.name == "sample" and config.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [-1, 4])]
    index = client.get_model_repository_index()
    assert {(m.name, m.state) for m in index.models} >= {("sample", "READY"), ("multi_io", "READY")}
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nope")
    assert _code(exc) == "StatusCode.NOT_FOUND"

    before = client.get_inference_statistics("sample").model_stats[0].inference_count
    client.infer("sample", [_sample_input()])
    stats = client.get_inference_statistics("sample").model_stats[0]
    assert stats.inference_count == before + 1
    assert stats.inference_stats.success.count == stats.inference_count
    assert stats.inference_stats.compute_infer.ns > 0
    everything = client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} == set(SAMPLE_NAMES)


def test_infer_matches_onnxruntime(client, samples):
    inputs, want = _multi_io(samples)
    result = client.infer("multi_io", inputs)  # no outputs named: all of them
    for name, expected in want.items():
        got = result.as_numpy(name)
        assert got.dtype == expected.dtype, name
        assert np.array_equal(got, expected), name
    outputs = [grpcclient.InferRequestedOutput("sum")]
    result = client.infer("multi_io", inputs, model_version="1", outputs=outputs, request_id="r7")
    response = result.get_response()
    assert response.id == "r7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["sum"]
    assert np.array_equal(result.as_numpy("sum"), want["sum"])


def test_typed_contents_too(grpc_url, samples):
    """A client that sends typed `contents` (not raw) gets the same answer."""
    _, want = _multi_io(samples)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = rng.integers(-100, 100, size=(5, 3)).astype(np.int64)
    pixels = rng.integers(0, 256, size=(5, 2, 2)).astype(np.uint8)
    msg = pb.ModelInferRequest(model_name="multi_io")
    msg.inputs.add(name="x", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    msg.inputs.add(name="y", datatype="INT64", shape=y.shape).contents.int64_contents.extend(
        y.ravel().tolist()
    )
    msg.inputs.add(
        name="pixels", datatype="UINT8", shape=pixels.shape
    ).contents.uint_contents.extend(pixels.ravel().tolist())
    with grpc.insecure_channel(grpc_url) as channel:
        answer = _raw_infer(channel)(msg)
    outputs = {o.name: (o, raw) for o, raw in zip(answer.outputs, answer.raw_output_contents,
                                                   strict=True)}  # fmt: skip
    for name, expected in want.items():
        tensor, raw = outputs[name]
        got = np.frombuffer(raw, dtype=expected.dtype).reshape(tuple(tensor.shape))
        assert np.array_equal(got, expected), name


def test_bytes_and_fp16(client):
    text = np.array([b"edge", b"appliance", b"", "ünï".encode()], dtype=object)
    i = grpcclient.InferInput("text", [4], "BYTES")
    i.set_data_from_numpy(text)
    assert list(client.infer("strings", [i]).as_numpy("echo")) == list(text)
    a = np.array([[0.5, -1.25]], dtype=np.float16)
    i = grpcclient.InferInput("a", [1, 2], "FP16")
    i.set_data_from_numpy(a)
    got = client.infer("fp16", [i]).as_numpy("doubled")
    assert got.dtype == np.float16 and np.array_equal(got, a * 2)


def test_bad_requests_get_their_codes_and_the_server_goes_on(client, grpc_url):
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sample", [_sample_input(1, 3)])
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT" and "does not match" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [_sample_input()])
    assert _code(exc) == "StatusCode.NOT_FOUND"
    wrong = grpcclient.InferInput("input", [1, 4], "INT32")
    wrong.set_data_from_numpy(np.ones((1, 4), np.int32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sample", [wrong])
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT" and "datatype" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sample", [_sample_input()], headers={"x-request-priority": "high"})
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT" and "x-request-priority" in str(exc.value)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sample", [_sample_input()], parameters={"format": "xml"})
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"

    with grpc.insecure_channel(grpc_url) as channel:
        infer = _raw_infer(channel)
        # raw and typed contents mixed
        msg = pb.ModelInferRequest(model_name="sample")
        msg.inputs.add(name="input", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
            [1, 2, 3, 4]
        )
        msg.raw_input_contents.append(np.ones(4, np.float32).tobytes())
        _expect(infer, msg, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents")
        # raw data of the wrong size
        msg = pb.ModelInferRequest(model_name="sample")
        msg.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        msg.raw_input_contents.append(b"\0" * 15)
        _expect(infer, msg, grpc.StatusCode.INVALID_ARGUMENT, "needs 16")
        # typed contents in the wrong field
        msg = pb.ModelInferRequest(model_name="sample")
        msg.inputs.add(name="input", datatype="FP32", shape=[1, 4]).contents.int_contents.extend(
            [1, 2, 3, 4]
        )
        _expect(infer, msg, grpc.StatusCode.INVALID_ARGUMENT, "fp32_contents")
        # BYTES elements that run past their data
        msg = pb.ModelInferRequest(model_name="strings")
        msg.inputs.add(name="text", datatype="BYTES", shape=[1])
        msg.raw_input_contents.append(b"\x09\0\0\0abc")
        _expect(infer, msg, grpc.StatusCode.INVALID_ARGUMENT, "runs past")
        # not a protobuf message at all
        garbage = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            garbage(b"\xff\xff\xff\xff")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.is_server_live()
    assert client.infer("sample", [_sample_input()]).as_numpy("probabilities").shape == (1, 3)


def _raw_infer(channel: grpc.Channel):
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def _expect(infer, msg, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        infer(msg)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()


# -- streaming ------------------------------------------------------------------------------------
def test_stream_answers_in_order_and_goes_on_after_an_error(grpc_url):
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c = grpcclient.InferenceServerClient(grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for n in range(6):
            if n == 2:
                c.async_stream_infer("sample", [_sample_input(1, 3)], request_id="bad")
            elif n == 4:
                c.async_stream_infer("nope", [_sample_input()], request_id="missing")
            else:
                c.async_stream_infer("sample", [_sample_input(n + 1)], request_id=f"r{n}")
        got = [results.get(timeout=30) for _ in range(6)]
    finally:
        c.stop_stream()
        c.close()
    for n, (result, error) in enumerate(got):
        if n == 2:
            assert result is None and "does not match" in str(error)
        elif n == 4:
            assert result is None and "nope" in str(error)
        else:
            assert error is None
            assert result.get_response().id == f"r{n}"
            assert result.as_numpy("probabilities").shape == (n + 1, 3)


# -- the asyncio client ---------------------------------------------------------------------------
async def test_asyncio_client(grpc_url, samples):
    inputs, want = _multi_io(samples)
    async with aioclient.InferenceServerClient(grpc_url) as c:
        assert await c.is_server_live()
        assert await c.is_model_ready("multi_io")
        results = await asyncio.gather(*(c.infer("multi_io", inputs) for _ in range(8)))
        for result in results:
            assert np.array_equal(result.as_numpy("sum"), want["sum"])
        with pytest.raises(InferenceServerException) as exc:
            await c.infer("nope", inputs)
        assert _code(exc) == "StatusCode.NOT_FOUND"

        async def requests():
            for n in range(3):
                yield {"model_name": "sample", "inputs": [_sample_input(n + 1)],
                       "request_id": f"s{n}"}  # fmt: skip

        answers = [answer async for answer in c.stream_infer(requests())]
        assert [(r.get_response().id, e) for r, e in answers] == [
            ("s0", None), ("s1", None), ("s2", None)
        ]  # fmt: skip


# -- in the test's own loop: auth, deadline ------------------------------------------------------
async def test_bearer_token(serve):
    port = free_port()
    await serve({"grpc": {"port": port}, "server": {"auth_token": TOKEN}})
    url = f"127.0.0.1:{port}"
    async with aioclient.InferenceServerClient(url) as c:
        assert await c.is_server_live()  # health needs no token, as over HTTP
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            with pytest.raises(InferenceServerException) as exc:
                await c.infer("sample", [_sample_input()], headers=headers)
            assert _code(exc) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as exc:
            await c.get_model_metadata("sample")
        assert _code(exc) == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": f"Bearer {TOKEN}"}
        result = await c.infer("sample", [_sample_input()], headers=good)
        assert result.as_numpy("label").shape == (1,)

        async def one():
            yield {"model_name": "sample", "inputs": [_sample_input()]}

        with pytest.raises(grpc.RpcError) as err:  # tritonclient's aio stream raises it as is
            async for _ in c.stream_infer(one()):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = [a async for a in c.stream_infer(one(), headers=good)]
        assert answers[0][1] is None


async def test_deadline_is_the_request_timeout(serve, gated):
    from tests.support.gated import GatedBackend

    port = free_port()
    await serve({"grpc": {"port": port}}, sources=gated)
    x = grpcclient.InferInput("x", [2], "FP32")
    x.set_data_from_numpy(np.ones(2, np.float32))
    async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        first = asyncio.ensure_future(c.infer("gated", [x]))  # holds the only worker
        await asyncio.to_thread(GatedBackend.started.acquire)
        with pytest.raises(InferenceServerException) as exc:
            await c.infer("gated", [x], client_timeout=0.3)
        assert _code(exc) == "StatusCode.DEADLINE_EXCEEDED"
        GatedBackend.gate.set()
        assert (await first).as_numpy("y").shape == (2,)
        assert (await c.infer("gated", [x], client_timeout=10)).as_numpy("y").shape == (2,)
        # the queued request was dropped at its deadline, never run
        assert GatedBackend.runs == 2


async def test_tls_with_client_certificates(serve, tmp_path):
    files = make_pki(tmp_path)
    port = free_port()
    await serve({"grpc": {"port": port, "cert_file": str(files["server.crt"]),
                          "key_file": str(files["server.key"]),
                          "client_ca_file": str(files["ca.crt"])}})  # fmt: skip
    url = f"localhost:{port}"
    tls = {"ssl": True, "root_certificates": str(files["ca.crt"])}
    async with aioclient.InferenceServerClient(
        url, **tls, private_key=str(files["client.key"]),
        certificate_chain=str(files["client.crt"]),
    ) as c:  # fmt: skip
        assert await c.is_server_live()
        assert (await c.infer("sample", [_sample_input()])).as_numpy("label").shape == (1,)
    async with aioclient.InferenceServerClient(url, **tls) as c:  # no client certificate
        with pytest.raises(InferenceServerException):
            await c.is_server_live()
    async with aioclient.InferenceServerClient(url) as c:  # plaintext
        with pytest.raises(InferenceServerException):
            await c.is_server_live()


def test_config_is_checked():
    with pytest.raises(ConfigError, match=r"grpc\.key_file"):
        load_config(None, {"grpc": {"port": 8001, "cert_file": "/x.crt"}}, {})
    with pytest.raises(ConfigError, match=r"grpc\.client_ca_file"):
        load_config(None, {"grpc": {"port": 8001, "client_ca_file": "/ca.crt"}}, {})
    with pytest.raises(ConfigError, match=r"grpc\.port"):
        load_config(None, {"grpc": {"port": 70000}}, {})
    assert load_config(None, {}, {}).grpc.port == 0  # off unless set


async def test_a_port_in_use_is_a_config_error(serve):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            await serve({"grpc": {"port": port}})


# -- fuzz: random requests are refused precisely, never with INTERNAL ------------------------------
_DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64",
              "FP16", "FP32", "FP64", "BYTES", "BF16", "", "fp32"]  # fmt: skip
_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
           "fp32_contents", "fp64_contents", "bytes_contents"]  # fmt: skip


@st.composite
def infer_requests(draw):
    msg = pb.ModelInferRequest(model_name=draw(st.sampled_from(["sample", "multi_io", "strings",
                                                                "fp16", "nope", ""])))  # fmt: skip
    raw = draw(st.booleans())
    names = ["input", "x", "y", "pixels", "text", "a", ""]
    for _ in range(draw(st.integers(0, 3))):
        tensor = msg.inputs.add(
            name=draw(st.sampled_from(names)),
            datatype=draw(st.sampled_from(_DATATYPES)),
            shape=draw(st.lists(st.integers(-2, 6) | st.just(2**40), max_size=4)),
        )
        if raw:
            msg.raw_input_contents.append(draw(st.binary(max_size=64)))
        elif draw(st.booleans()):
            field = draw(st.sampled_from(_FIELDS))
            values = getattr(tensor.contents, field)
            if field == "bool_contents":
                values.extend(draw(st.lists(st.booleans(), max_size=8)))
            elif field == "bytes_contents":
                values.extend(draw(st.lists(st.binary(max_size=8), max_size=8)))
            elif field in ("fp32_contents", "fp64_contents"):
                values.extend(draw(st.lists(st.floats(width=32), max_size=8)))
            elif field.startswith("uint"):
                values.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=8)))
            else:
                values.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)))
    if draw(st.booleans()):
        msg.raw_input_contents.append(draw(st.binary(max_size=8)))
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "format", "x"]), max_size=2)):
        param = msg.parameters[key]
        choice = draw(st.integers(0, 3))
        if choice == 0:
            param.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif choice == 1:
            param.string_param = draw(st.text(max_size=5))
        elif choice == 2:
            param.bool_param = draw(st.booleans())
        else:
            param.uint64_param = draw(st.integers(0, 2**64 - 1))
    for name in draw(st.lists(st.sampled_from(["probabilities", "label", "sum", "zzz", ""]),
                              max_size=2)):  # fmt: skip
        msg.outputs.add(name=name)
    return msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=infer_requests())
def test_fuzz_never_internal(grpc_channel, msg):
    try:
        _raw_infer(grpc_channel)(msg, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAVAILABLE,
        ), (err.code(), err.details(), msg)


@pytest.fixture(scope="module")
def grpc_channel(grpc_url):
    with grpc.insecure_channel(grpc_url) as channel:
        yield channel


# -- repository RPCs, metrics --------------------------------------------------------------------
async def test_repository_load_unload_and_metrics(serve):
    port = free_port()
    http = await serve({"grpc": {"port": port}})
    async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        await c.unload_model("sample")
        assert not await c.is_model_ready("sample")
        with pytest.raises(InferenceServerException) as exc:
            await c.infer("sample", [_sample_input()])
        assert _code(exc) == "StatusCode.NOT_FOUND"
        index = await c.get_model_repository_index()
        assert "sample" not in {m.name for m in index.models}
        await c.load_model("sample")
        assert await c.is_model_ready("sample")
        assert (await c.infer("sample", [_sample_input()])).as_numpy("label").shape == (1,)
        with pytest.raises(InferenceServerException) as exc:
            await c.load_model("sample", config='{"x": 1}')  # Triton's config override
        assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as exc:
            await c.load_model("nope")
        assert _code(exc) in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
    text = await (await http.get("/metrics")).text()
    assert 'appliance_grpc_responses_total{method="ModelInfer",status="200"} 1.0' in text
    assert 'appliance_grpc_responses_total{method="ModelInfer",status="404"} 1.0' in text
