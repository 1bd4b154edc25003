"""Answers in XML, CSV and from a model's report templates (appliance/formats), over the real
HTTP server (its fast path and the aiohttp app) and MQTT, each compared with the JSON answer to
the same request, run by the real ONNX runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.errors import ModelError
from appliance.registry import Registry
from tests.api.test_mqtt import DEVICE, mqtt_settings, peers  # noqa: F401
from tests.support.formats import csv_table, json_outputs, same, values, xml_answer
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

MULTI_IO = {
    "id": "req-7",
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0.1, -2.0, 3.5, 0, 4, -1e-7]},
        {"name": "y", "datatype": "INT64", "shape": [2, 3], "data": [1, 2, 3, 4, 5, -6]},
        {"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 2],
         "data": [0, 10, 20, 30, 255, 255, 0, 1]},
    ],
}  # fmt: skip
SAMPLE = {
    "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [3, 4],
         "data": [0.5, -1.0, 2.0, 0.25, 1, 2, 3, 4, -3, 0.1, 0.2, 9]}
    ]
}  # fmt: skip
STRINGS = {
    "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [3],
         "data": ["plain", "a,b \"quoted\"\nline", "<b>bold</b> & é"]}
    ]
}  # fmt: skip
CASES: list[tuple[str, dict[str, Any]]] = [
    ("multi_io", MULTI_IO),
    ("sample", SAMPLE),
    ("strings", STRINGS),
]

HTML = """<!doctype html><title>{{ model_name }}</title>
<h1>{{ model_name }} v{{ model_version }}</h1><p id="rid">{{ id }}</p>
<table>{% for name, rows in outputs.items() %}<tr><th>{{ name }}</th><td>{{ datatypes[name] }}
</td><td>{{ rows|tojson }}</td></tr>{% endfor %}</table>
{% if outputs.echo is defined %}<ul>{% for s in outputs.echo %}<li>{{ s }}</li>{% endfor %}</ul>
{% endif %}"""
MARKDOWN = """# {{ model_name }} (version {{ model_version }})

