"""Answers in the format the client asks for: JSON (the default), XML, CSV, and reports
rendered from the model's own Jinja2 templates (HTML, Markdown, plain text).

The choice is made once per request (`negotiate.choose`, called by the request path from the
`format` request parameter, the MQTT user property `format` or the HTTP `Accept` header) and
kept on the Request; the front then encodes with `encode`. JSON stays with the codec
(appliance/codec.py), untouched: this package is only reached for the other formats.

Not a layer of the request path: the fronts, the request path and the engine (which compiles a
model's templates at load) all use it, and it uses only the codec's types and the errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..codec import InferResponse
from ..errors import NotAcceptable
from ..manifest import TEMPLATE_FORMATS

if TYPE_CHECKING:
    from ..config import FormatsConfig

#: Every format by name, with the Content-Type its answers carry.
CONTENT_TYPES: dict[str, str] = {
    "json": "application/json",
    "xml": "application/xml; charset=utf-8",
    "csv": "text/csv; charset=utf-8; header=present",
    "html": "text/html; charset=utf-8",
    "markdown": "text/markdown; charset=utf-8",
    "text": "text/plain; charset=utf-8",
}
#: Formats every tensor model offers.
BUILT_IN: tuple[str, ...] = ("json", "xml", "csv")
#: Formats a model offers when its manifest names a template for them.
TEMPLATED: tuple[str, ...] = TEMPLATE_FORMATS
#: The default format.
JSON = "json"
#: Output elements above which XML and CSV are encoded in a thread, off the event loop.
_INLINE_ELEMENTS = 4096


def available(templates: Any) -> list[str]:
    """The formats a model (or pipeline) offers: the built-ins and its templates' names."""
    names = getattr(templates, "names", ())
    return [*BUILT_IN, *names]


def _check_size(response: InferResponse, fmt: str, limits: FormatsConfig) -> int:
    n = sum(int(a.size) for a in response.outputs.values())
    if n > limits.max_elements:
        raise NotAcceptable(
            f"the answer of model {response.model_name!r} holds {n} output elements, more "
            f"than {fmt} answers may hold ({limits.max_elements}, formats.max_elements): ask "
            "for json (binary tensor data suits large outputs)"
        )
    return n


async def encode(
    fmt: str,
    response: InferResponse,
    parameters: dict[str, Any],
    limits: FormatsConfig,
) -> tuple[bytes, str]:
    """The answer in format `fmt` (not json) and its Content-Type. `parameters` are the
    request's (a template sees them). NotAcceptable when the answer cannot be given so."""
    import asyncio

    n = _check_size(response, fmt, limits)
    if fmt == "xml":
        from .xml_answer import encode_xml as fn
    elif fmt == "csv":
        from .csv_answer import encode_csv as fn
    else:
        templates = response.templates
        if templates is None or fmt not in templates.names:
            raise NotAcceptable(
                f"format {fmt!r} is not available for model {response.model_name!r} version "
                f"{response.model_version} (available: {', '.join(available(templates))})"
            )
        body = await templates.render(fmt, response, parameters)
        return body, CONTENT_TYPES[fmt]
    body = fn(response) if n <= _INLINE_ELEMENTS else await asyncio.to_thread(fn, response)
    return body, CONTENT_TYPES[fmt]
