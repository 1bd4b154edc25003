"""The frozen binary, alone: --version, selftest, and serving a model it has never seen.

Runs when APPLIANCE_BINARY names a built binary (`make binary-test` sets it); the binary gets a
bare environment, with no virtual environment or source tree on its paths, plus the variables
APPLIANCE_BINARY_ENV names (`NAME=VALUE ...`): `make binary-arm64-test` passes
QEMU_LD_PREFIX=<the arm64 root filesystem> there, so the kernel's binfmt handler runs the arm64
binary under QEMU with that system's dynamic loader and libraries.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import start_server_process, stop_server_process

BINARY = os.environ.get("APPLIANCE_BINARY")
pytestmark = pytest.mark.skipif(not BINARY, reason="APPLIANCE_BINARY is not set")
BARE_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    **dict(kv.split("=", 1) for kv in os.environ.get("APPLIANCE_BINARY_ENV", "").split()),
}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert BINARY
    return subprocess.run(
        [str(Path(BINARY).resolve()), *args], capture_output=True, text=True, env=BARE_ENV,
        cwd=cwd, timeout=120,
    )  # fmt: skip


def test_version(tmp_path: Path) -> None:
    proc = run("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("appliance ") and "(frozen binary)" in proc.stdout
    assert "onnx: onnxruntime " in proc.stdout


def test_selftest(tmp_path: Path) -> None:
    proc = run("selftest", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("selftest ok: ")


def test_serves_a_model_from_the_command_line_to_tritonclient(
    tmp_path: Path, samples: Path
) -> None:
    assert BINARY
    model = tmp_path / "detector.onnx"
    model.write_bytes((samples / "multi_io.onnx").read_bytes())
    server = start_server_process(
        ["--model", str(model)], command=[str(Path(BINARY).resolve())], base_env=BARE_ENV
    )
    try:
        client = httpclient.InferenceServerClient(server.url)
        assert client.is_model_ready("detector")
        rng = np.random.default_rng(3)
        feed: dict[str, np.ndarray] = {
            "x": rng.normal(size=(4, 3)).astype(np.float32),
            "y": rng.integers(-9, 9, size=(4, 3)).astype(np.int64),
            "pixels": rng.integers(0, 256, size=(4, 2, 2)).astype(np.uint8),
        }
        inputs = []
        for name, arr in feed.items():
            i = httpclient.InferInput(
                name, list(arr.shape), {"x": "FP32", "y": "INT64", "pixels": "UINT8"}[name]
            )
            i.set_data_from_numpy(arr)
            inputs.append(i)
        result = client.infer("detector", inputs)
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for name, want in zip(names, session.run(None, feed), strict=True):
            assert np.array_equal(result.as_numpy(name), want), name
        client.close()
        # the status page's files are bundled (appliance/ui/, api/ui.py reads them at start)
        with urllib.request.urlopen(f"http://{server.url}/ui/device/app.js", timeout=10) as r:
            assert r.status == 200 and b"api/status" in r.read()
    finally:
        assert stop_server_process(server) == 0


def test_serves_grpc_to_tritonclient(tmp_path: Path, samples: Path) -> None:
    """Where the binary bundles the grpc extra (the default): tritonclient.grpc, BYTES too."""
    import socket

    import tritonclient.grpc as grpcclient

    assert BINARY
    if "grpc: grpc " not in run("--version", cwd=tmp_path).stdout:
        pytest.skip("this binary was built without the grpc extra")
    model = tmp_path / "strings.onnx"
    model.write_bytes((samples / "strings.onnx").read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server_process(
        ["--model", str(model), "--grpc-port", str(port)],
        command=[str(Path(BINARY).resolve())],
        base_env=BARE_ENV,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready("strings")
        text = np.array([b"edge", b"", b"appliance"], dtype=object)
        i = grpcclient.InferInput("text", [3], "BYTES")
        i.set_data_from_numpy(text)
        assert list(client.infer("strings", [i]).as_numpy("echo")) == list(text)
        client.close()
    finally:
        assert stop_server_process(server) == 0


def test_serves_a_tflite_classifier_a_picture(tmp_path: Path, tflite_models: Path) -> None:
    """Where the binary bundles the tflite and image extras (BINARY_BACKENDS=onnx,tflite,image):
    a TFLite model it has never seen, and a JPEG sent as it is."""
    import json
    import urllib.request

    from appliance.registry import Registry
    from tests.support.images import (
        CLASSIFIER_POST,
        CLASSIFIER_PRE,
        by_hand,
        encode,
        litert,
        picture,
        top_k_by_hand,
    )

    assert BINARY
    version = run("--version", cwd=tmp_path).stdout
    if "tflite: litert" not in version:
        pytest.skip("this binary was built without the tflite extra")
    store = Registry(tmp_path / "models")
    model = tflite_models / "tfl_classifier.tflite"
    store.add("classifier", model, preprocess=CLASSIFIER_PRE, postprocess=CLASSIFIER_POST)
    server = start_server_process(
        ["--models", str(store.root)], command=[str(Path(BINARY).resolve())], base_env=BARE_ENV
    )
    try:
        data = encode(picture(64, 48, 1), "JPEG")
        request = urllib.request.Request(
            f"http://{server.url}/v2/models/classifier/infer?top_k=3",
            data=data,
            headers={"Content-Type": "image/jpeg"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            outs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
        (logits,) = litert(model, [by_hand(data, CLASSIFIER_PRE)[None]])
        labels, _ = top_k_by_hand(logits, 3)
        assert outs["top_k_labels"]["data"] == labels[0]
    finally:
        assert stop_server_process(server) == 0


def test_takes_a_rollout_from_a_hub(tmp_path: Path, samples: Path) -> None:
    """Where the binary bundles the sync extra (the default): a version published on a real hub
    (run from the source tree) is verified with TUF, activated and reported by the binary."""
    from appliance.registry import Registry
    from tests.sync.conftest import DEVICE_ENV, Hub, variant, wait_for

    assert BINARY
    if "sync: tuf " not in run("--version", cwd=tmp_path).stdout:
        pytest.skip("this binary was built without the sync extra")
    hub = Hub(tmp_path / "hub")
    hub.start()
    device = None
    try:
        store = Registry(tmp_path / "models")
        store.add("sample", samples / "sample.onnx", version="1")
        token = hub.enroll("pi-1", tmp_path)
        hub.publish("sample", variant(samples / "sample.onnx", tmp_path / "v2.onnx", 1.5), "2")
        hub.rollout("sample", "2", "pi-1")
        device = start_server_process(
            ["--models", str(store.root), "--hub", hub.url, "--device-id", "pi-1",
             "--hub-token-file", str(token), "--hub-root", str(hub.root_file)],
            command=[str(Path(BINARY).resolve())], base_env={**BARE_ENV, **DEVICE_ENV},
        )  # fmt: skip
        url = f"http://{device.url}/v2/models/sample"

        def on_v2() -> bool:
            import json
            import urllib.request

            with urllib.request.urlopen(url, timeout=10) as r:
                return bool(json.loads(r.read())["versions"] == ["2"])

        wait_for("version 2 on the binary", on_v2, 120)
        # The engine serves the new version a moment before the store records it (the store is
        # written only once the switch succeeded); under QEMU that moment is long enough to see.
        wait_for("the store to record version 2", lambda: store.entry("sample").active == "2")
        wait_for("the hub to hear of it", lambda: hub.device("pi-1")["active"] == {"sample": "2"})
    finally:
        if device is not None:
            stop_server_process(device)
        hub.stop()


def test_loads_plugins_from_a_plugin_directory(tmp_path: Path) -> None:
    """The example plugin installed with `pip install --target DIR` and named in `[plugins]
    dirs`: the binary lists it, adds a model with its backend and serves it (the first load
    probed in a child process, which gets the directory too)."""
    import json
    import urllib.request

    from tests.plugins.conftest import EXAMPLE, pip_install

    plugin_dir = tmp_path / "plugins"
    pip_install(EXAMPLE, tmp_path, "--target", str(plugin_dir))
    config = tmp_path / "config.toml"
    config.write_text(f"[plugins]\ndirs = [{json.dumps(str(plugin_dir))}]\n")
    listed = run("plugins", "--config", str(config), "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    found = {e["name"]: e["status"] for e in json.loads(listed.stdout)["plugins"]}
    assert found == {"clip": "ok", "linear": "ok"}
    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({"weights": [[1, 0], [0, 1], [1, 1]], "bias": [0.5, -0.5]}))
    store = ["--config", str(config), "--models", str(tmp_path / "models")]
    added = run("models", "add", "lin", str(layer), "--backend", "linear", *store, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    server = start_server_process(
        store, command=[str(Path(BINARY or "").resolve())], base_env=BARE_ENV
    )
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
        request = urllib.request.Request(
            f"http://{server.url}/v2/models/lin/infer", data=json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["outputs"][0]["data"] == [4.5, 4.5]
    finally:
        assert stop_server_process(server) == 0