| row | label | top probability |
|---|---|---|
{% for p in outputs.probabilities -%}
| {{ loop.index0 }} | {{ outputs.label[loop.index0] }} | {{ '%.4f'|format(p|max) }} |
{% endfor %}
request parameters: {{ request_parameters|tojson }}
"""


async def post(client: Any, path: str, obj: Any, **kwargs: Any) -> Any:
    return await client.post(path, data=orjson.dumps(obj), **kwargs)


@pytest.fixture(params=[True, False], ids=["fast-path", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def settings(fast_path: bool, **model_defaults: Any) -> dict[str, Any]:
    return {"server": {"fast_path": fast_path}, "model_defaults": model_defaults}


# -- XML and CSV against JSON -------------------------------------------------------------------
async def test_xml_matches_json(serve, fast_path):
    client = await serve(settings(fast_path))
    for name, request in CASES:
        path = f"/v2/models/{name}/infer"
        r = await post(client, path, request)
        assert r.status == 200, await r.text()
        expected = json_outputs(await r.json())
        for how in ({"headers": {"Accept": "application/xml"}}, {"params": {"format": "xml"}}):
            r = await post(client, path, request, **how)
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"] == "application/xml; charset=utf-8"
            assert r.headers["X-Model-Name"] == name
            attrs, got = xml_answer(await r.read())
            assert attrs["model_name"] == name and attrs["model_version"] == "1"
            assert attrs.get("id") == request.get("id")
            assert list(got) == list(expected)
            for out, (datatype, shape, data) in expected.items():
                assert got[out][:2] == (datatype, shape), out
                assert same(got[out][2], data), out
    # the body's parameter names it too, and only the outputs asked for come back
    r = await post(
        client, "/v2/models/multi_io/infer",
        {**MULTI_IO, "parameters": {"format": "xml"}, "outputs": [{"name": "x_positive"}]},
    )  # fmt: skip
    _, got = xml_answer(await r.read())
    assert list(got) == ["x_positive"] and got["x_positive"][0] == "BOOL"


async def test_csv_matches_json(serve, fast_path):
    client = await serve(settings(fast_path))
    for name, request in CASES:
        path = f"/v2/models/{name}/infer"
        expected = json_outputs(await (await post(client, path, request)).json())
        r = await post(client, path, request, headers={"Accept": "text/csv"})
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "text/csv; charset=utf-8; header=present"
        header, rows = csv_table(await r.read())
        columns = {h: [row[i] for row in rows] for i, h in enumerate(header)}
        want = []
        for out, (datatype, shape, data) in expected.items():
            table = data.reshape(shape[0], -1)
            if len(shape) == 1:
                want.append(out)
                assert same(values(columns[out], datatype), table[:, 0]), out
            else:
                for j in range(shape[1]):
                    want.append(f"{out}[{j}]")
                    assert same(values(columns[f"{out}[{j}]"], datatype), table[:, j]), out
        assert header == want
        assert len(rows) == next(iter(expected.values()))[1][0]
    # quoting survives: a string with a comma, quotes and a newline is one field
    r = await post(client, "/v2/models/strings/infer", STRINGS, params={"format": "csv"})
    header, rows = csv_table(await r.read())
    assert [row[0] for row in rows] == STRINGS["inputs"][0]["data"]


async def test_csv_refuses_what_is_not_a_table(serve, tmp_path, store):
    """A 3-D output: 406 naming it; asking for the other outputs makes a table again."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 2])
    cube = helper.make_tensor_value_info("cube", TensorProto.FLOAT, ["n", 2, 2])
    flat = helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["n", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["cube"]),
         helper.make_node("Reshape", ["x", "shape"], ["flat"])],
        "cube", [x], [cube, flat], [shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "cube.onnx")
    store.add("cube", tmp_path / "cube.onnx")
    client = await serve()
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2, 2],
                           "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}  # fmt: skip
    r = await post(client, "/v2/models/cube/infer", request, params={"format": "csv"})
    assert r.status == 406
    error = (await r.json())["error"]
    assert "output 'cube' has shape [2, 2, 2]" in error and "1-D or 2-D" in error
    r = await post(
        client, "/v2/models/cube/infer", {**request, "outputs": [{"name": "flat"}]},
        params={"format": "csv"},
    )  # fmt: skip
    assert r.status == 200
    header, rows = csv_table(await r.read())
    assert header == ["flat[0]", "flat[1]", "flat[2]", "flat[3]"]
    assert rows == [["1.0", "2.0", "3.0", "4.0"], ["5.0", "6.0", "7.0", "8.0"]]
    # XML takes any shape
    r = await post(client, "/v2/models/cube/infer", request, params={"format": "xml"})
    _, got = xml_answer(await r.read())
    assert got["cube"][1] == [2, 2, 2] and got["cube"][2].tolist() == list(range(1, 9))


