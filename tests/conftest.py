"""Shared fixtures: sample models built by the project's own script, stores, real servers."""

from __future__ import annotations

import importlib.util
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from appliance.api.http import LOADER
from appliance.config import _merge, load_config
from appliance.engine import ModelSource
from appliance.registry import Registry
from appliance.server import build, sources_from_store
from tests.support.front import FrontServer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_NAMES = ("sample", "multi_io", "strings", "fp16")


@pytest.fixture(autouse=True, scope="session")
def _tritonclient_closed_by_the_tests() -> None:
    """tritonclient.http's __del__ closes its gevent pool a second time; when the cyclic GC runs
    it in another thread than the one that made the client (tests call it through
    asyncio.to_thread), gevent raises InvalidThreadUseError, an unraisable exception and so an
    error in this suite at a random later test. The tests close their clients themselves."""
    try:
        from tritonclient.http import InferenceServerClient
    except ImportError:
        return
    InferenceServerClient.__del__ = lambda self: None


@pytest.fixture(autouse=True)
def _not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run from a systemd service must not message that service's manager."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample .onnx files, made by build/make_sample_models.py (nothing downloaded)."""
    out = tmp_path_factory.mktemp("samples")
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_sample_models.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tflite_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample .tflite files, made by build/make_tflite_models.py (no TensorFlow)."""
    out = tmp_path_factory.mktemp("tflite")
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_tflite_models.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def image_store(tmp_path: Path, tflite_models: Path) -> Registry:
    """A store with the TFLite samples; `classifier` declares image pre-processing and a
    classification answer (tests/support/images.py has the declarations)."""
    from tests.support.images import CLASSIFIER_POST, CLASSIFIER_PRE

    registry = Registry(tmp_path / "image-models")
    for name in ("tfl_float", "tfl_int8", "tfl_uint8"):
        registry.add(name, tflite_models / f"{name}.tflite")
    registry.add(
        "classifier",
        tflite_models / "tfl_classifier.tflite",
        preprocess=CLASSIFIER_PRE,
        postprocess=CLASSIFIER_POST,
    )
    return registry


@pytest.fixture(scope="session")
def gguf_models() -> Path:
    """GGUF models made offline by build/make_gguf_models.py (cached in build/gguf).

    Skipped where llama-cpp-python or the build tools are missing, except in CI (CI=true),
    where a missing tool is a failure: CI must run these tests."""
    missing = [
        m for m in ("llama_cpp", "torch", "transformers") if importlib.util.find_spec(m) is None
    ]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {', '.join(missing)} for the GGUF tests")
        pytest.skip(f"not installed: {', '.join(missing)}")
    out = ROOT / "build" / "gguf"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_gguf_models.py"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"make_gguf_models.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


@pytest.fixture
def store(tmp_path: Path, samples: Path) -> Registry:
    """A model store holding every sample model, each active at version 1."""
    registry = Registry(tmp_path / "models")
    for name in SAMPLE_NAMES:
        registry.add(name, samples / f"{name}.onnx")
    return registry


ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def serve(
    store: Registry,
) -> AsyncIterator[ClientFactory]:
    """Start the real HTTP server (api/http_server.py in front of the app) on a loopback port;
    returns a client once models are loaded.

    These servers skip the first load in a child process (probe_first_load) unless the
    overrides ask for it: each test's fresh store would pay it again for the same sample files
    (tests/isolation covers it; servers started as processes keep the default)."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(
        overrides: dict[str, Any] | None = None,
        sources: list[ModelSource] | None = None,
        wait: bool = True,
    ) -> TestClient[web.Request, web.Application]:
        base = {"store": {"path": str(store.root)}, "model_defaults": {"probe_first_load": False}}
        config = load_config(None, _merge(base, overrides or {}), {})
        if sources is None:
            app = build(config, sources_from_store(store.root), store)
        else:
            app = build(config, sources)
        client = TestClient(FrontServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        if wait:
            await app[LOADER]
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[ModelSource]]:
    """A model on the gated test backend (tests/support/gated.py): runs wait for the test."""
    from appliance import backends
    from appliance.manifest import Manifest
    from tests.support.gated import SIGNATURE, GatedBackend

    monkeypatch.setitem(backends._BACKENDS, "gated", "tests.support.gated:GatedBackend")
    GatedBackend.gate = threading.Event()
    GatedBackend.started = threading.Semaphore(0)
    GatedBackend.runs = 0
    GatedBackend.delay = 0.0
    f = tmp_path / "gated.bin"
    f.write_bytes(b"")
    manifest = Manifest("gated", "1", "gated", f.name, "", 0, SIGNATURE, "", "test")
    yield [ModelSource(manifest, f, verify=False)]
    GatedBackend.gate.set()


@pytest.fixture
def flaky(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., list[ModelSource]]]:
    """Models on the flaky test backend (tests/support/flaky.py), one per name (and version):
    a test breaks them at will to exercise fallbacks, circuit breakers and retries."""
    from appliance import backends
    from appliance.manifest import Manifest
    from tests.support.flaky import SIGNATURE, FlakyBackend

    monkeypatch.setitem(backends._BACKENDS, "flaky", "tests.support.flaky:FlakyBackend")
    FlakyBackend.reset()

    def make(*names: str, version: str = "1") -> list[ModelSource]:
        out = []
        for name in names:
            f = tmp_path / f"{name}-{version}.bin"
            f.write_bytes(b"")
            manifest = Manifest(name, version, "flaky", f.name, "", 0, SIGNATURE, "", "test")
            out.append(ModelSource(manifest, f, verify=False))
        return out

    yield make
    FlakyBackend.reset()


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], port: int, lines: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.lines = lines
        self.url = f"127.0.0.1:{port}"


def start_server_process(
    args: list[str],
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    base_env: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ServerProcess:
    """Run `appliance serve ... --port 0` until ready; the bound port is read from its log.

    `command` replaces `python -m appliance` (e.g. a frozen binary); `base_env` replaces the
    inherited environment; `ssl_context`: the server speaks HTTPS (--tls-cert)."""
    proc = subprocess.Popen(
        [*(command or [sys.executable, "-m", "appliance"]), "serve", "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**(os.environ if base_env is None else base_env), **(env or {})},
        cwd=ROOT,
    )
    lines: list[str] = []
    port_box: list[int] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r'"port":(\d+)', line)
            if m and not port_box:
                port_box.append(int(m.group(1)))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(60) or not port_box:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    server = ServerProcess(proc, port_box[0], lines)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            scheme = "http" if ssl_context is None else "https"
            ready = f"{scheme}://{server.url}/v2/health/ready"
            with urllib.request.urlopen(ready, timeout=5, context=ssl_context) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.05)
    stop_server_process(server)
    raise RuntimeError("server never became ready:\n" + "".join(lines))


def stop_server_process(server: ServerProcess) -> int:
    server.proc.terminate()
    try:
        return server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()


@pytest.fixture(scope="module")
def server_process(
    tmp_path_factory: pytest.TempPathFactory, samples: Path
) -> Iterator[ServerProcess]:
    """`appliance serve` in its own process over a store of the sample models."""
    root = tmp_path_factory.mktemp("store")
    registry = Registry(root)
    for name in SAMPLE_NAMES:
        registry.add(name, samples / f"{name}.onnx")
    server = start_server_process(["--models", str(root)])
    yield server
    stop_server_process(server)


# `appliance build` of the real all-MiniLM-L6-v2 (ONNX INT8), cached in build/.cache.
from tests.support.minilm import minilm_build  # noqa: E402, F401
