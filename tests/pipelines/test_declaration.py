"""Declarations checked at load: each check refuses with a message naming the node and key."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from appliance.errors import ModelError
from appliance.pipelines.declaration import bind, parse
from appliance.tensors import Signature, TensorSpec
from tests.support.pipeline_steps import register


@pytest.fixture(autouse=True)
def _steps(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch)


def sig(inputs: dict[str, tuple[str, tuple[int, ...]]],
        outputs: dict[str, tuple[str, tuple[int, ...]]]) -> Signature:  # fmt: skip
    return Signature(
        tuple(TensorSpec(n, d, s) for n, (d, s) in inputs.items()),
        tuple(TensorSpec(n, d, s) for n, (d, s) in outputs.items()),
    )


MODELS = {
    "double": sig({"x": ("FP32", (-1, 4))}, {"y": ("FP32", (-1, 4))}),
    "addone": sig({"y": ("FP32", (-1, 4))}, {"z": ("FP32", (-1, 4))}),
    "counter": sig({"x": ("INT64", (-1, 4))}, {"n": ("INT64", (-1, 4))}),
    "wide": sig({"y": ("FP32", (-1, 8))}, {"w": ("FP32", (-1, 8))}),
}


def lookup(name: str, pin: str | None) -> tuple[str, Signature] | None:
    found = MODELS.get(name)
    return None if found is None else ("1", found)


BASE: dict[str, Any] = {
    "kind": "pipeline",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "nodes": [
        {"name": "split", "step": {"type": "t_identity"}, "inputs": {"x": "request.x"},
         "fan_out": True},
        {"name": "a", "model": "double", "inputs": {"x": "split.x"}},
        {"name": "b", "model": "addone", "inputs": {"y": "a.y"}},
    ],
    "outputs": [{"name": "z", "source": "b.z"}],
}  # fmt: skip


def doc(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def nodes(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    base: list[dict[str, Any]] = copy.deepcopy(BASE["nodes"])
    return base + list(extra)


def refused(d: dict[str, Any], *parts: str, strict: bool = True) -> str:
    with pytest.raises(ModelError) as info:
        bind(parse(d, "p"), lookup, strict)
    for part in parts:
        assert part in info.value.message, info.value.message
    return info.value.message


def test_the_base_declaration_binds_with_its_scopes_and_specs():
    decl = parse(BASE, "p")
    assert list(decl.nodes) == ["split", "a", "b"]
    assert [decl.nodes[n].scope for n in decl.nodes] == [None, "split", "split"]
    bound = bind(decl, lookup)
    # the rows are gathered at the output: any number of rows of 4
    assert bound.signature.outputs == (TensorSpec("z", "FP32", (-1, 4)),)
    assert bound.nodes["a"].given["x"].shape == (1, 4)  # one row each
    assert bound.versions == (("double", "1"), ("addone", "1"))


@pytest.mark.parametrize(
    ("change", "parts"),
    [
        ({"nodes": nodes({"name": "c", "model": "addone", "inputs": {"y": "nowhere.y"}})},
         ["node 'c'", "inputs.y", "no node is named 'nowhere'"]),
        ({"nodes": nodes({"name": "c", "model": "addone", "inputs": {"y": "request.nope"}})},
         ["node 'c'", "inputs.y", "no input 'nope'"]),
        ({"nodes": nodes({"name": "request", "model": "addone", "inputs": {"y": "a.y"}})},
         ["nodes[3]", "name", "reserved"]),
        ({"nodes": nodes({"name": "a", "model": "addone", "inputs": {"y": "a.y"}})},
         ["node 'a'", "name", "another node"]),
        ({"nodes": nodes({"name": "9x", "model": "addone", "inputs": {}})},
         ["nodes[3]", "name"]),
        ({"nodes": nodes({"name": "c", "step": {"type": "no_such_step"}, "inputs": {}})},
         ["node 'c'", "step.type", "unknown step type 'no_such_step'"]),
        ({"nodes": nodes({"name": "c", "model": "addone", "step": {"type": "t_identity"}})},
         ["node 'c'", "model", "either"]),
        ({"nodes": nodes({"name": "c", "model": "addone", "inputs": {"y": "a.y"}, "colour": 1})},
         ["node 'c'", "colour", "unknown key"]),
        ({"nodes": nodes({"name": "c", "model": "addone", "inputs": {"y": "a.y"},
                          "when": {"source": "a.y", "op": "=~", "value": 1}})},
         ["node 'c'", "when.op"]),
        ({"nodes": nodes({"name": "c", "model": "addone", "inputs": {"y": "a.y"},
                          "when": {"source": "a.y", "op": "<", "value": "high"}})},
         ["node 'c'", "when.value"]),
        ({"nodes": nodes({"name": "c", "model": "addone", "inputs": {"y": "noref"}})},
         ["node 'c'", "inputs.y", "<node>.<tensor>"]),
        ({"outputs": [{"name": "z", "source": "b.z"}, {"name": "z", "source": "a.y"}]},
         ["outputs[1]", "listed twice"]),
    ],
)  # fmt: skip
def test_parse_errors_name_the_node_and_key(change, parts):
    refused(doc(**change), *parts)


def test_a_cycle_is_named():
    d = doc(nodes=[
        {"name": "a", "model": "double", "inputs": {"x": "c.z"}},
        {"name": "b", "model": "addone", "inputs": {"y": "a.y"}},
        {"name": "c", "model": "addone", "inputs": {"y": "b.z"}},
    ])  # fmt: skip
    message = refused(d, "cycle")
    assert all(f"'{n}'" in message or f" {n} " in message or n in message for n in "abc")


def test_max_nodes():
    with pytest.raises(ModelError, match="3 nodes, more than max_nodes = 2"):
        parse(BASE, "p", max_nodes=2)


def test_unknown_model_at_load_and_unchecked_before():
    d = doc(nodes=nodes({"name": "c", "model": "ghost", "inputs": {"y": "b.z"}}))
    refused(d, "node 'c'", "model", "no model 'ghost' is served")
    bind(parse(d, "p"), lookup, strict=False)  # models add: the model may come later


def test_unknown_tensor_of_a_node():
    d = doc(outputs=[{"name": "z", "source": "b.nope"}])
    refused(d, "output 'z'", "b.nope", "node 'b' (model 'addone') has no output 'nope'", "z")


def test_dtype_mismatch_between_producer_and_consumer():
    d = doc(nodes=nodes({"name": "c", "model": "counter", "inputs": {"x": "b.z"}}))
    refused(d, "node 'c'", "inputs.x", "b.z is FP32 but model 'counter' takes INT64")


def test_shape_mismatch_between_producer_and_consumer():
    d = doc(nodes=nodes({"name": "c", "model": "wide", "inputs": {"y": "b.z"}}))
    refused(d, "node 'c'", "inputs.y", "shape [1, 4]", "[-1, 8]")


def test_model_inputs_must_match_the_model():
    d = doc(nodes=nodes({"name": "c", "model": "addone", "inputs": {"q": "b.z"}}))
    refused(d, "node 'c'", "inputs.q", "no input 'q'")
    d = doc(nodes=nodes({"name": "c", "model": "addone", "inputs": {}}))
    refused(d, "node 'c'", "needs input 'y'")


def test_step_declarations_are_checked_with_what_they_read():
    d = doc(nodes=nodes({"name": "c", "step": {"type": "t_scale", "factor": "big"},
                         "inputs": {"x": "b.z"}}))  # fmt: skip
    refused(d, "node 'c'", "factor", "must be a number")
    d = doc(nodes=nodes({"name": "c", "step": {"type": "t_scale"}, "inputs": {"x": "request.x"},
                         "outputs": {"nope": "q"}}))  # fmt: skip
    refused(d, "node 'c'", "outputs.nope", "no output 'nope'")
    d = doc(nodes=nodes({"name": "c", "step": {"type": "t_scale"}, "inputs": {}}))
    refused(d, "node 'c'", "inputs.x", "reads 'x'")


def test_gather_must_name_an_upstream_fan_out():
    d = doc(nodes=nodes({"name": "g", "model": "addone", "inputs": {"y": "a.y"},
                         "gather": "b"}))  # fmt: skip
    refused(d, "node 'g'", "gather", "'b' is not a fan-out node upstream")
    d = doc(nodes=nodes({"name": "g", "model": "addone", "inputs": {"y": "a.y"},
                         "gather": "nobody"}))  # fmt: skip
    refused(d, "node 'g'", "gather", "no node is named 'nobody'")
    ok = doc(nodes=nodes({"name": "g", "step": {"type": "t_identity", "names": ["y"]},
                          "inputs": {"y": "a.y"}, "gather": "split"}))  # fmt: skip
    decl = parse(ok, "p")
    assert decl.nodes["g"].scope is None
    assert bind(decl, lookup).nodes["g"].given["y"].shape == (-1, 4)


def test_nested_fan_out_is_refused():
    d = doc(nodes=nodes({"name": "again", "step": {"type": "t_identity", "names": ["y"]},
                         "inputs": {"y": "a.y"}, "fan_out": True}))  # fmt: skip
    refused(d, "node 'again'", "fan_out", "inside a fan-out")


def test_list_sources_must_agree():
    d = doc(outputs=[{"name": "z", "source": ["b.z", "request.x"]}])
    refused(d, "output 'z'", "same fan-out")
    d = doc(inputs=[*BASE["inputs"], {"name": "n", "datatype": "INT64", "shape": [-1, 4]}],
            nodes=[
        {"name": "a", "model": "double", "inputs": {"x": "request.x"}},
        {"name": "c", "model": "counter", "inputs": {"x": "request.n"}},
    ], outputs=[{"name": "z", "source": ["a.y", "c.n"]}])  # fmt: skip
    refused(d, "output 'z'", "c.n is INT64 but a.y is FP32")


def test_a_condition_compares_numbers():
    d = doc(
        inputs=[*BASE["inputs"], {"name": "t", "datatype": "BYTES", "shape": [1]}],
        nodes=nodes({"name": "c", "model": "addone", "inputs": {"y": "b.z"},
                     "when": {"source": "request.t", "op": ">", "value": 0}}),
    )  # fmt: skip
    refused(d, "node 'c'", "when.source", "request.t is BYTES")
