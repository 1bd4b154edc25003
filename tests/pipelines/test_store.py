"""Pipelines stored like models: `appliance models add NAME --pipeline FILE`, then served."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from appliance.errors import ModelError
from appliance.registry import Registry
from tests.conftest import ROOT
from tests.pipelines.conftest import BATCHING
from tests.pipelines.test_execution import CHAIN, FAN, body, infer, outputs


def write(path: Path, doc: object) -> Path:
    path.write_bytes(orjson.dumps(doc))
    return path


def test_add_stores_a_checked_version_with_its_templates(store: Registry, tmp_path: Path):
    (tmp_path / "report.md.j2").write_text("{{ outputs }}")
    doc = {**FAN, "templates": {"markdown": "report.md.j2"}}
    mv = store.add_pipeline("fan", write(tmp_path / "fan.pipeline.json", doc))
    m = mv.manifest
    assert (m.backend, m.file, m.version) == ("pipeline", "pipeline.json", "1")
    assert sorted(m.files) == ["report.md.j2"]
    assert [t.name for t in m.signature.inputs] == ["x"]
    # bound to the store's models: the gathered outputs have their specs
    assert [(t.name, t.datatype, t.shape) for t in m.signature.outputs] == [
        ("z", "FP32", (-1, 4)),
        ("s", "FP32", (-1, 1)),
        ("half", "FP32", (-1, 4)),
    ]
    assert store.active("fan").manifest.version == "1"


def test_add_refuses_what_load_would_refuse(store: Registry, tmp_path: Path):
    bad_step = {**CHAIN, "nodes": [*CHAIN["nodes"], {"name": "s", "step": {"type": "nope"}}]}
    with pytest.raises(
        ModelError, match=re.escape("node 's': step.type: unknown step type 'nope'")
    ):
        store.add_pipeline("p", write(tmp_path / "p.json", bad_step))
    wrong = {"name": "c", "model": "top", "inputs": {"z": "a.x"}}
    bad_type = {**CHAIN, "nodes": [*CHAIN["nodes"], wrong]}
    with pytest.raises(ModelError, match=re.escape("node 'c': inputs.z: a.x: node 'a'")):
        store.add_pipeline("p", write(tmp_path / "p.json", bad_type))
    assert "p" not in store.names()


async def test_a_stored_pipeline_is_served(serve, store: Registry, tmp_path: Path):
    store.add_pipeline("fan", write(tmp_path / "fan.pipeline.json", FAN))
    client = await serve({"models": {"double": BATCHING}})
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    status, answer = await infer(client, "fan", body(x))
    assert status == 200, answer
    np.testing.assert_allclose(outputs(answer)["z"], x * 2 + 1)
    meta = await (await client.get("/v2/models/fan")).json()
    assert meta["platform"] == "pipeline" and meta["versions"] == ["1"]


async def test_a_tampered_stored_pipeline_is_not_ready_with_the_reason(
    serve, store: Registry, tmp_path: Path
):
    mv = store.add_pipeline("chain", write(tmp_path / "chain.pipeline.json", CHAIN))
    path = mv.file
    path.parent.chmod(stat.S_IRWXU)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    path.write_bytes(path.read_bytes() + b" ")
    client = await serve()
    r = await client.get("/v2/models/chain/ready")
    assert r.status == 503
    assert "does not match the manifest" in (await r.json())["error"]
    index = await (await client.post("/v2/repository/index")).json()
    assert any(e["name"] == "chain" and e["state"] == "FAILED" for e in index)
    status, _ = await infer(client, "double", body(np.ones((1, 4), dtype=np.float32)))
    assert status == 200  # the models serve on


def test_cli_models_add_pipeline(tmp_path: Path, pipeline_models: dict[str, Path]):
    models = str(tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "models", *args, "--models", models],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip

    for name in ("double", "addone"):
        assert run("add", name, str(pipeline_models[name])).returncode == 0
    result = run("add", "chain", "--pipeline", str(write(tmp_path / "c.json", CHAIN)))
    assert result.returncode == 0, result.stderr
    assert "added pipeline chain version 1" in result.stdout
    bad = {**CHAIN, "nodes": [*CHAIN["nodes"], {"name": "s", "step": {"type": "nope"}}]}
    result = run("add", "bad", "--pipeline", str(write(tmp_path / "b.json", bad)))
    assert result.returncode == 1
    assert "pipeline 'bad': node 's': step.type: unknown step type 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_new_stored_version_is_switched_to(serve, store: Registry, tmp_path: Path):
    store.add_pipeline("chain", write(tmp_path / "v1.pipeline.json", CHAIN))
    client = await serve()
    x = np.ones((1, 4), dtype=np.float32)
    v2 = {**CHAIN, "outputs": [{"name": "only_y", "source": "a.y"}]}
    store.add_pipeline("chain", write(tmp_path / "v2.pipeline.json", v2), activate=False)
    _, answer = await infer(client, "chain", body(x))
    assert answer["model_version"] == "1" and sorted(outputs(answer)) == ["y", "z"]
    r = await client.post("/v2/repository/models/chain/load", json={"parameters": {"version": "2"}})
    assert r.status == 200, await r.text()
    assert (await r.json())["version"] == "2"
    status, answer = await infer(client, "chain", body(x))
    assert status == 200 and answer["model_version"] == "2"
    assert list(outputs(answer)) == ["only_y"]
    assert store.active("chain").manifest.version == "2"
