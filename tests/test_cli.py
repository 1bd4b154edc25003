"""The `appliance` command line, run as a real subprocess (`python -m appliance ...`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from appliance import __version__
from appliance.registry import Registry
from tests.conftest import ROOT, ServerProcess, start_server_process, stop_server_process

ENV = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}


def appliance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion, with no APPLIANCE_* variables but those given."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=120,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = appliance(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def http(
    server: ServerProcess, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://{server.url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


FEATURES = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
INFER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": FEATURES}]}


def expected_probabilities(samples: Path) -> list[float]:
    session = ort.InferenceSession(str(samples / "sample.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"input": np.array(FEATURES, np.float32)})
    return [float(v) for v in probabilities.reshape(-1)]


# -- basics ------------------------------------------------------------------------------------


def test_version() -> None:
    result = appliance("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"appliance {__version__} (git ")


def test_a_command_is_required() -> None:
    result = appliance()
    assert result.returncode == 2
    assert "usage: appliance" in result.stderr


# -- models ------------------------------------------------------------------------------------


def test_models_add_list_activate_rollback_remove(tmp_path: Path, samples: Path) -> None:
    store = str(tmp_path / "models")
    source = samples / "sample.onnx"
    out = ok("models", "add", "clf", str(source), "--models", store)
    size = source.stat().st_size
    assert re.match(
        rf"added clf version 1 \(onnx, {size} bytes, sha256 [0-9a-f]{{12}}…, active\)\n", out
    ), out
    assert out.splitlines()[1] == (
        "  input:FP32[-1, 4] -> probabilities:FP32[-1, 3], label:INT64[-1]"
    )
    out = ok(
        "models", "add", "clf", str(source), "--version", "v2", "--no-activate", "--models", store
    )
    assert out.startswith("added clf version v2 (onnx, ") and ", inactive)" in out
    ok("models", "add", "fp", str(samples / "fp16.onnx"), "--models", store)

    lines = ok("models", "list", "--models", store).splitlines()
    assert lines[0] == "clf  active=1  versions=1,v2"
    assert re.match(r"  \* 1 +onnx +\d+ B  \S+  input:FP32\[-1, 4\] -> ", lines[1]), lines[1]
    assert re.match(r"    v2 +onnx ", lines[2]), lines[2]
    assert lines[3] == "fp  active=1  versions=1"

    assert ok("models", "activate", "clf", "v2", "--models", store) == "clf: version v2 is active\n"
    assert Registry(store).entry("clf").active == "v2"
    assert ok("models", "rollback", "clf", "--models", store) == "clf: rolled back to version 1\n"
    assert ok("models", "remove", "clf", "v2", "--models", store) == "clf: removed version v2\n"
    entry = Registry(store).entry("clf")
    assert (entry.active, entry.versions) == ("1", ("1",))


def test_models_flag_before_the_sub_command(tmp_path: Path, samples: Path) -> None:
    store = str(tmp_path / "models")
    ok("models", "--models", store, "add", "clf", str(samples / "sample.onnx"))
    assert ok("models", "--models", store, "list").startswith("clf  active=1  versions=1\n")
    ok("models", "--models", store, "add", "clf", str(samples / "sample.onnx"))
    assert ok("models", "--models", store, "rollback", "clf") == "clf: rolled back to version 1\n"
    assert ok("models", "--models", store, "remove", "clf", "2") == "clf: removed version 2\n"
    assert Registry(store).entry("clf").versions == ("1",)


def test_store_from_config_file_and_environment(tmp_path: Path, samples: Path) -> None:
    from_file = tmp_path / "from-file"
    config = tmp_path / "appliance.toml"
    config.write_text(f"[store]\npath = {str(from_file)!r}\n")
    ok("models", "add", "a", str(samples / "sample.onnx"), "--config", str(config))
    assert Registry(from_file).names() == ["a"]
    # APPLIANCE_CONFIG names the file when --config is not given
    assert ok("models", "list", env={"APPLIANCE_CONFIG": str(config)}).startswith("a  active=1")
    # the environment beats the file, --models beats both
    from_env = tmp_path / "from-env"
    ok(
        "models",
        "add",
        "b",
        str(samples / "sample.onnx"),
        "--config",
        str(config),
        env={"APPLIANCE_STORE__PATH": str(from_env)},
    )
    assert Registry(from_env).names() == ["b"]
    flag = tmp_path / "flag"
    ok(
        "models",
        "add",
        "c",
        str(samples / "sample.onnx"),
        "--config",
        str(config),
        "--models",
        str(flag),
        env={"APPLIANCE_STORE__PATH": str(from_env)},
    )
    assert Registry(flag).names() == ["c"]


def test_models_list_on_an_empty_store(tmp_path: Path) -> None:
    store = tmp_path / "models"
    assert ok("models", "list", "--models", str(store)) == f"no models in {store}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "m", "MISSING"], "MISSING: no such file"),
        (["add", "../m", "SAMPLE"], "invalid model name '../m'"),
        (["add", "m", "SAMPLE", "--version", "a/b"], "invalid version 'a/b'"),
        (["activate", "m", "1"], "model 'm' has no version '1'"),
        (["rollback", "m"], "model 'm' has no active version to roll back from"),
        (["remove", "m", "1"], "model 'm' is not in the store"),
    ],
)
def test_models_errors_exit_1_with_a_message(
    tmp_path: Path, samples: Path, args: list[str], message: str
) -> None:
    store = tmp_path / "models"
    subst = {"MISSING": str(tmp_path / "missing.onnx"), "SAMPLE": str(samples / "sample.onnx")}
    result = appliance("models", *[subst.get(a, a) for a in args], "--models", str(store))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("appliance: ")
    assert message.replace("MISSING", subst["MISSING"]) in result.stderr
    assert "Traceback" not in result.stderr
    assert not store.exists() or list(store.iterdir()) == []


def test_models_errors_on_an_existing_model(tmp_path: Path, samples: Path) -> None:
    store = str(tmp_path / "models")
    ok("models", "add", "m", str(samples / "sample.onnx"), "--models", store)
    cases = [
        (["add", "m", str(samples / "sample.onnx"), "--version", "1"], "already exists"),
        (["activate", "m", "9"], "model 'm' has no version '9'"),
        (["remove", "m", "1"], "version '1' is active"),
        (["rollback", "m"], "no earlier version to roll back to"),
    ]
    for args, message in cases:
        result = appliance("models", *args, "--models", store)
        assert result.returncode == 1, (args, result)
        assert message in result.stderr, (args, result.stderr)
    bad = tmp_path / "x.onnx"
    bad.write_text("not a model")
    result = appliance("models", "add", "m", str(bad), "--models", store)
    assert result.returncode == 1
    assert f"appliance: {bad}: onnxruntime cannot load this model" in result.stderr
    assert ".partial" not in result.stderr
    entry = Registry(store).entry("m")
    assert (entry.active, entry.versions) == ("1", ("1",))


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = appliance("models", "add", "only-a-name", "--models", str(tmp_path))
    assert result.returncode == 2
    assert "the following arguments are required: file" in result.stderr
    result = appliance("models", "frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


# -- configuration errors ----------------------------------------------------------------------


def test_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nprot = 8080\n")
    for args in (["serve"], ["models", "list"]):
        result = appliance(*args, "--config", str(config), "--models", str(tmp_path / "m"))
        assert result.returncode == 2, result
        assert result.stderr.startswith("appliance: config error: server.prot: unknown key")
        assert "Traceback" not in result.stderr
    result = appliance("serve", env={"APPLIANCE_CONFIG": str(config)})
    assert result.returncode == 2
    assert "server.prot: unknown key" in result.stderr


def test_bad_environment_value_exits_2(tmp_path: Path) -> None:
    result = appliance("serve", "--models", str(tmp_path), env={"APPLIANCE_SERVER__PORT": "eighty"})
    assert result.returncode == 2
    assert "appliance: config error: server.port = 'eighty': must be an integer" in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = appliance("models", "list", "--config", str(missing))
    assert result.returncode == 2
    assert f"config file {str(missing)!r}: cannot read" in result.stderr


def test_serve_name_without_model_exits_2(tmp_path: Path) -> None:
    result = appliance("serve", "--name", "x", "--models", str(tmp_path))
    assert result.returncode == 2
    assert "appliance: config error: --name only applies together with --model FILE" in (
        result.stderr
    )


def test_serve_missing_model_file_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    result = appliance("serve", "--model", str(missing), "--port", "0")
    assert result.returncode == 1
    assert f"appliance: {missing}: no such file" in result.stderr


def test_serve_missing_token_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "token"
    result = appliance(
        "serve", "--models", str(tmp_path), "--port", "0", "--token-file", str(missing)
    )
    assert result.returncode == 2
    assert f"server.auth_token_file = {str(missing)!r}: cannot read" in result.stderr


# -- serve -------------------------------------------------------------------------------------


def test_serve_one_model_file_without_a_store(tmp_path: Path, samples: Path) -> None:
    no_store = tmp_path / "no-store"
    server = start_server_process(
        ["--model", str(samples / "sample.onnx"), "--name", "clf", "--models", str(no_store)]
    )
    try:
        status, meta = http(server, "/v2/models/clf")
        assert status == 200, meta
        assert meta["name"] == "clf" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
        status, body = http(server, "/v2/models/clf/infer", INFER)
        assert status == 200, body
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["probabilities"]["shape"] == [2, 3]
        assert np.allclose(outputs["probabilities"]["data"], expected_probabilities(samples))
        assert outputs["label"]["datatype"] == "INT64"
        assert http(server, "/v2/models/sample")[0] == 404
    finally:
        code = stop_server_process(server)
    assert code == 0, "".join(server.lines)
    assert not no_store.exists()  # serving a file neither reads nor creates a store


def test_serve_file_name_defaults_to_the_file_stem(samples: Path, tmp_path: Path) -> None:
    server = start_server_process(
        ["--model", str(samples / "fp16.onnx"), "--models", str(tmp_path)]
    )
    try:
        status, meta = http(server, "/v2/models/fp16")
        assert status == 200 and meta["name"] == "fp16"
    finally:
        stop_server_process(server)


@pytest.fixture
def sample_store(tmp_path: Path, samples: Path) -> Path:
    root = tmp_path / "models"
    Registry(root).add("sample", samples / "sample.onnx")
    return root


def check_token_required(server: ServerProcess, token: str, samples: Path) -> None:
    assert http(server, "/v2/health/ready")[0] == 200  # health needs no token
    status, body = http(server, "/v2/models/sample")
    assert status == 401, body
    assert http(server, "/v2/models/sample", token="wrong")[0] == 401
    assert http(server, "/v2/models/sample/infer", INFER)[0] == 401
    status, meta = http(server, "/v2/models/sample", token=token)
    assert status == 200 and meta["name"] == "sample"
    status, body = http(server, "/v2/models/sample/infer", INFER, token=token)
    assert status == 200, body
    probabilities = next(o for o in body["outputs"] if o["name"] == "probabilities")
    assert np.allclose(probabilities["data"], expected_probabilities(samples))


def test_serve_store_with_token_file(tmp_path: Path, samples: Path, sample_store: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    server = start_server_process(["--models", str(sample_store), "--token-file", str(token_file)])
    try:
        check_token_required(server, "tok-from-file", samples)
    finally:
        stop_server_process(server)


def test_serve_store_with_token_from_environment(samples: Path, sample_store: Path) -> None:
    # digits only: the environment must not turn the token into a number
    server = start_server_process(
        ["--models", str(sample_store)], env={"APPLIANCE_SERVER__AUTH_TOKEN": "0123456789"}
    )
    try:
        check_token_required(server, "0123456789", samples)
    finally:
        stop_server_process(server)


def test_models_add_with_image_declarations(tmp_path: Path, tflite_models: Path) -> None:
    store = str(tmp_path / "models")
    model = str(tflite_models / "tfl_classifier.tflite")
    pre = {"type": "image", "resize": "shorter_side", "resize_to": 40}
    pre_file = tmp_path / "pre.json"
    pre_file.write_text(json.dumps(pre))
    post = '{"type": "classification", "softmax": true}'
    out = ok("models", "add", "clf", model, "--models", store,
             "--preprocess", str(pre_file), "--postprocess", post)  # fmt: skip
    assert "(tflite, " in out
    manifest = Registry(store).active("clf").manifest
    assert manifest.preprocess == pre
    assert manifest.postprocess == {"type": "classification", "softmax": True}
    # Declarations are checked against the model before anything is written.
    bad = appliance("models", "add", "clf", model, "--models", store, "--preprocess",
                    '{"type": "image", "resize": "shorter_side", "resize_to": 8}')  # fmt: skip
    assert bad.returncode == 1
    assert "preprocess.resize_to = 8: must be at least the crop size 32" in bad.stderr
    bad = appliance("models", "add", "clf", model, "--models", store, "--postprocess", "[1]")
    assert bad.returncode == 2
    assert "--postprocess: must be a JSON object with a string 'type'" in bad.stderr
    assert Registry(store).versions("clf") == ["1"]
