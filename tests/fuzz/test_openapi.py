"""Schemathesis over the appliance's and the hub's own /openapi.json, against real processes
over loopback HTTP: the device's fast path and its aiohttp application, a device with a token,
and a hub. Requests the document allows and requests it refuses, on every route.

Checks on every answer: never a 5xx; a status, Content-Type, headers and body the document
declares; a request the document refuses is a 4xx; with a token configured, a route that is not
public refuses the request without it. After each example a good request is still answered, and
at the end the server's log holds no traceback.

Not checked: that a request the document allows is accepted (schemathesis'
positive_data_acceptance): a valid KServe body for a model with other inputs is a 400; and that
an invalid body is refused on the routes whose bodies are published schemas (PUBLISHED_BODY).

Examples: APPLIANCE_FUZZ_EXAMPLES (conftest.py) per test; `make fuzz-long` runs many more."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ROOT, ServerProcess, start_server_process, stop_server_process

from .conftest import EXAMPLES, QUIET
from .fronts import assert_clean_log
from .test_kserve_http import GOOD

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
TOKEN = "fuzz-token-0123456789"
#: Routes whose body is a published schema (OIP, generate, OpenAI): there a null for an optional
#: field counts as leaving it out (tests/fuzz/oracle.py), which schemathesis calls accepting
#: invalid data. The other fuzz tests hold these routes to their schemas field by field.
PUBLISHED_BODY = re.compile(r"/(infer|generate|generate_stream)$|^/v1/")
#: Examples per test: a quarter of the fuzz profile's (each example is one HTTP request and a
#: good one after it; the hub's publishes hash and sign).
PER_TEST = max(10, EXAMPLES // 4)


@dataclass
class Target:
    """A live server and how to talk to it."""

    url: str
    headers: Callable[[str], dict[str, str]]
    good: Callable[[requests.Session], None]
    log: Callable[[int], int]
    token: bool

    @functools.cached_property
    def operations(self) -> list[Any]:
        schema = schemathesis.openapi.from_url(self.url + "/openapi.json")
        # the token comes from `headers`: a negative case that drops it would be sent with it
        schema.config.generation.update(with_security_parameters=False)
        return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


def _device(server: ServerProcess, token: str = "") -> Target:
    auth = {"Authorization": f"Bearer {token}"} if token else {}

    def good(session: requests.Session) -> None:
        r = session.post(
            f"http://{server.url}/v2/models/sample/infer",
            data=GOOD,
            headers={"Content-Type": "application/json", **auth},
            timeout=30,
        )
        assert r.status_code == 200, r.text

    return Target(
        f"http://{server.url}",
        lambda path: auth,
        good,
        lambda since: assert_clean_log(server, since),
        bool(token),
    )


@pytest.fixture(scope="module")
def token_server(kserve_store: Path) -> Iterator[ServerProcess]:
    server = start_server_process(
        ["--models", str(kserve_store)],
        env={
            **QUIET,
            "APPLIANCE_SERVER__AUTH_TOKEN": TOKEN,
            # every request without the token is a failed attempt: past the limit they would
            # be 429s, not the 401 each route is checked for (tests/api/test_auth.py tests it)
            "APPLIANCE_SERVER__AUTH_FAILURES_PER_MINUTE": "1000000",
        },
    )
    yield server
    stop_server_process(server)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Iterator[Target]:
    """`appliance hub serve` with a published model, an enrolled device and a rollout."""
    data = tmp_path_factory.mktemp("fuzz-hub") / "data"
    cmd = [sys.executable, "-m", "appliance", "hub"]
    subprocess.run([*cmd, "init", "--data", str(data)], check=True, capture_output=True, cwd=ROOT)
    proc = subprocess.Popen(
        [*cmd, "serve", "--data", str(data), "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    m = re.search(r"http://[\d.]+:(\d+)", line)
    assert m, line + proc.stderr.read()
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
    url = f"http://127.0.0.1:{m.group(1)}"
    admin = (data / "admin.token").read_text().strip()
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {admin}"
        with (samples / "sample.onnx").open("rb") as f:
            r = s.post(
                url + "/api/v1/admin/models",
                data={"name": "sample", "version": "1"},
                files={"file": ("sample.onnx", f)},
            )
        assert r.status_code == 201, r.text
        r = s.post(url + "/api/v1/admin/devices", json={"device_id": "fuzz-dev"})
        device = r.json()["token"]
        r = s.post(
            url + "/api/v1/admin/rollouts",
            json={"model": "sample", "version": "1", "target": {"all": True}},
        )
        assert r.status_code == 201, r.text

    def headers(path: str) -> dict[str, str]:
        if path.startswith("/api/v1/device/"):
            return {"Authorization": f"Bearer {device}", "X-Device-Id": "fuzz-dev"}
        return {"Authorization": f"Bearer {admin}"}

    def good(session: requests.Session) -> None:
        r = session.get(url + "/api/v1/device/assignments", headers=headers("/api/v1/device/"))
        # (the fuzzer may have halted or rolled back the rollout: real ids are examples)
        assert r.status_code == 200 and isinstance(r.json()["models"], list), r.text

    def log(since: int) -> int:
        assert proc.poll() is None, "the hub exited:\n" + "".join(lines[-30:])
        bad = [line for line in lines[since:] if "Traceback" in line or "unhandled" in line]
        assert not bad, "the hub logged:\n" + "".join(bad[:3])
        return len(lines)

    yield Target(url, headers, good, log, True)
    proc.terminate()
    proc.wait(10)


def _fuzz(target: Target, data: st.DataObject, session: requests.Session) -> None:
    operations = target.operations
    mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
    op = data.draw(st.sampled_from(operations), label="operation")
    # load/unload only the spare model: the others serve the good requests and other tests
    # (and switch only its versions: api/status.py's activate and rollback)
    switches = op.path.startswith("/api/models/{name}/")
    pinned = {"name": "spare"} if op.path.startswith("/v2/repository/models/") or switches else None
    case = data.draw(op.as_strategy(generation_mode=mode, path_parameters=pinned), label="case")
    checks = list(CHECKS)
    if mode == GenerationMode.NEGATIVE and not PUBLISHED_BODY.search(op.path):
        checks.append(negative_data_rejection)
    if target.token:
        checks.append(ignored_auth)
    headers = target.headers(op.path)
    response = case.call(session=session, headers=headers, timeout=30)
    event(f"{op.method.upper()} {op.path}: {response.status_code}")
    case.validate_response(
        response, checks=checks, headers=headers, transport_kwargs={"session": session}
    )
    target.good(session)


def _run(target: Target) -> None:
    seen = [target.log(0)]
    with requests.Session() as session:

        @settings(
            max_examples=PER_TEST,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            _fuzz(target, data, session)

        run()
        target.good(session)
    target.log(seen[0])


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
def test_device_api(request: pytest.FixtureRequest, front: str) -> None:
    _run(_device(request.getfixturevalue(f"{front}_server")))


def test_device_api_with_a_token(token_server: ServerProcess) -> None:
    target = _device(token_server, TOKEN)
    r = requests.get(target.url + "/v2", timeout=10)
    assert r.status_code == 401 and r.json()["error"]
    assert requests.get(target.url + "/openapi.json", timeout=10).status_code == 200
    _run(target)


def test_hub_api(hub: Target) -> None:
    _run(hub)


def test_every_route_of_the_document_refuses_a_request_without_its_token(
    token_server: ServerProcess, hub: Target
) -> None:
    """No route but the public ones (health, the document, the pages and their files) answers
    without a token (each path parameter filled with something plausible)."""
    for url in (f"http://{token_server.url}", hub.url):
        doc = requests.get(url + "/openapi.json", timeout=10).json()
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                filled = re.sub(r"\{([^}]+)\}", functools.partial(_plausible, op), path)
                r = requests.request(method.upper(), url + filled, timeout=10)
                if op.get("security") == []:
                    assert r.status_code < 400, (method, path, r.status_code)
                else:
                    assert r.status_code == 401, (method, path, r.status_code, r.text)


def _plausible(op: dict[str, Any], match: re.Match[str]) -> str:
    """A value of the path parameter `match` names: the first it allows (a page's file), else
    "sample"."""
    name = match.group(1)
    for param in op.get("parameters", []):
        if param["name"] == name and param["in"] == "path" and "enum" in param["schema"]:
            return str(param["schema"]["enum"][0])
    return "sample"
