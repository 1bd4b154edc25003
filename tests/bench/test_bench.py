"""`appliance bench` end to end (a real server subprocess) plus its client-side pieces.

Figures are checked for sanity only (positive, finite, p99 >= p50), never against a wall-clock
threshold: a loaded CI machine must not fail these tests.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.bench.errors import BenchError
from appliance.bench.inputs import check_outputs, infer_body, make_inputs, read_outputs
from appliance.bench.server import ServerProcess
from appliance.codec import InferResponse, decode_request, encode_response
from appliance.tensors import TensorSpec
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["--requests", "50", "--warmup", "10", "--concurrency", "2"]


@pytest.fixture
def sample_models(samples: Path) -> Path:
    """The sample models, built once per session by tests/conftest.py."""
    return samples


def _env() -> dict[str, str]:
    """The caller's environment without APPLIANCE_* settings, which would change the server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}


def appliance(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bench_json(*args: str) -> dict[str, Any]:
    proc = appliance("bench", *args, *FAST, "--json")
    assert proc.returncode == 0, proc.stderr
    figures: dict[str, Any] = json.loads(proc.stdout)
    return figures


def check_figures(f: dict[str, Any]) -> None:
    for what in ("raw", "raw_paced", "http_floor", "http", "throughput"):
        p50, p99, mean = f[f"{what}_p50_us"], f[f"{what}_p99_us"], f[f"{what}_mean_us"]
        for value in (p50, p99, mean):
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (what, f)
        assert p99 >= p50, (what, f)
    for key in ("overhead_p50_us", "overhead_p99_us", "overhead_vs_paced_p50_us"):
        assert math.isfinite(f[key]), (key, f)
    # the HTTP round trip contains the runtime call: it cannot be the faster of the two
    assert f["overhead_p50_us"] > 0, f
    assert math.isfinite(f["throughput_rps"]) and f["throughput_rps"] > 0
    assert f["concurrency"] == 2
    assert f["requests"] == 50 and f["warmup"] == 10
    assert f["cpu_count"] == os.cpu_count()
    if Path("/proc/self/status").exists():
        for key in ("server_idle_rss_mib", "server_after_rss_mib", "server_peak_rss_mib"):
            assert math.isfinite(f[key]) and f[key] > 0, (key, f)


def test_bench_json(sample_models: Path) -> None:
    f = bench_json(str(sample_models / "sample.onnx"))
    check_figures(f)
    assert f["model"] == "sample"
    assert f["encoding"] == "json"
    assert f["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 4]}]


def test_bench_binary(sample_models: Path) -> None:
    f = bench_json(str(sample_models / "sample.onnx"), "--binary", "--batch", "3")
    check_figures(f)
    assert f["encoding"] == "binary"
    assert f["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [3, 4]}]


def test_bench_model_from_store(sample_models: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    added = appliance(
        "models", "--models", str(store), "add", "sample", str(sample_models / "sample.onnx")
    )
    assert added.returncode == 0, added.stderr
    f = bench_json("--models", str(store), "sample")
    check_figures(f)
    assert f["model"] == "sample"
    assert Path(f["model_file"]).is_relative_to(store)


@pytest.mark.parametrize("model", ["multi_io", "strings", "fp16"])
def test_bench_other_types(sample_models: Path, model: str) -> None:
    """Integer, bool, string and half-precision tensors survive both encodings unchanged (the
    bench refuses to time a server whose answer differs from the runtime's)."""
    for extra in ((), ("--binary",)):
        f = bench_json(str(sample_models / f"{model}.onnx"), "--batch", "2", *extra)
        assert f["model"] == model


def test_bench_table(sample_models: Path) -> None:
    proc = appliance("bench", str(sample_models / "sample.onnx"), *FAST)
    assert proc.returncode == 0, proc.stderr
    for text in (
        "raw runtime call",
        "HTTP infer round trip",
        "with idle gaps",
        "HTTP /v2/health/live",
        "added by the appliance",
        "throughput at concurrency 2",
        "server RSS",
    ):
        assert text in proc.stdout


def test_bench_unknown_model(tmp_path: Path) -> None:
    proc = appliance("bench", "--models", str(tmp_path), "no-such-model", *FAST)
    assert proc.returncode == 1
    assert "no such model file, and no model of that name" in proc.stderr


def test_bench_bad_arguments(sample_models: Path) -> None:
    proc = appliance("bench", str(sample_models / "sample.onnx"), "--concurrency", "0")
    assert proc.returncode == 2
    assert "--concurrency" in proc.stderr


# -- pieces -----------------------------------------------------------------------------------
SPECS = (
    TensorSpec("f", "FP32", (-1, 3)),
    TensorSpec("h", "FP16", (2, -1)),
    TensorSpec("i", "INT64", (-1,)),
    TensorSpec("u", "UINT8", (-1, 2, 2)),
    TensorSpec("b", "BOOL", (-1,)),
    TensorSpec("s", "BYTES", (-1,)),
)


def test_make_inputs_is_deterministic_and_fits() -> None:
    a, b = make_inputs(SPECS, 4), make_inputs(SPECS, 4)
    assert [x.shape for x in a.values()] == [(4, 3), (2, 4), (4,), (4, 2, 2), (4,), (4,)]
    assert [str(x.dtype) for x in a.values()] == [
        "float32",
        "float16",
        "int64",
        "uint8",
        "bool",
        "object",
    ]
    for name in a:
        assert a[name].tolist() == b[name].tolist()
    assert a["i"].min() >= 0 and a["u"].min() >= 0
    assert all(isinstance(s, str) and s.isascii() and s for s in a["s"])


@pytest.mark.parametrize("binary", [False, True])
def test_request_encoding_is_what_the_server_decodes(binary: bool) -> None:
    inputs = make_inputs(SPECS, 3)
    datatypes = {s.name: s.datatype for s in SPECS}
    body, header_length = infer_body(inputs, datatypes, binary)
    assert (header_length is not None) == binary
    req = decode_request(body, header_length)
    assert req.binary_output == binary
    assert req.datatypes == datatypes
    for name, array in inputs.items():
        got = req.inputs[name]
        if name == "s":
            assert [x.decode() for x in got] == list(array)
        else:
            assert got.dtype == array.dtype and np.array_equal(got, array)

    # and the server's answer to it decodes back to the same arrays
    outputs = dict(req.inputs)  # an echo model; BYTES come back as bytes, as from a model
    payload, json_length = encode_response(InferResponse("m", "1", outputs), req)
    assert (json_length is not None) == binary
    check_outputs(inputs, read_outputs(payload, json_length))


def test_check_outputs_refuses_differences() -> None:
    want = {"p": np.array([[0.25, 0.75]], dtype=np.float32), "label": np.array([1])}
    check_outputs(want, {"p": want["p"] + 1e-9, "label": np.array([1])})
    with pytest.raises(BenchError, match="values differ"):
        check_outputs(want, {"p": want["p"] + 0.01, "label": np.array([1])})
    with pytest.raises(BenchError, match="values differ"):
        check_outputs(want, {"p": want["p"], "label": np.array([0])})
    with pytest.raises(BenchError, match="shape"):
        check_outputs(want, {"p": want["p"].reshape(2, 1), "label": np.array([1])})
    with pytest.raises(BenchError, match="outputs"):
        check_outputs(want, {"p": want["p"]})


def test_server_that_exits_early_is_reported() -> None:
    code = "import sys; sys.stderr.write('appliance: config error: broken\\n'); sys.exit(2)"
    server = ServerProcess([sys.executable, "-c", code], token="")
    try:
        with pytest.raises(BenchError, match=r"exited with status 2(.|\n)*config error: broken"):
            server.start()
    finally:
        server.stop(5.0)


def test_the_servers_log_goes_to_a_file_read_only_for_its_port() -> None:
    """Under a flood the server logs a line per request: the bench must not spend its own CPU
    (or the server's, on pipe writes) carrying them, so they go to a file it stops reading."""
    code = (
        "import sys, time\n"
        "sys.stderr.write('x' * 100 + '\\n')\n"
        'sys.stderr.write(\'{"msg": "serving", "port": 12345}\\n\'); sys.stderr.flush()\n'
        'for _ in range(20000): sys.stderr.write(\'{"msg": "an access line"}\\n\')\n'
        "sys.stderr.write('the last line\\n'); sys.stderr.flush(); time.sleep(60)\n"
    )
    server = ServerProcess([sys.executable, "-c", code], token="")
    try:
        assert server.start() == 12345
        assert server.drain is not None
        server.drain.join(5.0)
        assert not server.drain.is_alive()  # nothing reads the log once the port is known
        assert stat.S_ISREG(os.stat(f"/proc/{server.pid}/fd/2").st_mode)
        for _ in range(500):
            if server.drain.tail(1) == "the last line":
                break
            threading.Event().wait(0.01)
        assert server.drain.tail(1) == "the last line"
    finally:
        server.stop(5.0)
    assert server.proc is not None and server.proc.returncode is not None


def test_bench_mqtt_leg(sample_models: Path, mosquitto) -> None:
    proc = appliance(
        "bench", str(sample_models / "sample.onnx"), *FAST, "--json",
        "--mqtt", f"mqtt://127.0.0.1:{mosquitto.port}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)
    for key in ("mqtt_p50_us", "mqtt_p99_us", "mqtt_mean_us"):
        assert isinstance(f[key], float) and math.isfinite(f[key]) and f[key] > 0, (key, f)
    assert f["mqtt_p99_us"] >= f["mqtt_p50_us"]


def test_triton_compare_reads_wrk_output():
    from tests.bench.triton_compare import parse_wrk

    out = """Running 8s test @ http://127.0.0.1:1/v2/models/sample/infer
  Latency Distribution
     50%  126.00us
     75%    1.20ms
     99%    3.08ms
  59344 requests in 8.00s, 17.11MB read
Requests/sec:   7418.06
"""
    assert parse_wrk(out) == {"rps": 7418.06, "p50_us": 126.0, "p99_us": 3080.0}
    with pytest.raises(ValueError, match="3 answers were not 200"):
        parse_wrk(out + "  Non-2xx or 3xx responses: 3\n")
    with pytest.raises(ValueError, match="socket errors"):
        parse_wrk(out + "  Socket errors: connect 0, read 2, write 0, timeout 0\n")