# -- negotiation --------------------------------------------------------------------------------
async def test_negotiation_and_refusals(serve, fast_path):
    client = await serve(settings(fast_path))
    path = "/v2/models/sample/infer"

    async def answer(obj: Any = SAMPLE, **kwargs: Any) -> tuple[int, str, bytes]:
        r = await post(client, path, obj, **kwargs)
        return r.status, r.headers["Content-Type"], await r.read()

    # no preference, or JSON asked for: today's JSON answer, unchanged
    plain = await answer()
    assert plain[:2] == (200, "application/json")
    for accept in ("*/*", "application/json", "application/json;q=0.9, text/csv;q=0.1",
                   "text/html;q=0, */*;q=0.5"):  # fmt: skip
        assert await answer(headers={"Accept": accept}) == plain, accept
    assert await answer({**SAMPLE, "parameters": {"format": "json"}}) == plain
    # the best q wins; the parameter wins over Accept
    status, ctype, _ = await answer(headers={"Accept": "text/csv;q=0.5, application/xml"})
    assert (status, ctype) == (200, "application/xml; charset=utf-8")
    status, ctype, _ = await answer(headers={"Accept": "text/*"})
    assert ctype.startswith("text/csv")
    status, ctype, _ = await answer(params={"format": "csv"}, headers={"Accept": "text/xml"})
    assert ctype.startswith("text/csv")
    # unknown or unavailable formats: 406 with the list of formats
    for kwargs in (
        {"params": {"format": "yaml"}},
        {"params": {"format": "html"}},  # this model has no template
        {"headers": {"Accept": "image/png"}},
        {"headers": {"Accept": "text/html, application/json;q=0"}},
    ):
        status, ctype, text = await answer(**kwargs)
        assert status == 406, kwargs
        error = orjson.loads(text)["error"]
        assert "(available: json" in error and "model 'sample' version 1" in error, error
    # malformed: 400 naming the field
    status, _, text = await answer({**SAMPLE, "parameters": {"format": 3}})
    assert status == 400 and "parameters.format must be a string" in orjson.loads(text)["error"]
    status, _, text = await answer(headers={"Accept": "text/csv;q=high"})
    assert status == 400 and "Accept: q='high'" in orjson.loads(text)["error"]
    # the server goes on
    assert await answer() == plain
    meta = await (await client.get("/v2/models/sample")).json()
    assert meta["parameters"]["formats"] == ["json", "xml", "csv"]


# -- report templates ---------------------------------------------------------------------------
def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def reports(store: Registry, samples: Path, tmp_path: Path) -> Registry:
    """`sample` and `strings` again, as version 2, with report templates."""
    store.add(
        "sample", samples / "sample.onnx",
        templates={"markdown": _write(tmp_path, "report.md.j2", MARKDOWN),
                   "html": _write(tmp_path, "report.html.j2", HTML)},
    )  # fmt: skip
    store.add("strings", samples / "strings.onnx",
              templates={"html": _write(tmp_path, "report.html.j2", HTML)})  # fmt: skip
    return store


async def test_templates_render_html_and_markdown(reports, serve, fast_path):
    client = await serve(settings(fast_path))
    meta = await (await client.get("/v2/models/sample")).json()
    assert meta["parameters"]["formats"] == ["json", "xml", "csv", "markdown", "html"]
    path = "/v2/models/sample/infer"
    expected = await (await post(client, path, SAMPLE)).json()
    outs = {o["name"]: o["data"] for o in expected["outputs"]}
    probs = np.array(outs["probabilities"], dtype=np.float32).reshape(3, 3)

    r = await post(client, path, {**SAMPLE, "parameters": {"format": "markdown", "top_k": 1}})
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == "text/markdown; charset=utf-8"
    text = (await r.read()).decode()
    assert text.startswith("# sample (version 2)\n")
    rows = [line.split("|")[1:4] for line in text.splitlines() if line.startswith("| ") and
            line[2].isdigit()]  # fmt: skip
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert [int(r[1]) for r in rows] == outs["label"]
    assert all(abs(float(r[2]) - float(p.max())) <= 6e-5 for r, p in zip(rows, probs, strict=True))
    assert 'request parameters: {"top_k": 1}' in text  # `format` itself is not passed on

    r = await post(client, path, {**SAMPLE, "id": "r<1>"}, headers={"Accept": "text/html"})
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    html = (await r.read()).decode()
    assert '<p id="rid">r&lt;1&gt;</p>' in html  # autoescaped
    # the outputs as the template saw them are the JSON answer's numbers
    import re

    cells = dict(re.findall(r"<th>(\w+)</th><td>\w+\n</td><td>(.*?)</td>", html))
    assert (
        orjson.loads(cells["label"].replace("&#34;", '"'))
        == np.array(outs["label"]).reshape(3).tolist()
    )
    got = np.array(orjson.loads(cells["probabilities"]), dtype=np.float32)
    assert np.array_equal(got, probs)

    r = await post(client, "/v2/models/strings/infer", STRINGS, params={"format": "html"})
    html = (await r.read()).decode()
    assert "<li>&lt;b&gt;bold&lt;/b&gt; &amp; é</li>" in html
    # a format this model has no template for
    r = await post(client, "/v2/models/strings/infer", STRINGS, params={"format": "markdown"})
    assert r.status == 406
    assert "(available: json, xml, csv, html)" in (await r.json())["error"]


