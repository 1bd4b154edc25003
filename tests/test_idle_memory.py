"""What an ONNX-only device holds at idle (issue 22): the modules it imported, and the freed heap it
gives back. The RSS figures themselves belong to tests/bench/memory_breakdown.py (a threshold
here would depend on the machine); these checks are deterministic, so savings cannot silently
regress."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance import heap
from appliance.bench.client import free_port

ROOT = Path(__file__).resolve().parent.parent

#: Third-party packages `appliance serve` of one ONNX model may have imported once it answered a
#: KServe v2 infer request: the runtime, the fast loop and JSON. Not aiohttp: the fast path
#: answers infer itself, and aiohttp is imported by the first request it hands over (api/app.py;
#: about 14 MiB). Not prometheus_client: the first scrape of /metrics imports it (metrics.py;
#: ~4.5 MiB with the stdlib its exposition module pulls in). Anything else (Jinja2, PyYAML,
#: jsonschema, grpc, OpenTelemetry, tuf, paho, Pillow, llama-cpp, LiteRT, ...) is imported only
#: by the feature that needs it.
ALLOWED_PACKAGES = {"numpy", "onnxruntime", "uvloop", "orjson"}
#: The interpreter's own, Cython's runtime modules, an editable install's finder.
_NOT_PACKAGES = ("__main__", "_cython_", "cython_runtime", "__editable__", "_distutils_hack")

#: Parts of the appliance a device serving ONNX models, with no hub, no MQTT, no gRPC and no
#: tracing configured, never needs: each is imported by the feature that uses it.
NOT_AT_IDLE = (
    "appliance.hub.",  # but hub/__init__ and hub/cli (the CLI's parser), checked below
    "appliance.sync",
    "appliance.backends.gguf",
    "appliance.backends.gguf_file",
    "appliance.backends.tflite",
    "appliance.backends.onnx_text",
    "appliance.api.grpc",
    "appliance.api.grpc_codec",
    "appliance.api.mqtt",
    "appliance.tracing.otel",
    "appliance.bench",
    "appliance.build.",  # but build/command (the CLI's parser)
    "appliance.selftest",
    "appliance.status_view",
    "appliance.steps",  # imported by the first model that declares steps (engine.py)
    "appliance.preprocess",  # with a model that declares image pre-processing, or an upload
    "appliance.pipelines.declaration",  # with the first pipeline (pipelines/served.py)
    "appliance.pipelines.executor",
    "appliance.guards.pii",  # with PII masking configured
    "appliance.guards.stream",
    "appliance.formats.templates",  # with a model that has report templates
    "appliance.formats.values",
    # aiohttp's routes and what only they import (api/app.py)
    "appliance.api.http.",
    "appliance.api.openai",
    "appliance.api.openapi",
    "appliance.api.status",
    "appliance.api.ui",
    "appliance.api.ws.",
    "appliance.api.generate",
    "appliance.api.trace_settings",
    "appliance.openapi",
    "appliance.multipart",
)
_CLI_PARTS = {"appliance.hub", "appliance.hub.cli", "appliance.build", "appliance.build.command"}
#: The standard library's share: what only the hub's commands, the exposition format, plugins,
#: store writes and pipelines use (each ~0.1-2.5 MiB with what it imports in turn).
STDLIB_NOT_AT_IDLE = (
    "email",  # the Date header is formatted by httphead.http_date
    "http.client",
    "http.server",
    "urllib.request",
    "wsgiref",
    "importlib.metadata",  # read by the first plugin lookup (plugins.entries)
    "mimetypes",
    "secrets",
    "tempfile",  # by the store's writes (registry.py)
    "graphlib",
)

# `appliance serve` in the main thread, as the CLI runs it; a thread sends one request over a
# bare socket (so that it imports nothing serve would not), then prints sys.modules; then it
# sends a request the fast path hands to aiohttp, prints its status line and stops the server.
_PROBE = textwrap.dedent(
    """
    import os, signal, socket, sys, threading, time
    MODEL, PORT = sys.argv[1], int(sys.argv[2])
    BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    REQ = (b"POST /v2/models/sample/infer HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n"
           b"Content-Length: %d\\r\\n\\r\\n" % len(BODY)) + BODY

    def ask(request):
        with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    def probe():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                data = ask(REQ)
                if data.startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        time.sleep(0.2)  # what answering set off has run
        sys.stdout.write("\\n".join(sorted(sys.modules)) + "\\n")
        scrape = ask(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        head, _, body = scrape.partition(b"\\r\\n\\r\\n")
        lines = [line for line in head.split(b"\\r\\n") if line.lower().startswith(b"content-type")]
        lines += [line for line in body.split(b"\\n") if line.startswith(b"appliance_inference_re")]
        sys.stdout.write("\\n".join("scrape: " + line.decode() for line in lines) + "\\n")
        answer = ask(b"GET /v2 HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        sys.stdout.write("handed-over: " + answer.split(b"\\r\\n", 1)[0].decode() + "\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=probe, daemon=True).start()
    from appliance.cli import main
    sys.exit(main(["serve", "--model", MODEL, "--name", "sample", "--port", str(PORT),
                   "--log-level", "error"]))
    """
)


@pytest.fixture(scope="module")
def probe_lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """What the probe printed: sys.modules of `appliance serve --model sample.onnx` after its
    first answer, then the status line of the request handed over to aiohttp."""
    out = tmp_path_factory.mktemp("idle")
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_sample_models.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    probe = out / "probe.py"
    probe.write_text(_PROBE)
    run = subprocess.run(
        [sys.executable, str(probe), str(out / "sample.onnx"), str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    lines = run.stdout.splitlines()
    assert "appliance.server" in lines, run.stderr
    return lines


@pytest.fixture(scope="module")
def idle_modules(probe_lines: list[str]) -> list[str]:
    return [line for line in probe_lines if not line.startswith(("handed-over:", "scrape: "))]


def test_aiohttp_answers_the_first_request_the_fast_path_hands_over(
    probe_lines: list[str],
) -> None:
    """aiohttp was not imported at idle (below); GET /v2 makes its application, which answers."""
    assert probe_lines[-1] == "handed-over: HTTP/1.1 200 OK", probe_lines[-3:]


def test_the_first_scrape_imports_prometheus_client_and_answers(probe_lines: list[str]) -> None:
    """Not imported at idle (below), the exposition format is made by the first scrape."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    scrape = [line.removeprefix("scrape: ") for line in probe_lines if line.startswith("scrape: ")]
    assert scrape[0] == f"Content-Type: {CONTENT_TYPE_LATEST}", scrape
    assert (
        'appliance_inference_requests_total{model="sample",outcome="success",version="1"} 1.0'
        in scrape
    ), scrape


def test_an_onnx_device_imports_no_optional_package_at_idle(idle_modules: list[str]) -> None:
    tops = {m.split(".", 1)[0] for m in idle_modules}
    third_party = {
        t
        for t in tops - set(sys.stdlib_module_names) - {"appliance"}
        if not t.startswith(_NOT_PACKAGES)
    }
    assert third_party <= ALLOWED_PACKAGES, sorted(third_party - ALLOWED_PACKAGES)


def test_an_onnx_device_imports_no_unused_part_of_the_appliance(idle_modules: list[str]) -> None:
    bad = [
        m
        for m in idle_modules
        if m not in _CLI_PARTS and any(m == p.rstrip(".") or m.startswith(p) for p in NOT_AT_IDLE)
    ]
    assert not bad, bad
    assert "appliance.backends.onnx" in idle_modules  # the probe did reach a served model


def test_an_onnx_device_imports_no_unused_part_of_the_standard_library(
    idle_modules: list[str],
) -> None:
    bad = [
        m for m in idle_modules if any(m == p or m.startswith(p + ".") for p in STDLIB_NOT_AT_IDLE)
    ]
    assert not bad, bad


def test_release_hands_freed_heap_pages_back() -> None:
    """glibc keeps freed pages mapped below the heap's top; `heap.release` returns them (what
    a model load leaves behind: tests/bench/memory_breakdown.py measures it on real models)."""
    if not heap.release():
        pytest.skip("this C library has no malloc_trim")
    code = textwrap.dedent(
        """
        from appliance import heap

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) // 1024

        blocks = [bytearray(2000) for _ in range(40_000)]  # ~80 MiB of malloc'ed heap
        pin = bytearray(2000)  # above them: the heap's top cannot shrink by itself
        del blocks
        before = anon()
        heap.release()
        print(before, anon())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    before, after = map(int, out.stdout.split())
    assert before - after >= 40, (before, after)  # MiB


async def test_the_engine_releases_the_heap_after_a_load_and_an_unload(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = heap.release

    def counted() -> bool:
        calls.append(1)
        return real()

    monkeypatch.setattr(heap, "release", counted)
    client = await serve()
    loaded = len(calls)
    assert loaded >= 1
    r = await client.post("/v2/repository/models/sample/unload")
    assert r.status == 200, await r.text()
    assert len(calls) == loaded + 1
