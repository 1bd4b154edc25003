"""Fixtures of the pipeline tests: a store of tiny ONNX models, the test steps registered,
and a helper writing a declaration file and the config that serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance.registry import Registry
from tests.pipelines.models import write_all
from tests.support.pipeline_steps import register

#: Batching that merges rows queued together (the fan-out's rows arrive at once).
BATCHING = {"batching": {"enabled": True, "max_batch_size": 64, "max_queue_delay_us": 20000.0},
            "inline_max_us": 0.0}  # fmt: skip


@pytest.fixture(autouse=True)
def _steps(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch)


@pytest.fixture(scope="session")
def pipeline_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("pipeline-models"))


@pytest.fixture
def store(tmp_path: Path, pipeline_models: dict[str, Path]) -> Registry:
    """Overrides the sample store: the `serve` fixture serves these models."""
    registry = Registry(tmp_path / "models")
    for name in ("double", "addone", "top", "picky"):
        registry.add(name, pipeline_models[name])
    return registry


def declare(tmp_path: Path, pipelines: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Config overrides serving each declaration from a file in tmp_path."""
    tables: dict[str, Any] = {}
    for name, doc in pipelines.items():
        path = tmp_path / f"{name}.pipeline.json"
        path.write_bytes(orjson.dumps(doc))
        tables[name] = {"file": str(path)}
    return {"pipelines": tables, "models": {"double": BATCHING}, **extra}
