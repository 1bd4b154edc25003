"""The OpenAI routes of a real `appliance serve` (GGUF models made offline by
build/make_gguf_models.py), against OpenAI's published schema (tests/schemas/openai_v1.json):
valid requests get answers in the schema's shape, a field the schema refuses is a 400 naming
it (`error.param`), nothing is ever a 5xx, and the server keeps answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from appliance.registry import Registry
from tests.conftest import ServerProcess, start_server_process, stop_server_process

from . import schemas
from .conftest import QUIET
from .fronts import Answer, Http, assert_clean_log
from .mutate import Mutation, dumps, mutations
from .openai_requests import CHAT_MODEL, EMBEDDING_MODEL, ROUTES, check_answer
from .oracle import judge

GOOD_CHAT = dumps(
    {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
     "temperature": 0}
)  # fmt: skip


@pytest.fixture(scope="module")
def llm_server(
    tmp_path_factory: pytest.TempPathFactory, gguf_models: Path
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz-llm-store")
    registry = Registry(root)
    registry.add(CHAT_MODEL, gguf_models / "tiny-llama-q8_0.gguf")
    registry.add(EMBEDDING_MODEL, gguf_models / "minilm-q8_0.gguf")
    # Few tokens when a request names no maximum: the fuzz is about requests, not generation.
    env = {**QUIET, "APPLIANCE_MODEL_DEFAULTS__GGUF__DEFAULT_MAX_TOKENS": "4"}
    server = start_server_process(["--models", str(root)], env=env)
    yield server
    stop_server_process(server)


@pytest.fixture(scope="module")
def oai(llm_server: ServerProcess) -> Iterator[Any]:
    client = Http(llm_server)
    first = post(client, "/v1/chat/completions", GOOD_CHAT)
    assert first.status == 200, first.payload
    seen = [assert_clean_log(llm_server)]

    def check() -> None:
        seen[0] = assert_clean_log(llm_server, seen[0])
        again = post(client, "/v1/chat/completions", GOOD_CHAT)
        assert again.status == 200, again.payload
        assert again.json()["choices"] == first.json()["choices"]  # greedy: the same text

    client.check = check  # type: ignore[attr-defined]
    yield client
    client.close()
    assert_clean_log(llm_server, seen[0])


def post(client: Http, route: str, body: bytes) -> Answer:
    return client.post_json(route, body)


ROUTE = st.sampled_from(sorted(ROUTES))


@given(data=st.data())
def test_valid_requests_get_schema_valid_answers(oai: Any, data: st.DataObject) -> None:
    route = data.draw(ROUTE, label="route")
    request_schema, _, _, requests = ROUTES[route]
    body = data.draw(requests, label="body")
    assert not schemas.openai().errors(request_schema, body), "the generator strayed"
    answer = post(oai, route, dumps(body))
    if answer.status == 400 and "context window" in answer.message:
        event("longer than the model's context")  # the one refusal a valid body may get
        return
    assert answer.status == 200, (body, answer.status, answer.message)
    check_answer(route, body, answer.headers.get("content-type", ""), answer.payload)
    oai.check()


@given(data=st.data())
def test_broken_fields_are_400s_that_name_them(oai: Any, data: st.DataObject) -> None:
    route = data.draw(ROUTE, label="route")
    request_schema, _, _, requests = ROUTES[route]
    body = data.draw(requests, label="body")
    mutation: Mutation = data.draw(mutations(body), label="mutation")
    answer = post(oai, route, mutation.wire())
    # a model name that is a string but names no model: 404
    judge(mutation, answer.status, answer.message, schemas.openai(), request_schema)
    if answer.status == 200:
        check_answer(route, mutation.body, answer.headers.get("content-type", ""), answer.payload)
    oai.check()


@given(data=st.data())
def test_any_published_field_value_is_never_a_5xx(oai: Any, data: st.DataObject) -> None:
    """One field of a valid request set to any value its published schema allows (tools,
    audio, logprobs, response formats...): answered, or refused with a 4xx, never a 5xx."""
    route = data.draw(ROUTE, label="route")
    request_schema, _, _, requests = ROUTES[route]
    body = data.draw(requests, label="body")
    doc = schemas.openai()
    fields = doc.properties(request_schema)
    name = data.draw(st.sampled_from(sorted(set(fields) - {"model"})), label="field")
    value = data.draw(doc.values(fields[name], depth=2), label="value")
    body = {**body, name: value}
    answer = post(oai, route, dumps(body))
    event(f"status {answer.status}")
    assert answer.status < 500, (name, value, answer.status, answer.message)
    if answer.status == 200:
        check_answer(route, body, answer.headers.get("content-type", ""), answer.payload)
    oai.check()


@given(payload=st.binary(max_size=200), route=ROUTE)
def test_bytes_that_are_not_json(oai: Any, payload: bytes, route: str) -> None:
    answer = post(oai, route, payload)
    assert answer.status == 400, (payload, answer.status, answer.message)
    oai.check()


def test_model_listing_matches_the_schema(oai: Any) -> None:
    doc = schemas.openai()
    listing = oai.request("GET", "/v1/models")
    assert listing.status == 200
    assert not doc.errors("ListModelsResponse", listing.json()), listing.json()
    assert {m["id"] for m in listing.json()["data"]} == {CHAT_MODEL, EMBEDDING_MODEL}
    one = oai.request("GET", f"/v1/models/{CHAT_MODEL}")
    assert not doc.errors("Model", one.json()), one.json()
