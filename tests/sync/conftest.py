"""Real hub processes, real appliance processes, and a loopback proxy between them that can
throttle, cut or rewrite what the hub sends (the network a device really sees)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from aiohttp import ClientSession, ClientTimeout, web
from onnx import numpy_helper

from appliance.registry import Registry
from tests.conftest import ROOT, ServerProcess, start_server_process, stop_server_process

PY = [sys.executable, "-m", "appliance"]
#: Fast polling for tests; everything else as shipped.
DEVICE_ENV = {
    "APPLIANCE_HUB__POLL_INTERVAL_S": "0.3",
    "APPLIANCE_HUB__POLL_JITTER": "0.1",
    "APPLIANCE_HUB__REQUEST_TIMEOUT_S": "5",
    "APPLIANCE_HUB__METRICS_INTERVAL_S": "2",
    "APPLIANCE_SERVER__ACCESS_LOG": "false",
}
SAMPLE_INPUT = [[5.1, 3.5, 1.4, 0.2]]


def http_json(
    url: str, method: str = "GET", body: Any = None, token: str | None = None, timeout: float = 10
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Hub:
    """`appliance hub` over a data directory; `start()` runs `hub serve`, the CLI does the rest."""

    def __init__(self, data: Path, expiry: list[str] | None = None) -> None:
        self.data = data
        self.expiry = expiry or []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []
        #: More `hub serve` flags (tests/tracing: --trace-endpoint).
        self.serve_args: list[str] = []
        self.cli("init")
        self.admin_token = (data / "admin.token").read_text().strip()
        self.root_file = data / "1.root.json"
        assert self.root_file.is_file()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [*PY, "hub", args[0], "--data", str(self.data), *self.expiry, *args[1:]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        if out.returncode != 0:
            raise AssertionError(f"hub {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def start(self) -> None:
        """Serve (again on the same port after a stop, so devices find it where it was)."""
        self.proc = subprocess.Popen(
            [
                *PY,
                "hub",
                "serve",
                "--data",
                str(self.data),
                "--port",
                str(self.port),
                *self.expiry,
                *self.serve_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        found = threading.Event()
        port: list[int] = []
        proc = self.proc

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.lines.append(line)
                m = re.search(r'"port":(\d+)', line)
                if m and not port:
                    port.append(int(m.group(1)))
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(60) or not port:
            proc.kill()
            raise RuntimeError("hub did not start:\n" + "".join(self.lines))
        self.port = port[0]
        wait_for("the hub", lambda: self.admin("GET", "/api/v1/admin/devices") is not None, 30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(self.url + path, method, body, self.admin_token)

    def enroll(self, device_id: str, where: Path) -> Path:
        token = where / f"{device_id}.token"
        self.cli("enroll", device_id, "--token-out", str(token))
        return token

    def publish(self, name: str, file: Path, version: str, *extra: str) -> None:
        copy = file.with_name(f".publish-{name}-{version}{file.suffix}")
        shutil.copyfile(file, copy)
        self.cli("publish", name, str(copy), "--version", version, *extra)
        copy.unlink(missing_ok=True)

    def rollout(self, name: str, version: str, *devices: str) -> str:
        return self.cli("rollout", name, version, "--devices", ",".join(devices))

    def events(self, device_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            after = out[-1]["seq"] if out else 0
            page = self.admin("GET", f"/api/v1/admin/devices/{device_id}/events?after={after}")
            page = page["events"] if isinstance(page, dict) else page
            if not page:
                return out
            out.extend(page)

    def device(self, device_id: str) -> dict[str, Any]:
        for d in self.admin("GET", "/api/v1/admin/devices"):
            if d["device_id"] == device_id:
                return dict(d)
        raise KeyError(device_id)

    def artifact(self, name: str, version: str) -> Path:
        found = list((self.data / "artifacts" / name / version).glob("*"))
        assert len(found) == 1, found
        return found[0]


class Proxy:
    """A loopback HTTP proxy in front of the hub, run on its own thread and event loop.

    `down`: refuse every request (the hub is unreachable); `bytes_per_s`: throttle bodies of
    /tuf/targets/; `cut_after`: close target downloads after that many body bytes;
    `rewrite`: path regex -> function of the hub's body (tampering on the wire)."""

    def __init__(self, upstream: Callable[[], str]) -> None:
        self.upstream = upstream
        self._down = False
        self.site: web.TCPSite | None = None
        self.delay_s = 0.0
        self.bytes_per_s = 0
        self.cut_after = 0
        self.rewrite: dict[str, Callable[[bytes], bytes]] = {}
        self.requests: list[str] = []
        self.statuses: list[tuple[str, int]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(self.site.start())
        self.port = self.site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self.loop.run_forever()

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        """Down: the port is closed (connection refused), as when the hub's host is away."""
        if value == self._down:
            return
        self._down = value

        async def switch() -> None:
            if value:
                assert self.site is not None
                await self.site.stop()
            else:
                self.site = web.TCPSite(self.runner, "127.0.0.1", self.port)
                await self.site.start()

        asyncio.run_coroutine_threadsafe(switch(), self.loop).result(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.requests.append(f"{request.method} {request.path_qs}" + (f" {rng}" if rng else ""))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower()
            in (
                "authorization",
                "range",
                "if-none-match",
                "content-type",
                "x-device-id",
                "traceparent",
                "tracestate",
            )
        }
        if any(re.search(p, request.path) for p in self.rewrite):
            headers.pop("If-None-Match", None)  # a rewritten body must not come back as a 304
        body = await request.read()
        async with (
            ClientSession(timeout=ClientTimeout(total=60)) as s,
            s.request(
                request.method,
                self.upstream() + request.path_qs,
                headers=headers,
                data=body or None,
            ) as up,
        ):
            self.statuses.append((request.path, up.status))
            keep = ("content-type", "etag", "content-range", "accept-ranges", "cache-control")
            out_headers = {k: v for k, v in up.headers.items() if k.lower() in keep}
            for pattern, fn in self.rewrite.items():
                if re.search(pattern, request.path):
                    data = fn(await up.read())
                    return web.Response(body=data, status=up.status, headers=out_headers)
            is_target = request.path.startswith("/tuf/targets/")
            response = web.StreamResponse(status=up.status, headers=out_headers)
            if up.content_length is not None:
                response.content_length = up.content_length
            await response.prepare(request)
            sent = 0
            async for chunk in up.content.iter_chunked(16 * 1024):
                if is_target and self.cut_after and sent + len(chunk) > self.cut_after:
                    await response.write(chunk[: self.cut_after - sent])
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(chunk)
                sent += len(chunk)
                if is_target and self.bytes_per_s:
                    await asyncio.sleep(len(chunk) / self.bytes_per_s)
            await response.write_eof()
            return response

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def variant(source: Path, out: Path, scale: float, pad_bytes: int = 0) -> Path:
    """The sample model with its first layer scaled (other answers, same signature), and an
    optional unused initializer to make the file larger."""
    model = onnx.load(str(source))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w1":
            arr = numpy_helper.to_array(init) * np.float32(scale)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, "w1"))
    if pad_bytes:
        pad = np.random.default_rng(1).random(pad_bytes // 4, dtype=np.float32)
        model.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    onnx.save(model, str(out))
    return out


def infer(device: ServerProcess, timeout: float = 10) -> dict[str, Any]:
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                        "data": SAMPLE_INPUT[0]}]}  # fmt: skip
    return dict(
        http_json(f"http://{device.url}/v2/models/sample/infer", "POST", body, None, timeout)
    )


