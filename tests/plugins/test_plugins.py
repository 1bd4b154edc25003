"""Plugins: third-party steps and backends through entry points, from the Python environment
or from a plugin directory (`[plugins] dirs`, the frozen binary's way). A plugin that does not
import makes only the models using it not ready, with the reason; one that raises during a
request fails that request naming the plugin, and the server goes on."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance import backends, plugins, steps
from appliance.cli import main
from appliance.config import load_config
from appliance.engine import ModelSource
from appliance.errors import ConfigError, InferenceFailed, InvalidInput, ModelError
from appliance.manifest import Manifest
from appliance.registry import Registry
from appliance.server import build, sources_from_store
from appliance.steps.base import PLUGIN_OF, StepCall, StepContext, run_step
from appliance.tensors import Signature, TensorSpec
from tests.conftest import start_server_process, stop_server_process

from .conftest import EXAMPLE, pip_install

LAYER = {"weights": [[1, 0], [0, 1], [1, 1]], "bias": [0.5, -0.5]}
X = [[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]]
XY = Signature((TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),))


def expected(x: list[list[float]]) -> np.ndarray[Any, Any]:
    return np.asarray(x, np.float32) @ np.asarray(LAYER["weights"], np.float32) + np.asarray(
        LAYER["bias"], np.float32
    )


def layer_file(tmp_path: Path) -> Path:
    f = tmp_path / "layer.json"
    f.write_text(json.dumps(LAYER))
    return f


def infer_body(name: str, x: Any, shape: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": x}]}


# -- steps ---------------------------------------------------------------------------------


def test_the_example_step_comes_from_a_plugin_dir(example_dir: Path) -> None:
    assert "clip" not in steps.types() and "linear" not in backends.names()
    assert plugins.use_dirs([str(example_dir)]) == [str(example_dir)]
    assert "clip" in steps.types() and "linear" in backends.names()
    ctx = StepContext(
        "model 'm' version 1: steps.output[0]", {"y": TensorSpec("y", "FP32", (-1, 2))}
    )
    step = steps.parse_step({"type": "clip", "tensors": ["y"], "min": 0, "max": 1}, ctx)
    assert PLUGIN_OF["clip"] == "appliance-plugin-example"
    assert step.describe() == {"type": "clip", "tensors": ["y"], "min": 0.0, "max": 1.0}
    y = np.array([[-1, 0.5], [2, np.nan]], np.float32)
    out = run_step(step, {"y": y}, StepCall({}), "m")["y"]
    np.testing.assert_array_equal(out, np.array([[0, 0.5], [1, np.nan]], np.float32))
    # a request may narrow the range, never widen it
    out = run_step(step, {"y": y}, StepCall({"clip_max": 0.25, "clip_min": -5}), "m")["y"]
    np.testing.assert_array_equal(out, np.array([[0, 0.25], [0.25, np.nan]], np.float32))
    with pytest.raises(InvalidInput, match=r"parameters.clip_min: must be a finite number"):
        run_step(step, {"y": y}, StepCall({"clip_min": "low"}), "m")
    for declaration, message in (
        ({"tensors": ["z"], "min": 0}, "steps.output[0]: tensors: no tensor 'z' here"),
        ({"tensors": ["y"]}, "steps.output[0]: min: give min, max or both"),
        ({"tensors": ["y"], "min": 2, "max": 1}, "max: 1 is below min 2"),
        ({"tensors": ["y"], "min": 0, "mx": 1}, "mx: unknown key"),
    ):
        with pytest.raises(ModelError) as err:
            steps.parse_step({"type": "clip", **declaration}, ctx)
        assert message in err.value.message


def test_a_step_that_raises_fails_the_request_naming_plugin_and_step(test_dir: Path) -> None:
    plugins.use_dirs([str(test_dir)])
    step = steps.parse_step({"type": "explode"}, StepContext("model 'm' version 1: steps"))
    with pytest.raises(InferenceFailed) as err:
        run_step(step, {"x": np.array([13.0])}, StepCall({}), "model 'm' version 1")
    assert err.value.status == 500
    assert err.value.message == (
        "model 'm' version 1: step 'explode' (plugin 'appliance-plugin-faulty') failed: "
        "RuntimeError: unlucky number"
    )
    assert run_step(step, {"x": np.array([1.0])}, StepCall({}), "m")["x"].tolist() == [1.0]


def test_a_step_plugin_that_does_not_import_names_itself(test_dir: Path) -> None:
    plugins.use_dirs([str(test_dir)])
    with pytest.raises(ModelError) as err:
        steps.parse_step({"type": "broken_step"}, StepContext("model 'm' version 1: steps"))
    assert err.value.message == (
        "step type 'broken_step' (plugin 'appliance-plugin-broken') is not available: "
        "ModuleNotFoundError: No module named 'appliance_plugin_missing_dependency'"
    )


# -- backends, served ----------------------------------------------------------------------


def _source(tmp_path: Path, name: str, backend: str) -> ModelSource:
    f = tmp_path / f"{name}.bin"
    f.write_bytes(b"")
    manifest = Manifest(name, "1", backend, f.name, "", 0, XY, "", "test")
    return ModelSource(manifest, f, verify=False)


async def test_plugin_backends_fail_alone_and_name_the_plugin(
    serve: Any, store: Registry, example_dir: Path, test_dir: Path, tmp_path: Path
) -> None:
    dirs = [str(example_dir), str(test_dir)]
    plugins.use_dirs(dirs)
    store.add("lin", layer_file(tmp_path), backend="linear")
    extra = [
        _source(tmp_path, "bad", "broken"),  # its plugin does not import
        _source(tmp_path, "faulty", "faulty"),  # raises on 13
        _source(tmp_path, "faulty_iso", "faulty"),  # the same in a worker process
    ]
    client = await serve(
        {
            "plugins": {"dirs": dirs},
            "server": {"strict_readiness": False},
            "models": {"faulty_iso": {"isolation": "process"}},
        },
        sources=[*sources_from_store(store.root), *extra],
    )
    for ready in ("sample", "lin", "faulty", "faulty_iso"):
        assert (await client.get(f"/v2/models/{ready}/ready")).status == 200, ready
    resp = await client.get("/v2/models/bad/ready")
    assert resp.status == 503
    assert "plugin 'appliance-plugin-broken'" in (await resp.json())["error"]
    meta = await (await client.get("/v2/models/bad")).json()
    assert meta["parameters"]["status"] == "failed"
    assert meta["parameters"]["reason"] == (
        "backend 'broken' (plugin 'appliance-plugin-broken') is not available: it does not "
        "import: ModuleNotFoundError: No module named 'appliance_plugin_missing_dependency'"
    )

    resp = await client.post("/v2/models/lin/infer", json=infer_body("x", X, [2, 3]))
    assert resp.status == 200
    y = (await resp.json())["outputs"][0]
    assert y["shape"] == [2, 2]
    np.testing.assert_allclose(y["data"], expected(X).ravel())
    meta = await (await client.get("/v2/models/lin")).json()
    assert meta["platform"] == "example_linear"

    for name in ("faulty", "faulty_iso"):
        resp = await client.post(f"/v2/models/{name}/infer", json=infer_body("x", [1, 13], [2]))
        assert resp.status == 500
        assert (await resp.json())["error"] == (
            f"model {name}/1 failed: backend 'faulty' (plugin 'appliance-plugin-faulty') "
            "raised ValueError: unlucky number"
        )
        resp = await client.post(f"/v2/models/{name}/infer", json=infer_body("x", [1, 2], [2]))
        assert resp.status == 200, name
        assert (await resp.json())["outputs"][0]["data"] == [1, 2]
    assert (await client.get("/v2/models/sample/ready")).status == 200


def test_appliance_serve_loads_the_plugin_dir(
    tmp_path: Path, example_dir: Path, test_dir: Path, samples: Path
) -> None:
    """The whole route in a server process: config, plugin dirs, the first load probed in a
    child process (which gets the plugin dirs too); a plugin that broke after its model was
    added (an upgrade missing a dependency) fails only that model."""
    store = Registry(tmp_path / "models")
    store.add("sample", samples / "sample.onnx")
    plugins.use_dirs([str(example_dir), str(test_dir)])
    store.add("lin", layer_file(tmp_path), backend="linear")
    blank = tmp_path / "blank.bin"
    blank.write_bytes(b"")
    store.add("bad", blank, backend="faulty")
    upgraded = tmp_path / "upgraded"
    shutil.copytree(test_dir, upgraded)
    (upgraded / "appliance_plugin_faulty.py").write_text("import appliance_plugin_gone\n")
    config = tmp_path / "config.toml"
    dirs = json.dumps([str(example_dir), str(upgraded)])
    config.write_text(f"[server]\nstrict_readiness = false\n[plugins]\ndirs = {dirs}\n")
    server = start_server_process(["--models", str(store.root), "--config", str(config)])
    try:
        base = f"http://{server.url}/v2/models"
        with urllib.request.urlopen(f"{base}/lin/ready") as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/bad/ready")
        assert err.value.code == 503
        with urllib.request.urlopen(f"{base}/bad") as r:
            reason = json.load(r)["parameters"]["reason"]
        assert "backend 'faulty' (plugin 'appliance-plugin-faulty') is not available" in reason
        assert "No module named 'appliance_plugin_gone'" in reason
        body = json.dumps(infer_body("x", X, [2, 3])).encode()
        with urllib.request.urlopen(f"{base}/lin/infer", body) as r:
            np.testing.assert_allclose(json.load(r)["outputs"][0]["data"], expected(X).ravel())
    finally:
        assert stop_server_process(server) == 0


# -- the plugin directory's safety ---------------------------------------------------------


def test_plugin_dirs_are_absolute_paths() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"plugins": {"dirs": ["/opt/p", "rel"]}}, {})
    assert err.value.message == (
        "plugins.dirs = ['/opt/p', 'rel']: [1] 'rel' is not an absolute path"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_a_plugin_dir_others_can_change_is_refused(test_dir: Path, tmp_path: Path) -> None:
    module = test_dir / "appliance_plugin_faulty.py"

    def refused(path: Path, why: str) -> None:
        with pytest.raises(ConfigError) as err:
            plugins.use_dirs([str(path)])
        assert f"plugins.dirs[0] = {str(path)!r}: {why}. Code in a plugin directory runs" in (
            err.value.message
        )
        assert str(path) not in sys.path

    plugins.check_dir(test_dir, "here")  # as copied: root's, 0755 / 0644
    test_dir.chmod(0o777)
    refused(test_dir, f"{test_dir} is writable by every user")
    test_dir.chmod(0o755)
    module.chmod(0o646)
    refused(test_dir, f"{module} is writable by every user")
    module.chmod(0o664)
    os.chown(module, -1, 4321)
    refused(test_dir, f"{module} is writable by group 4321")
    module.chmod(0o644)
    os.chown(module, 1234, 0)
    refused(test_dir, f"{module} belongs to user 1234")
    os.chown(module, 0, 0)
    shared = tmp_path / "shared"
    shared.mkdir()
    inside = shared / "plugins"
    shutil.copytree(test_dir, inside)
    shared.chmod(0o777)  # anyone could swap `plugins` for their own
    refused(inside, f"{shared} is writable by every user (and not sticky)")
    shared.chmod(0o777 | stat.S_ISVTX)  # like /tmp: only the owner may rename it
    assert plugins.use_dirs([str(inside)]) == [str(inside)]
    with pytest.raises(ConfigError, match=r"plugins.dirs\[0\] = '/nonexistent': cannot read"):
        plugins.use_dirs(["/nonexistent"])


def test_a_server_refuses_an_unsafe_plugin_dir(
    test_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    test_dir.chmod(0o777)
    overrides = {"plugins": {"dirs": [str(test_dir)]}, "store": {"path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="is writable by every user"):
        build(load_config(None, overrides, {}), [])
    config = tmp_path / "config.toml"
    config.write_text(f"[plugins]\ndirs = [{json.dumps(str(test_dir))}]\n")
    assert main(["plugins", "--config", str(config)]) == 2
    assert "is writable by every user" in capsys.readouterr().err


# -- the command line ----------------------------------------------------------------------


def test_appliance_plugins_lists_them_and_says_which_import(
    example_dir: Path, test_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[plugins]\ndirs = {json.dumps([str(example_dir), str(test_dir)])}\n")
    assert main(["plugins", "--config", str(config), "--json"]) == 1  # one does not import
    doc = json.loads(capsys.readouterr().out)
    assert doc["dirs"] == [str(example_dir), str(test_dir)]
    found = {(e["group"], e["name"]): e for e in doc["plugins"]}
    assert found[("step", "clip")]["status"] == "ok"
    assert found[("step", "clip")]["distribution"] == "appliance-plugin-example"
    assert found[("step", "clip")]["location"] == str(example_dir)
    assert found[("backend", "linear")]["status"] == "ok"
    assert found[("backend", "faulty")]["status"] == "ok"
    assert found[("step", "explode")]["status"] == "ok"
    for key in (("step", "broken_step"), ("backend", "broken")):
        assert "(plugin 'appliance-plugin-broken') is not available" in found[key]["status"]
        assert "appliance_plugin_missing_dependency" in found[key]["status"]

    plugins.forget_dirs(plugins.active_dirs())  # as in a new process
    config.write_text(f"[plugins]\ndirs = [{json.dumps(str(example_dir))}]\n")
    assert main(["plugins", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert f"plugin directories: {example_dir}" in text
    assert "step     clip             appliance-plugin-example 0.1.0" in text


def test_models_add_with_a_plugin_backend(
    example_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[plugins]\ndirs = [{json.dumps(str(example_dir))}]\n")
    args = ["models", "add", "lin", str(layer_file(tmp_path)), "--config", str(config)]
    store = ["--models", str(tmp_path / "models")]
    assert main([*args, *store, "--backend", "linear"]) == 0
    assert "added lin version 1 (linear" in capsys.readouterr().out
    manifest = Registry(tmp_path / "models").active("lin").manifest
    assert manifest.signature == Signature(
        (TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1, 2)),)
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"weights": [[1, 2], [3]]}')
    assert main(["models", "add", "bad", str(bad), *store, "--backend", "linear"]) == 1
    assert "weights: every row needs the same, non-zero, length" in capsys.readouterr().err


def test_models_add_names_a_plugin_that_cannot_read_the_file(
    test_dir: Path, tmp_path: Path
) -> None:
    plugins.use_dirs([str(test_dir)])
    f = tmp_path / "odd.bin"
    f.write_bytes(b"unreadable")
    store = Registry(tmp_path / "models")
    with pytest.raises(ModelError) as err:
        store.add("odd", f, backend="faulty")
    assert err.value.message == (
        f"backend 'faulty' (plugin 'appliance-plugin-faulty') cannot read {f}: KeyError: 'header'"
    )
    assert store.names() == []


def test_pip_install_into_an_environment(tmp_path: Path) -> None:
    """`pip install appliance-plugin-example` into an environment the appliance runs from:
    found through the ordinary entry points, no plugin directory needed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # the appliance's own environment underneath (what --system-site-packages gives a venv
    # made from a system Python; this test's Python is itself a venv)
    Path(site, "host.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip_install(EXAMPLE, tmp_path, python=str(python))
    proc = subprocess.run(
        [python, "-m", "appliance", "plugins", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    found = {e["name"]: e for e in json.loads(proc.stdout)["plugins"]}
    for name in ("clip", "linear"):
        assert found[name]["status"] == "ok"
        assert found[name]["location"] == site
