"""Plugin steps declared in a model's manifest (`steps`), served: the example's `clip` on the
linear model's output; a step plugin that does not import fails only its model, with the
reason; one that raises fails that request naming the plugin and step, and the next is served.

Needs the manifest's `steps` (the steps-core work, issue 16): skipped on a tree without it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance import plugins
from appliance.backends import get_backend
from appliance.engine import ModelSource
from appliance.manifest import Manifest

from .test_plugins import XY, X, expected, infer_body, layer_file

pytestmark = pytest.mark.skipif(
    "steps" not in {f.name for f in dataclasses.fields(Manifest)},
    reason="this tree's manifests have no `steps` yet",
)


def _source(
    tmp_path: Path, name: str, backend: str, steps: dict[str, Any], file: Path | None = None
) -> ModelSource:
    if file is None:
        file = tmp_path / f"{name}.bin"
        file.write_bytes(b"")
    signature = get_backend(backend).inspect(file)[0] if backend == "linear" else XY
    plain = Manifest(name, "1", backend, file.name, "", 0, signature, "", "test")
    manifest = Manifest.from_json({**plain.to_json(), "steps": steps}, "test")
    return ModelSource(manifest, file, verify=False)


async def test_plugin_steps_in_manifests(
    serve: Any, example_dir: Path, test_dir: Path, tmp_path: Path
) -> None:
    dirs = [str(example_dir), str(test_dir)]
    plugins.use_dirs(dirs)
    clip = {"output": [{"type": "clip", "tensors": ["y"], "min": 0, "max": 4}]}
    layer = layer_file(tmp_path)
    sources = [
        _source(tmp_path, "lin", "linear", clip, layer),
        _source(tmp_path, "bad_step", "faulty", {"input": [{"type": "broken_step"}]}),
        _source(tmp_path, "explodes", "faulty", {"input": [{"type": "explode"}]}),
    ]
    client = await serve(
        {"plugins": {"dirs": dirs}, "server": {"strict_readiness": False}}, sources=sources
    )
    resp = await client.post("/v2/models/lin/infer", json=infer_body("x", X, [2, 3]))
    assert resp.status == 200, await resp.text()
    y = (await resp.json())["outputs"][0]["data"]
    np.testing.assert_allclose(y, np.clip(expected(X), 0, 4).ravel())
    assert max(y) == 4  # the clip did something

    assert (await client.get("/v2/models/bad_step/ready")).status == 503
    meta = await (await client.get("/v2/models/bad_step")).json()
    assert meta["parameters"]["reason"].endswith(
        "step type 'broken_step' (plugin 'appliance-plugin-broken') is not available: "
        "ModuleNotFoundError: No module named 'appliance_plugin_missing_dependency'"
    ), json.dumps(meta)

    resp = await client.post("/v2/models/explodes/infer", json=infer_body("x", [13], [1]))
    assert resp.status == 500
    assert (await resp.json())["error"].endswith(
        "step 'explode' (plugin 'appliance-plugin-faulty') failed: RuntimeError: unlucky number"
    )
    resp = await client.post("/v2/models/explodes/infer", json=infer_body("x", [1], [1]))
    assert resp.status == 200
    assert (await client.get("/v2/models/lin/ready")).status == 200