def sync_status(device: ServerProcess) -> dict[str, Any]:
    return dict(http_json(f"http://{device.url}/v2/sync"))


def serving_version(device: ServerProcess) -> str:
    return str(http_json(f"http://{device.url}/v2/models/sample")["versions"][0])


@pytest.fixture(scope="session")
def variants(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("variants")
    broken = d / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model" * 100)
    return {
        "v1": samples / "sample.onnx",
        "v2": variant(samples / "sample.onnx", d / "v2.onnx", 1.5),
        "v3": variant(samples / "sample.onnx", d / "v3.onnx", 0.5),
        "big": variant(samples / "sample.onnx", d / "big.onnx", 2.0, 4 * 1024 * 1024),
        "broken": broken,
    }


class Fleet:
    """One hub, a proxy in front of it, and devices started against the proxy."""

    def __init__(
        self,
        tmp: Path,
        samples: Path,
        expiry: list[str] | None = None,
        serve_args: list[str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.samples = samples
        self.hub = Hub(tmp / "hub", expiry)
        self.hub.serve_args = serve_args or []
        self.hub.start()
        self.proxy = Proxy(lambda: self.hub.url)
        self.devices: list[ServerProcess] = []
        (tmp / "manifest.json").write_text(json.dumps(self.sample_manifest()))
        self.manifest_args = ["--manifest", str(tmp / "manifest.json")]

    def sample_manifest(self) -> dict[str, Any]:
        mv = self._seed_registry(self.tmp / "seed").active("sample")
        m = mv.manifest.to_json()
        return {k: m[k] for k in ("inputs", "outputs", "parameters")}

    def _seed_registry(self, root: Path) -> Registry:
        registry = Registry(root)
        if "sample" not in registry.names():
            registry.add("sample", self.samples / "sample.onnx", version="1")
        return registry

    def store(self, name: str) -> Path:
        root = self.tmp / f"store-{name}"
        self._seed_registry(root)
        return root

    def start_device(
        self, device_id: str, store: Path, env: dict[str, str] | None = None
    ) -> ServerProcess:
        token = self.tmp / f"{device_id}.token"
        if not token.exists():
            self.hub.enroll(device_id, self.tmp)
        device = start_server_process(
            [
                "--models",
                str(store),
                "--hub",
                self.proxy.url,
                "--device-id",
                device_id,
                "--hub-token-file",
                str(token),
                "--hub-root",
                str(self.hub.root_file),
            ],
            env={**DEVICE_ENV, **(env or {})},
        )
        self.devices.append(device)
        return device

    def stop_device(self, device: ServerProcess) -> None:
        stop_server_process(device)
        self.devices.remove(device)

    def close(self) -> None:
        for device in list(self.devices):  # shown by pytest when the test failed
            try:
                print(json.dumps(sync_status(device), indent=1))
            except Exception as exc:
                print(f"no sync status: {exc!r}")
            print("".join(device.lines[-40:]))
        print("".join(self.hub.lines[-20:]))
        for device in list(self.devices):
            if device.proc.poll() is None:
                stop_server_process(device)
        self.proxy.close()
        self.hub.stop()


@pytest.fixture
def fleet(tmp_path: Path, samples: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, samples)
    yield f
    f.close()


def kinds(events: list[dict[str, Any]], *wanted: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] in wanted]


class Load:
    """Inference requests in a loop on a thread, counting answers and failures."""

    def __init__(self, device: ServerProcess) -> None:
        self.device = device
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                infer(self.device)
                self.answered += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def runtime_failure(source: Path, out: Path) -> Path:
    """A model that loads but fails every inference (reshapes 4 values into 5)."""
    model = onnx.load(str(source))
    model.graph.initializer.append(numpy_helper.from_array(np.array([5], np.int64), "badshape"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["input", "badshape"], ["bad"]))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("bad", onnx.TensorProto.FLOAT, [5])
    )
    onnx.save(model, str(out))
    return out


def acceptance_for(model: Path, out: Path, scale_expected: float = 1.0) -> Path:
    """Acceptance cases with the outputs `model` really gives (scaled: wrong on purpose)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.array(SAMPLE_INPUT, np.float32)
    (probs,) = session.run(["probabilities"], {"input": x})
    case = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": SAMPLE_INPUT[0]}],
        "outputs": [
            {
                "name": "probabilities",
                "shape": [1, 3],
                "datatype": "FP32",
                "data": (probs[0] * scale_expected).tolist(),
            }
        ],
        "rtol": 1e-4,
        "atol": 1e-5,
    }
    out.write_text(json.dumps([case]))
    return out


def batch_failure(source: Path, out: Path) -> Path:
    """A model that answers one item (the smoke inference) but fails on batches of two."""
    model = onnx.load(str(source))
    model.graph.initializer.append(numpy_helper.from_array(np.array([4], np.int64), "fourshape"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["input", "fourshape"], ["flat"]))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, [4])
    )
    onnx.save(model, str(out))
    return out
