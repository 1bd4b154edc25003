"""A KServe v2 answer as XML (only written, never parsed here: text by hand, escaped by
xml.sax.saxutils; xml.etree's pure-Python serializer took 20 ms for a 1000-row answer).

    <?xml version='1.0' encoding='utf-8'?>
    <inference_response model_name="multi_io" model_version="1" id="req-1">
      <parameters><parameter name="task">detect</parameter>...</parameters>   (when any)
      <output name="sum" datatype="FP32" shape="2 3">
        <row><v>1.0</v><v>-2.0</v><v>3.5</v></row>
        <row><v>0.0</v><v>4.0</v><v>-1.0</v></row>
      </output>
      <output name="pixel_mean" datatype="INT32" shape="2"><v>72</v><v>127</v></output>
    </inference_response>

`shape` is the dimensions separated by spaces (an XML Schema list; "" for a scalar). A 1-D
output holds its elements as <v>; each further dimension nests one level of <row>; a scalar
is one <v>. Element text is as in JSON answers (appliance/formats/values.py): NaN, Infinity,
-Infinity, true/false, BYTES as UTF-8 text. `id` is present when the request had one.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from ..codec import InferResponse
from ..tensors import datatype_of
from .values import Array, as_text, check_xml_text

_DECLARATION = "<?xml version='1.0' encoding='utf-8'?>\n"


def encode_xml(response: InferResponse) -> bytes:
    attrs = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        attrs["id"] = response.id
    parts = [_DECLARATION, "<inference_response", *_attributes(attrs, "the answer's"), ">"]
    if response.parameters:
        parts.append("<parameters>")
        for key, value in response.parameters.items():
            what = f"parameter {key!r}"
            parts += ("<parameter name=", quoteattr(check_xml_text(key, what)), ">",
                      escape(check_xml_text(_scalar(value), what)), "</parameter>")  # fmt: skip
        parts.append("</parameters>")
    for name, array in response.outputs.items():
        what = f"output {name!r}"
        shape = " ".join(str(d) for d in array.shape)
        parts += ("<output", *_attributes({"name": name, "datatype": datatype_of(array),
                                           "shape": shape}, what), ">")  # fmt: skip
        text = as_text(array, what, "xml")
        if text.dtype.kind == "O" and array.dtype.kind not in "fiub":
            # BYTES: text from the model, checked and escaped (numbers need neither)
            flat = [escape(check_xml_text(item, what)) for item in text.reshape(-1)]
            text = np.array(flat, dtype=object).reshape(text.shape)
        _fill(parts, text)
        parts.append("</output>")
    parts.append("</inference_response>")
    return "".join(parts).encode("utf-8")


def _attributes(attrs: dict[str, str], what: str) -> list[str]:
    return [f" {key}={quoteattr(check_xml_text(value, f'{what} {key}'))}"
            for key, value in attrs.items()]  # fmt: skip


def _fill(parts: list[str], text: Array) -> None:
    """Elements as <v> items, each dimension above the last nested in <row>s."""
    if text.ndim == 0:
        parts += ("<v>", str(text[()]), "</v>")
    elif text.ndim == 1:
        if text.size:
            parts += ("<v>", "</v><v>".join(text.tolist()), "</v>")
    else:
        for sub in text:
            parts.append("<row>")
            _fill(parts, sub)
            parts.append("</row>")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
