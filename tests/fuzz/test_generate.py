"""The OIP generate extension of a real `appliance serve` (the tiny GGUF model made offline by
build/make_gguf_models.py) against the published schema (tests/schemas/generate_rest.yaml):
valid requests get answers in the schema's shape, a field the schema refuses is a 400 naming
it, nothing is ever a 5xx, and the server keeps answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from appliance.registry import Registry
from tests.conftest import ServerProcess, start_server_process, stop_server_process

from . import schemas
from .conftest import QUIET
from .fronts import Answer, Http, assert_clean_log
from .mutate import Mutation, dumps, mutations
from .oracle import judge

MODEL = "tiny"
ROUTES = (f"/v2/models/{MODEL}/generate", f"/v2/models/{MODEL}/generate_stream")
GOOD = {"text_input": "Hi", "parameters": {"max_tokens": 2, "temperature": 0}}
#: Values the published schema allows but this server refuses, by the field its 400 names
#: (the schema sets no upper bound on these; this server's are OpenAI's).
NARROWER = ("temperature", "best_of", "frequency_penalty", "max_tokens", "context window")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gguf_models: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz-generate-store")
    Registry(root).add(MODEL, gguf_models / "tiny-llama-q8_0.gguf")
    env = {**QUIET, "APPLIANCE_MODEL_DEFAULTS__GGUF__DEFAULT_MAX_TOKENS": "4"}
    proc = start_server_process(["--models", str(root)], env=env)
    yield proc
    stop_server_process(proc)


@pytest.fixture(scope="module")
def gen(server: ServerProcess) -> Iterator[Any]:
    client = Http(server)
    first = client.post_json(ROUTES[0], dumps(GOOD))
    assert first.status == 200, first.payload
    seen = [assert_clean_log(server)]

    def check() -> None:
        seen[0] = assert_clean_log(server, seen[0])
        again = client.post_json(ROUTES[0], dumps(GOOD))
        assert again.status == 200 and again.json() == first.json()  # greedy: the same text

    client.check = check  # type: ignore[attr-defined]
    yield client
    client.close()
    assert_clean_log(server, seen[0])


def check_answer(route: str, answer: Answer) -> None:
    doc = schemas.generate()
    if route.endswith("_stream"):
        assert answer.headers.get("content-type", "").startswith("text/event-stream")
        chunks = answer.payload.decode().split("\n\n")
        assert chunks[-1] == ""
        events = [orjson.loads(c.removeprefix("data: ")) for c in chunks[:-1]]
        for e in events:
            assert not doc.errors("GenerateStreamResponse", e), e
        assert events[-1]["done"] is True
    else:
        assert not doc.errors("GenerateResponse", answer.json()), answer.json()


def small(body: Any) -> Any:
    """1 to 8 new tokens (the fuzz is about requests, not generation), and the values the
    schema leaves open brought into this server's ranges (NARROWER), so that a mutation is the
    one thing wrong with a body."""
    params = body.get("parameters")
    if not isinstance(params, dict):
        return body
    if isinstance(params.get("max_tokens"), int):
        params["max_tokens"] = min(max(params["max_tokens"], 1), 8)
    for key, top in (("temperature", 2), ("frequency_penalty", 2)):
        if isinstance(params.get(key), (int, float)):
            params[key] = min(params[key], top)
    if isinstance(params.get("best_of"), int):
        params["best_of"] = 1
    return body


REQUESTS = schemas.generate().valid_values("GenerateRequest").map(small)
ROUTE = st.sampled_from(ROUTES)


@given(route=ROUTE, body=REQUESTS)
def test_valid_requests_get_schema_valid_answers(gen: Any, route: str, body: Any) -> None:
    answer = gen.post_json(route, dumps(body))
    if answer.status == 400 and any(f in answer.message for f in NARROWER):
        event("a value beyond this server's narrower range")
        return
    assert answer.status == 200, (body, answer.status, answer.message)
    check_answer(route, answer)
    gen.check()


@given(data=st.data())
def test_broken_fields_are_400s_that_name_them(gen: Any, data: st.DataObject) -> None:
    route = data.draw(ROUTE, label="route")
    body = data.draw(REQUESTS, label="body")
    mutation: Mutation = data.draw(mutations(body), label="mutation")
    answer = gen.post_json(route, mutation.wire())
    judge(mutation, answer.status, answer.message, schemas.generate(), "GenerateRequest")
    if answer.status == 200:
        check_answer(route, answer)
    gen.check()


@given(payload=st.binary(max_size=200), route=ROUTE)
def test_bytes_that_are_not_json(gen: Any, payload: bytes, route: str) -> None:
    answer = gen.post_json(route, payload)
    assert answer.status == 400, (payload, answer.status, answer.message)
    gen.check()
