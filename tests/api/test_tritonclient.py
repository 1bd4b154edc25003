"""tritonclient.http, with its default settings, against `appliance serve` in its own process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(server_process):
    c = httpclient.InferenceServerClient(server_process.url)
    yield c
    c.close()


def _inputs(binary: bool):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = rng.integers(-100, 100, size=(5, 3)).astype(np.int64)
    pixels = rng.integers(0, 256, size=(5, 2, 2)).astype(np.uint8)
    feed: dict[str, np.ndarray] = {"x": x, "y": y, "pixels": pixels}
    inputs = []
    for name, arr in feed.items():
        i = httpclient.InferInput(
            name,
            list(arr.shape),
            {"float32": "FP32", "int64": "INT64", "uint8": "UINT8"}[str(arr.dtype)],
        )
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    return feed, inputs


def test_server_and_model_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "appliance"
    assert "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("multi_io")
    assert client.is_model_ready("multi_io", "1")
    assert not client.is_model_ready("nope")
    model = client.get_model_metadata("multi_io")
    assert [i["name"] for i in model["inputs"]] == ["x", "y", "pixels"]
    assert [i["datatype"] for i in model["inputs"]] == ["FP32", "INT64", "UINT8"]
    index = client.get_model_repository_index()
    assert {m["name"] for m in index} >= {"sample", "multi_io"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime(client, samples, binary):
    feed, inputs = _inputs(binary)
    session = ort.InferenceSession(
        str(samples / "multi_io.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(None, feed), strict=True))
    # default: no outputs named, so tritonclient asks for all of them as binary
    result = client.infer("multi_io", inputs)
    for name in names:
        got = result.as_numpy(name)
        assert got.dtype == want[name].dtype, name
        assert np.array_equal(got, want[name]), name
    # outputs requested by name, some binary and some JSON
    outputs = [
        httpclient.InferRequestedOutput("sum", binary_data=binary),
        httpclient.InferRequestedOutput("pixel_mean", binary_data=not binary),
    ]
    result = client.infer("multi_io", inputs, model_version="1", outputs=outputs, request_id="r7")
    assert result.get_response()["id"] == "r7"
    assert np.array_equal(result.as_numpy("sum"), want["sum"])
    assert np.array_equal(result.as_numpy("pixel_mean"), want["pixel_mean"])
    assert result.as_numpy("y_times_2") is None


def test_bytes_and_fp16(client):
    text = np.array([b"edge", b"appliance", b""], dtype=object)
    i = httpclient.InferInput("text", [3], "BYTES")
    i.set_data_from_numpy(text)
    assert list(client.infer("strings", [i]).as_numpy("echo")) == list(text)
    a = np.array([[0.5, -1.25]], dtype=np.float16)
    i = httpclient.InferInput("a", [1, 2], "FP16")
    i.set_data_from_numpy(a)
    got = client.infer("fp16", [i]).as_numpy("doubled")
    assert got.dtype == np.float16 and np.array_equal(got, a * 2)


def test_errors_come_back_as_exceptions_with_status(client):
    i = httpclient.InferInput("input", [1, 3], "FP32")
    i.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sample", [i])
    assert exc.value.status() == "400"
    assert "does not match" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [i])
    assert exc.value.status() == "404"
    # and the server keeps serving
    i = httpclient.InferInput("input", [1, 4], "FP32")
    i.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert client.infer("sample", [i]).as_numpy("probabilities").shape == (1, 3)


def test_compressed_request(client):
    feed, inputs = _inputs(True)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("multi_io", inputs, request_compression_algorithm=algorithm)
        assert np.array_equal(result.as_numpy("y_times_2"), feed["y"] * 2)
