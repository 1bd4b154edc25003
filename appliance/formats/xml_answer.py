"""A KServe v2 answer as XML (written with xml.etree: only written, never parsed here).

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

import xml.etree.ElementTree as ET
from typing import Any

from ..codec import InferResponse
from ..tensors import datatype_of
from .values import Array, as_text, check_xml_text


def encode_xml(response: InferResponse) -> bytes:
    attrs = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        attrs["id"] = response.id
    for key, value in attrs.items():
        check_xml_text(value, f"the answer's {key}")
    root = ET.Element("inference_response", attrs)
    if response.parameters:
        params = ET.SubElement(root, "parameters")
        for key, value in response.parameters.items():
            item = ET.SubElement(params, "parameter", {"name": key})
            item.text = check_xml_text(_scalar(value), f"parameter {key!r}")
    for name, array in response.outputs.items():
        what = f"output {name!r}"
        out = ET.SubElement(
            root,
            "output",
            {
                "name": check_xml_text(name, what),
                "datatype": datatype_of(array),
                "shape": " ".join(str(d) for d in array.shape),
            },
        )
        text = as_text(array, what, "xml")
        if text.dtype.kind == "O":  # BYTES: text from the client's model, check each
            for item in text.reshape(-1):
                check_xml_text(item, what)
        _fill(out, text)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body


def _fill(parent: ET.Element, text: Array) -> None:
    if text.ndim == 0:
        ET.SubElement(parent, "v").text = str(text[()])
    elif text.ndim == 1:
        for item in text.tolist():
            ET.SubElement(parent, "v").text = item
    else:
        for sub in text:
            _fill(ET.SubElement(parent, "row"), sub)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
