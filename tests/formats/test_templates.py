"""The report sandbox (appliance/formats/templates.py) on its own: what a template may do, and
each way out of it refused, or cut by a limit, with a message naming the template and line."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from appliance.codec import InferResponse
from appliance.config import FormatsConfig
from appliance.errors import ApplianceError, ModelError
from appliance.formats.templates import compile_templates

LIMITS = FormatsConfig(render_timeout_s=0.3, max_output_bytes=100_000)
RESPONSE = InferResponse(
    "m", "1",
    {"p": np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32), "l": np.array([1, 0]),
     "s": np.array([b"<a>", b"b"], dtype=object), "ok": np.array([True, False])},
    "rid", {"cached": True},
)  # fmt: skip


def render(source: str, fmt: str = "text", limits: FormatsConfig = LIMITS) -> str:
    templates = compile_templates({fmt: ("t.j2", source)}, limits, "model 'm' version 1")
    return asyncio.run(templates.render(fmt, RESPONSE, {"top_k": 2})).decode()


def refused(source: str, limits: FormatsConfig = LIMITS) -> str:
    with pytest.raises(ApplianceError) as err:
        render(source, limits=limits)
    assert err.value.status == 500
    assert err.value.message.startswith("model 'm' version 1: template 'text' (t.j2")
    return err.value.message


def test_what_a_template_sees() -> None:
    out = render(
        "{{ model_name }} {{ model_version }} {{ id }} {{ parameters.cached }} "
        "{{ request_parameters.top_k }}|{{ outputs.p }}|{{ outputs.l }}|{{ outputs.s }}|"
        "{{ outputs.ok }}|{{ datatypes.p }} {{ shapes.p }}|{{ '%.1f'|format(outputs.p[1][1]) }}|"
        "{{ 'A b'.lower().split() }}|{{ outputs.p|map('max')|list }}|{{ range(3)|sum }}"
    )
    assert out == (
        "m 1 rid True 2|[[0.1, 0.2], [0.3, 0.4]]|[1, 0]|['<a>', 'b']|[True, False]|"
        "FP32 [2, 2]|0.4|['a', 'b']|[0.2, 0.4]|3"
    )


def test_html_is_autoescaped_and_the_others_are_not() -> None:
    assert render("{{ outputs.s[0] }}", "html") == "&lt;a&gt;"
    assert render("{{ outputs.s[0] }}", "markdown") == "<a>"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ outputs.__class__ }}", "access to attribute '__class__' of 'dict' object is unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str'"),
        ("{{ outputs.p.append }}", "'append' of 'list' object is unsafe"),
        ("{{ cycler.__init__.__globals__ }}", "'__init__'"),
        ("{{ '{0.__class__}'.format(1) }}", "'format' of 'str' object is unsafe"),
        ("{{ 'x'.ljust(10**9) }}", "'ljust' of 'str' object is unsafe"),
        ("{% include 'other.j2' %}", "no loader"),
        ("{% import 'x' as x %}", "no loader"),
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
        ("{{ nothing_here }}", "'nothing_here' is undefined"),
    ],
)
def test_the_sandbox_refuses(source: str, message: str) -> None:
    assert message in refused(source)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ 'x' * 10**9 }}", "a repeated string or list would hold 1000000000 items"),
        ("{{ [0] * 10**9 }}", "a repeated string or list"),
        ("{{ 'x'|center(10**9) }}", "a centered string"),
        ("{{ ('x' * 1000)|replace('x', 'y' * 1000) }}", "a replaced string"),
        ("{{ 'x'|indent(10**6) }}", "a filter argument above 1000"),
        ("{{ [1]|batch(10**9, 0)|list }}", "a filter argument above 1000"),
        ("{{ 1|tojson(indent=10**9) }}", "a filter argument above 1000"),
        ("{{ '%01000000000d'|format(1) }}", "widths above 1000"),
        ("{{ '%.*f' % (10**9, 1) }}", "widths above 1000"),
        ("{{ 2 ** 100000 }}", "an integer power above 1024"),
        ("{% set ns = namespace(s='x' * 1000) %}{% for i in range(20) %}"
         "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "namespace attribute 's'"),
        ("{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x' * 1000) }}",
         "a call's argument would hold 128000 items"),
    ],
)  # fmt: skip
def test_values_that_would_grow_past_the_limit(source: str, message: str) -> None:
    assert message in refused(source)


def test_time_and_size_limits() -> None:
    forever = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    error = refused("line 1\n" + forever)
    assert "(t.j2 line 2): render stopped: it took longer than render_timeout_s (0.3 s)" in error
    recursive = "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}"
    assert "recursion too deep" in refused(recursive) or "render_timeout_s" in refused(recursive)
    long = "{% for i in range(100000) %}0123456789{% endfor %}"
    assert "the report is longer than max_output_bytes (100000)" in refused(long)


def test_syntax_errors_name_the_file_and_line() -> None:
    with pytest.raises(ModelError, match=r"template 'text' \(t.j2 line 2\): unexpected '}'"):
        compile_templates({"text": ("t.j2", "ok\n{{ } }}")}, LIMITS, "model 'm' version 1")


def test_a_deadline_never_reaches_the_next_render() -> None:
    """Renders ending just before, at or after their deadline, one after another in the same
    pool threads: each either finishes whole or is stopped, and the next one is unharmed."""
    limits = FormatsConfig(render_timeout_s=0.02)
    source = "{% for i in range(request_parameters.n) %}{% for j in range(300) %}{% endfor %}" \
        "{% endfor %}done"  # fmt: skip
    templates = compile_templates({"text": ("t.j2", source)}, limits, "model 'm' version 1")

    async def run(n: int) -> str:
        try:
            return (await templates.render("text", RESPONSE, {"n": n})).decode()
        except ApplianceError as exc:
            assert "render_timeout_s (0.02 s)" in exc.message
            return "stopped"

    async def main() -> list[str]:
        out = []
        for n in [1, 50, 100, 200, 400, 800, 1600, 3200] * 4:
            out.append(await run(n))
            out.append(await run(1))  # right after: never hit by the one before
        return out

    results = asyncio.run(main())
    assert set(results) <= {"done", "stopped"} and "stopped" in results
    assert results[1::2] == ["done"] * (len(results) // 2)
