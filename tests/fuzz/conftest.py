"""Hypothesis settings for the fuzz tests: a short run by default, a long one on demand.

APPLIANCE_FUZZ_EXAMPLES sets the examples per test (default 200); for a long run, e.g.
`APPLIANCE_FUZZ_EXAMPLES=5000 pytest -q tests/fuzz`. Hypothesis keeps the examples that failed
in .hypothesis/ and replays them first next time.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from appliance.registry import Registry
from tests.conftest import (
    SAMPLE_NAMES,
    ServerProcess,
    start_server_process,
    stop_server_process,
)
from tests.support.mosquitto import Mosquitto

from .fronts import Http

#: Examples per test (a test that costs more per example takes a share of it).
EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "200"))
settings.register_profile(
    "appliance-fuzz",
    max_examples=EXAMPLES,
    # Real servers answer these: a slow example on a busy machine is not a failure.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("appliance-fuzz")


# -- real servers, shared by the tests of this folder ---------------------------------------------
QUIET = {"APPLIANCE_SERVER__ACCESS_LOG": "false"}
DEVICE = "fuzz"


@pytest.fixture(scope="package")
def kserve_store(
    tmp_path_factory: pytest.TempPathFactory, samples: Path, tflite_models: Path
) -> Path:
    """The sample models (every datatype between them), the TFLite image classifier, and a
    spare copy of `sample` that the repository routes may unload."""
    from tests.support.images import CLASSIFIER_POST, CLASSIFIER_PRE

    root = tmp_path_factory.mktemp("fuzz-store")
    registry = Registry(root)
    for name in SAMPLE_NAMES:
        registry.add(name, samples / f"{name}.onnx")
    # for the repository routes to load and unload (tests/fuzz/test_openapi.py)
    registry.add("spare", samples / "sample.onnx")
    registry.add(
        "classifier",
        tflite_models / "tfl_classifier.tflite",
        preprocess=CLASSIFIER_PRE,
        postprocess=CLASSIFIER_POST,
    )
    return root


@pytest.fixture(scope="package")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("fuzz-mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="package")
def fast_server(kserve_store: Path, broker: Mosquitto) -> Iterator[ServerProcess]:
    """`appliance serve` with its own HTTP front (the fast path), MQTT and gRPC (on
    `server.grpc_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        grpc_port = s.getsockname()[1]
    server = start_server_process(
        ["--models", str(kserve_store), "--mqtt", broker.url, "--device-id", DEVICE,
         "--grpc-port", str(grpc_port)],
        env=QUIET,
    )  # fmt: skip
    server.grpc_port = grpc_port  # type: ignore[attr-defined]
    yield server
    stop_server_process(server)


@pytest.fixture(scope="package")
def aiohttp_server(kserve_store: Path) -> Iterator[ServerProcess]:
    """The same store with every request answered by the aiohttp application (and a result
    cache, whose keys are made from the request's parameters)."""
    env = {
        **QUIET,
        "APPLIANCE_SERVER__FAST_PATH": "false",
        "APPLIANCE_MODEL_DEFAULTS__CACHE_BYTES": "1000000",
    }
    server = start_server_process(["--models", str(kserve_store)], env=env)
    yield server
    stop_server_process(server)


@pytest.fixture(scope="package", params=["fast", "aiohttp"])
def kserve(request: pytest.FixtureRequest) -> Iterator[Http]:
    """An HTTP client of one front: the fast path, or the aiohttp application."""
    server = request.getfixturevalue(f"{request.param}_server")
    client = Http(server)
    yield client
    client.close()


@pytest.fixture(scope="package")
def signatures(fast_server: ServerProcess) -> dict[str, dict[str, Any]]:
    """Each sample model's metadata, as the server describes it."""
    client = Http(fast_server)
    out = {name: client.request("GET", f"/v2/models/{name}").json() for name in SAMPLE_NAMES}
    client.close()
    return out