async def test_a_template_that_breaks_the_sandbox_fails_its_request_only(
    store, samples, tmp_path, serve, fast_path
):
    store.add("sample", samples / "sample.onnx", templates={
        "html": _write(tmp_path, "escape.html.j2", "ok\n{{ outputs.label.__class__.__mro__ }}"),
        "text": _write(tmp_path, "forever.txt.j2",
                       "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}"
                       "{% endfor %}{% endfor %}"),
        "markdown": _write(tmp_path, "huge.md.j2", "{{ 'x' * 100000000 }}"),
    })  # fmt: skip
    client = await serve(settings(fast_path, formats={"render_timeout_s": 0.3}))
    path = "/v2/models/sample/infer"
    plain = await (await post(client, path, SAMPLE)).json()

    r = await post(client, path, SAMPLE, params={"format": "html"})
    assert r.status == 500
    error = (await r.json())["error"]
    assert error.startswith("model 'sample' version 2: template 'html' (escape.html.j2 line 2)")
    assert "access to attribute '__class__' of 'list' object is unsafe" in error

    r = await post(client, path, SAMPLE, params={"format": "text"})
    assert r.status == 500
    error = (await r.json())["error"]
    assert "template 'text' (forever.txt.j2" in error and "render stopped" in error
    assert "render_timeout_s (0.3 s)" in error

    r = await post(client, path, SAMPLE, params={"format": "markdown"})
    assert r.status == 500
    assert "more than max_output_bytes (1048576)" in (await r.json())["error"]

    # the server goes on, and so does the model
    assert await (await post(client, path, SAMPLE)).json() == plain


async def test_report_size_limit(store, samples, tmp_path, serve):
    store.add("sample", samples / "sample.onnx", templates={
        "text": _write(tmp_path, "long.txt.j2", "{% for i in range(2000) %}0123456789{% endfor %}"),
    })  # fmt: skip
    client = await serve({"models": {"sample": {"formats": {"max_output_bytes": 10000}}}})
    r = await post(client, "/v2/models/sample/infer", SAMPLE, params={"format": "text"})
    assert r.status == 500
    error = (await r.json())["error"]
    assert "template 'text' (long.txt.j2): render stopped: the report is longer than " \
        "max_output_bytes (10000)" in error  # fmt: skip
    r = await post(client, "/v2/models/sample/infer", SAMPLE, params={"format": "xml"})
    assert r.status == 200


async def test_max_elements_refuses_large_answers_but_json(serve):
    client = await serve({"model_defaults": {"formats": {"max_elements": 8}}})
    r = await post(client, "/v2/models/sample/infer", SAMPLE, params={"format": "csv"})
    assert r.status == 406
    assert (
        "holds 12 output elements, more than csv answers may hold (8" in (await r.json())["error"]
    )
    assert (await post(client, "/v2/models/sample/infer", SAMPLE)).status == 200


# -- the store ----------------------------------------------------------------------------------
def test_models_add_checks_and_stores_templates(store, samples, tmp_path):
    bad = _write(tmp_path, "bad.md.j2", "line one\nline two\n{{ 1 + }}")
    with pytest.raises(ModelError, match=r"template 'markdown' \(bad.md.j2 line 3\)"):
        store.add("sample", samples / "sample.onnx", templates={"markdown": bad})
    good = _write(tmp_path, "good.md.j2", "# {{ model_name }}")
    with pytest.raises(ModelError, match="'templates' has unknown format 'pdf'"):
        store.add("sample", samples / "sample.onnx", templates={"pdf": good})
    assert store.versions("sample") == ["1"]
    mv = store.add("sample", samples / "sample.onnx", templates={"markdown": good})
    assert mv.manifest.templates == {"markdown": "good.md.j2"}
    assert mv.manifest.files["good.md.j2"]["size"] == len("# {{ model_name }}")


