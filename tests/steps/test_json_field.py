"""json_field: paths, datatypes, and what a model's bad JSON gives."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import InferenceFailed, InvalidInput, ModelError
from appliance.steps.json_field import parse_path, pick, show
from appliance.tensors import TensorSpec
from tests.steps.helpers import parse, run

DOC = {"result": {"items": [{"label": "cat", "p": 0.9}, {"label": "dog", "p": 0.1}]}, "a.b": [1, 2]}


def texts(*docs: object) -> np.ndarray:
    return np.array(
        [d if isinstance(d, (str, bytes)) else json.dumps(d).encode() for d in docs], dtype=object
    )


def test_paths_pick_values_as_bytes_or_numbers() -> None:
    label = parse({"type": "json_field", "path": "result.items[0].label"})
    assert run(label, text=texts(DOC))["value"].tolist() == [b"cat"]
    whole = parse({"type": "json_field", "path": "result.items[-1]", "outputs": {"value": "last"}})
    assert run(whole, text=texts(DOC))["last"].tolist() == [b'{"label":"dog","p":0.1}']
    p = parse({"type": "json_field", "path": "result.items[1].p", "datatype": "FP32"})
    out = run(p, text=texts(DOC, {"result": {"items": [0, {"p": 2}]}}))["value"]
    assert out.dtype == np.float32 and out.tolist() == [pytest.approx(0.1), 2.0]
    dotted = parse({"type": "json_field", "path": '["a.b"][1]', "datatype": "INT64"})
    assert run(dotted, text=texts(DOC))["value"].tolist() == [2]
    # a language model's fenced answer, as str
    fenced = "```json\n" + json.dumps(DOC) + "\n```\n"
    assert run(label, text=np.array([fenced], dtype=object))["value"].tolist() == [b"cat"]
    assert run(label, text=texts(DOC, DOC).reshape(2, 1))["value"].shape == (2, 1)


def test_bad_model_output_is_a_500_naming_the_step_or_empty() -> None:
    step = parse({"type": "json_field", "path": "result.items[0].label"})
    for text, message in (
        (b"{not json", r"element 0 is not JSON"),
        (
            json.dumps({"result": {}}).encode(),
            r"no result\.items\[0\]\.label: result has no key 'items'",
        ),
        (json.dumps({"result": {"items": []}}).encode(), r"result\.items has 0 items, no \[0\]"),
        (b"\xff\xfe", r"UnicodeDecodeError"),
    ):
        with pytest.raises(
            InferenceFailed, match=r"step 'json_field' failed: .*" + message
        ) as caught:
            run(step, text=np.array([text], dtype=object))
        assert caught.value.status == 500
    number = parse({"type": "json_field", "path": "result", "datatype": "FP32"})
    with pytest.raises(InferenceFailed, match=r"result is \{\"items\".*not a number for FP32"):
        run(number, text=texts(DOC))
    empty = parse({"type": "json_field", "path": "x", "datatype": "INT32", "on_error": "empty"})
    out = run(empty, text=texts({"y": 1}))["value"]
    assert out.shape == (0,) and out.dtype == np.int32
    assert run(empty, text=texts({"x": 7}))["value"].tolist() == [7]
    two = run(empty, text=texts({"x": 1}, "oops").reshape(2, 1))["value"]
    assert two.shape == (0, 1)
    spec = empty.specs({"text": TensorSpec("text", "BYTES", (2, 1))})["value"]
    assert spec == TensorSpec("value", "INT32", (-1, 1))
    small = parse({"type": "json_field", "path": "x", "max_bytes": 8})
    with pytest.raises(InferenceFailed, match=r"element 0 is 12 bytes, more than max_bytes 8"):
        run(small, text=texts({"x": 12345}))
    with pytest.raises(InvalidInput, match=r"tensor 'text' must be BYTES text"):
        run(step, text=np.zeros(2, np.float32))


def test_declaration_checks() -> None:
    available = {"text_output": ("BYTES", (-1,)), "logits": ("FP32", (1, 4))}
    step = parse(
        {"type": "json_field", "path": "a", "inputs": {"text": "text_output"}}, **available
    )
    assert step.reads == ("text_output",) and step.writes == ("value",)
    spec = step.specs({"text_output": TensorSpec("text_output", "BYTES", (1,))})
    assert spec == {"value": TensorSpec("value", "BYTES", (1,))}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"path": ""}, r"path: '': empty"),
        ({"path": "a..b"}, r"path: 'a\.\.b': cannot read '\.\.b' \(at character 1\)"),
        ({"path": "a[x]"}, r"path: 'a\[x\]': cannot read"),
        ({"path": 3}, r"path: must be a path like a\.b\[0\]\.c"),
        ({"path": "a", "datatype": "STRING"}, r"datatype: must be one of"),
        ({"path": "a", "on_error": "ignore"}, r"on_error: must be one of fail, empty"),
        (
            {"path": "a", "inputs": {"text": "logits"}},
            r"inputs\.text: tensor 'logits' is FP32, not BYTES",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(ModelError, match=message):
            parse({"type": "json_field", "inputs": {"text": "text_output"}, **extra}, **available)


keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6)
parts = st.lists(st.one_of(keys, st.integers(-3, 3)), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(parts)
def test_any_path_is_shown_and_read_back(path: list[str | int]) -> None:
    """show() writes every key, whatever its characters, so that parse_path reads it back,
    and pick() follows it through a document built along it."""
    shown = show(tuple(path))
    assert parse_path(shown) == tuple(path)
    doc: object = "leaf"
    for part in reversed(path):
        doc = [doc] * (abs(part) + 1) if isinstance(part, int) else {part: doc}
    assert pick(doc, tuple(path)) == "leaf"
