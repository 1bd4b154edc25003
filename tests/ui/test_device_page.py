"""The device status page in headless Chromium against a real `appliance serve` process: an ONNX
image model (the sample colour classifier, with its steps), a GGUF model, an ONNX model with two
versions, a pipeline and a task, behind a bearer token. Also `appliance status` against it.

One server and one browser for the module; screenshots go to build/test-artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.registry import Registry
from tests.conftest import ROOT, ServerProcess, start_server_process, stop_server_process
from tests.support.browser import (
    axe_violations,
    browser_fixture,  # noqa: F401 (the fixture `browser`)
    page_for,
    screenshot,
)

TOKEN = "ui-test-token-5d2c"
SAMPLE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
IMAGE_STEP = {"type": "image", "size": [32, 32], "layout": "NCHW", "color": "RGB",
              "resize": "stretch", "scale": 1 / 255, "dtype": "FP32"}  # fmt: skip
LABELS = ["red", "green", "blue", "white"]
#: Chromium's own console line for an answer it was refused: what the token test expects.
REFUSED = "status of 401"


def call(server: ServerProcess, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None, ctype: str = "application/json") -> Any:  # fmt: skip
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{server.url}{path}", data=data)
    if data is not None:
        request.add_header("Content-Type", ctype)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ui-samples")
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_sample_pipeline.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def device(
    tmp_path_factory: pytest.TempPathFactory, built: Path, samples: Path, gguf_models: Path
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ui-device")
    store = Registry(root / "models")
    store.add("sample", samples / "sample.onnx")
    store.add("sample", samples / "sample.onnx", version="2", activate=False)
    store.add(  # the pipeline's classifier, with the steps that make it take a picture
        "colors_image",
        built / "color_classifier.onnx",
        preprocess=IMAGE_STEP,
        postprocess={"type": "classification", "softmax": True, "labels": LABELS},
    )
    store.add("color_classifier", built / "color_classifier.onnx")
    store.add("squares_detector", built / "squares_detector.onnx")
    store.add_pipeline("detect_classify", built / "detect_classify.pipeline.json")
    store.add("tiny", gguf_models / "tiny-llama-q8_0.gguf")
    (root / "token").write_text(TOKEN + "\n")
    (root / "config.toml").write_text(
        f'[server]\nauth_token_file = "{root / "token"}"\n'
        f'[store]\npath = "{store.root}"\n'
        '[tasks.colors]\nvariants = [{model = "colors_image"}]\n'
    )
    server = start_server_process(["--config", str(root / "config.toml")])
    picture = (built / "pictures" / "picture-01.png").read_bytes()
    try:
        for _ in range(5):
            call(server, "/v2/models/sample/infer", SAMPLE)
        for _ in range(3):
            call(server, "/v2/models/colors/infer", raw=picture, ctype="image/png")
        call(server, "/v2/models/tiny/generate", {"text_input": "Hi", "max_tokens": 4})
        with pytest.raises(urllib.error.HTTPError):
            call(server, "/v2/models/sample/infer", {"inputs": []})
        yield server
    finally:
        stop_server_process(server)


def _open(
    browser: Any, server: ServerProcess, fragment: str = "", token: str | None = TOKEN
) -> Any:
    # bypass_csp: the page's CSP (script-src 'self') would refuse the injected axe-core
    watched = page_for(browser, viewport={"width": 1400, "height": 900}, bypass_csp=True)
    if token:
        watched.page.add_init_script(f"sessionStorage.setItem('appliance.token', {token!r})")
    watched.page.goto(f"http://{server.url}/{fragment}")
    return watched


def _loaded(page: Any) -> None:
    page.wait_for_selector("#view[data-loaded]", timeout=20000)


def test_without_the_token_the_page_asks_for_it_and_shows_no_data(
    browser: Any, device: ServerProcess
) -> None:
    watched = _open(browser, device, token=None)
    page = watched.page
    page.wait_for_selector("#auth:not([hidden])", timeout=20000)
    assert "needs its bearer token" in page.inner_text("#auth-message")
    assert page.locator("tr[data-model]").count() == 0
    screenshot(page, "device-token-prompt")
    page.fill("#token-input", "wrong")
    page.click("#auth button[type=submit]")
    page.wait_for_function(
        "document.querySelector('#auth-message').textContent.includes('refused')"
    )
    assert page.locator("tr[data-model]").count() == 0
    assert all(REFUSED in e for e in watched.errors), watched.errors
    page.fill("#token-input", TOKEN)
    page.click("#auth button[type=submit]")
    _loaded(page)
    assert page.locator("tr[data-model]").count() == 6
    page.context.close()


def test_overview_shows_what_the_api_says(browser: Any, device: ServerProcess) -> None:
    watched = _open(browser, device)
    page = watched.page
    _loaded(page)
    status = call(device, "/api/status")
    for m in status["models"]:
        row = page.locator(f'tr[data-model="{m["name"]}"]')

        def cell(field: str, row: Any = row) -> str:
            return str(row.locator(f'[data-field="{field}"]').inner_text()).strip()

        assert cell("version") == m["version"]
        assert cell("backend") == m["backend"]
        assert cell("status") == m["status"]
        assert cell("queue_depth") == str(m["queue_depth"])
        assert cell("requests") == str(m["last_5m"]["requests"]), m["name"]
        assert cell("device").startswith(m["device"] or "\u2013")  # an en dash: none
    by_name = {m["name"]: m for m in status["models"]}
    assert by_name["sample"]["last_5m"]["requests"] == 6
    assert by_name["colors_image"]["last_5m"]["requests"] == 3
    assert by_name["detect_classify"]["status"] == "ready"
    assert by_name["tiny"]["backend"] == "gguf" and by_name["tiny"]["last_5m"]["requests"] == 1
    task = page.locator('tr[data-task="colors"]')
    assert task.locator('[data-field="requests"]').inner_text() == "3"
    assert task.locator('[data-field="serving"]').inner_text() == "colors_image/1"
    assert page.locator('tr[data-model="sample"] + tr svg.spark').count() == 3
    assert "/v2/models/sample/infer" in page.inner_text("#errors")
    assert page.inner_text("#device-runs-on") == "CPU only"
    screenshot(page, "device-overview")
    assert axe_violations(page) == []
    watched.assert_clean()
    page.context.close()


def test_activate_rollback_and_try_it_on_a_models_page(browser: Any, device: ServerProcess) -> None:
    watched = _open(browser, device, "#/models/sample")
    page = watched.page
    _loaded(page)
    assert page.inner_text("#model-version") == "1"
    page.click('button[data-activate="2"]')
    page.wait_for_function("document.querySelector('#model-version').textContent === '2'")
    assert call(device, "/v2/models/sample")["versions"] == ["2"]
    assert call(device, "/api/models/sample")["active"] == "2"
    page.click("#rollback")
    page.wait_for_function("document.querySelector('#model-version').textContent === '1'")
    assert call(device, "/v2/models/sample")["versions"] == ["1"]
    assert '"backend": "onnx"' in page.inner_text("#manifest")
    page.click("#try-body + button")
    page.wait_for_function("document.querySelector('#try-answer').textContent.includes('outputs')")
    answer = json.loads(page.inner_text("#try-answer"))
    expected = call(device, "/v2/models/sample/infer", json.loads(page.input_value("#try-body")))
    assert answer["outputs"] == expected["outputs"]
    screenshot(page, "device-model-sample")
    assert axe_violations(page) == []
    watched.assert_clean()
    page.context.close()


def test_picture_upload_pipeline_graph_and_generation(
    browser: Any, device: ServerProcess, built: Path
) -> None:
    watched = _open(browser, device, "#/models/colors_image")
    page = watched.page
    _loaded(page)
    assert page.locator("svg.graph g.node").count() == 5  # inputs, image, model, classify, outputs
    page.set_input_files("#try-file", str(built / "pictures" / "picture-01.png"))
    page.click("#try-file + button")
    page.wait_for_function("document.querySelector('#try-answer').textContent.includes('outputs')")
    answer = json.loads(page.inner_text("#try-answer"))
    assert answer["model_name"] == "colors_image"
    picture = (built / "pictures" / "picture-01.png").read_bytes()
    direct = call(device, "/v2/models/colors_image/infer", raw=picture, ctype="image/png")
    assert answer["outputs"] == direct["outputs"]
    screenshot(page, "device-model-image")

    page.goto(f"http://{device.url}/#/models/detect_classify")
    page.wait_for_selector("svg.graph[aria-label^='pipeline graph']", timeout=20000)
    meta = call(device, "/v2/models/detect_classify")
    assert page.locator("svg.graph g.node").count() == len(meta["parameters"]["nodes"]) + 1
    screenshot(page, "device-model-pipeline")

    page.goto(f"http://{device.url}/#/models/tiny")
    page.wait_for_selector("#try-prompt", timeout=20000)
    page.fill("#try-prompt", "Once upon")
    page.click("#try-prompt + button")
    page.wait_for_function(
        "document.querySelector('#try-answer').textContent.includes('text_output')", timeout=60000
    )
    assert json.loads(page.inner_text("#try-answer"))["model_name"] == "tiny"
    screenshot(page, "device-model-gguf")
    assert axe_violations(page) == []
    watched.assert_clean()
    page.context.close()


def test_appliance_status_in_the_terminal(device: ServerProcess, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    base = [sys.executable, "-m", "appliance", "status", "--url", f"http://{device.url}"]
    out = subprocess.run([*base, "--token-file", str(token)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ready" in out.stdout.splitlines()[0]
    status = call(device, "/api/status")
    for m in status["models"]:
        line = next(x for x in out.stdout.splitlines() if x.strip().startswith(m["name"] + " "))
        assert m["version"] in line.split() and m["backend"] in line.split()
    assert "colors:" in out.stdout
    out = subprocess.run([*base, "--token-file", str(token), "--json"], capture_output=True,
                         text=True)  # fmt: skip
    assert {m["name"] for m in json.loads(out.stdout)["models"]} == {
        m["name"] for m in status["models"]
    }
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    out = subprocess.run(base, capture_output=True, text=True, env=env)  # no token anywhere
    assert out.returncode == 1 and "token is missing or wrong" in out.stderr