async def test_a_changed_template_file_is_refused_at_load(store, samples, tmp_path, serve):
    good = _write(tmp_path, "r.md.j2", "# {{ model_name }}")
    mv = store.add("sample", samples / "sample.onnx", templates={"markdown": good})
    stored = mv.file.parent / "r.md.j2"
    stored.chmod(0o644)
    mv.file.parent.chmod(0o755)
    stored.write_text("{{ 1 }}")
    client = await serve(wait=True)
    r = await client.get("/v2/models/sample")
    reason = (await r.json())["parameters"].get("reason", "")
    assert "r.md.j2: sha256" in reason and "does not match the manifest" in reason


def test_cli_models_add_template(tmp_path, samples):
    import subprocess
    import sys

    template = _write(tmp_path, "report.txt.j2", "{{ model_name }}")
    root = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "add", "sample", str(samples / "sample.onnx"),
         "--template", f"text={template}", "--models", str(root)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = orjson.loads((root / "sample" / "1" / "manifest.json").read_bytes())
    assert manifest["templates"] == {"text": "report.txt.j2"}
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "add", "sample", str(samples / "sample.onnx"),
         "--template", "text", "--models", str(root)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "expected FORMAT=FILE" in proc.stderr


# -- MQTT ---------------------------------------------------------------------------------------
async def test_mqtt_formats(mosquitto, serve, peers, samples, store, tmp_path):  # noqa: F811
    store.add("sample", samples / "sample.onnx",
              templates={"markdown": _write(tmp_path, "report.md.j2", MARKDOWN)})  # fmt: skip
    client = await serve(mqtt_settings(mosquitto))
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/sample"
    expected = json_outputs(await (await post(client, "/v2/models/sample/infer", SAMPLE)).json())

    peer.publish(topic, orjson.dumps(SAMPLE), response_topic=replies, correlation=b"x",
                 user=[("format", "xml")])  # fmt: skip
    reply = await peer.reply(replies, b"x")
    assert reply.status == 200 and reply.content_type == "application/xml; charset=utf-8"
    _, got = xml_answer(reply.payload)
    for out, (datatype, shape, data) in expected.items():
        assert got[out][:2] == (datatype, shape) and same(got[out][2], data)

    # the body's parameter wins over the user property
    peer.publish(topic, orjson.dumps({**SAMPLE, "parameters": {"format": "markdown"}}),
                 response_topic=replies, correlation=b"m", user=[("format", "xml")])  # fmt: skip
    reply = await peer.reply(replies, b"m")
    assert reply.content_type == "text/markdown; charset=utf-8"
    assert reply.payload.decode().startswith("# sample (version 2)")

    peer.publish(topic, orjson.dumps(SAMPLE), response_topic=replies, correlation=b"u",
                 user=[("format", "pdf")])  # fmt: skip
    reply = await peer.reply(replies, b"u")
    assert reply.status == 406 and reply.content_type == "application/json"
    assert "format 'pdf' is not available" in reply.json()["error"]
    assert "user property" not in reply.json()["error"]

    # MQTT 3.1.1: the JSON body's parameter (the id comes back in the XML)
    old = peers(mosquitto, v5=False)
    replies311 = await old.ready()
    old.publish(topic, orjson.dumps({**SAMPLE, "id": "q-311", "reply_to": replies311,
                                     "parameters": {"format": "xml"}}))  # fmt: skip
    msgs = await old.wait(lambda ms: any(m.topic == replies311 for m in ms))
    attrs, got = xml_answer(next(m for m in msgs if m.topic == replies311).payload)
    assert attrs["id"] == "q-311" and set(got) == set(expected)
