"""Reading the XML and CSV answers back (appliance/formats), to compare them with JSON ones."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from appliance.tensors import DATATYPES

_TEXT = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}


def values(texts: list[str], datatype: str) -> np.ndarray[Any, Any]:
    """Element texts as the datatype's values (NaN and infinity as JSON answers write them)."""
    if datatype == "BYTES":
        return np.array(texts, dtype=object)
    if datatype == "BOOL":
        assert set(texts) <= {"true", "false"}, texts
        return np.array([t == "true" for t in texts])
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        return np.array([float(_TEXT.get(t, t)) for t in texts]).astype(dtype)
    return np.array([int(t) for t in texts], dtype=dtype)


def json_outputs(body: dict[str, Any]) -> dict[str, tuple[str, list[int], np.ndarray[Any, Any]]]:
    """name -> (datatype, shape, values) of a JSON answer."""
    out = {}
    for o in body["outputs"]:
        data = o["data"]
        texts = [x if isinstance(x, str) else _json_text(x) for x in data]
        out[o["name"]] = (o["datatype"], o["shape"], values(texts, o["datatype"]))
    return out


def _json_text(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    return repr(x)


def xml_answer(
    body: bytes,
) -> tuple[dict[str, str], dict[str, tuple[str, list[int], np.ndarray[Any, Any]]]]:
    """(root attributes, name -> (datatype, shape, values)) of an XML answer; checks that the
    nesting of <row> and <v> matches the shape."""
    root = ET.fromstring(body)
    assert root.tag == "inference_response"
    out = {}
    for o in root.findall("output"):
        shape = [int(d) for d in o.get("shape", "").split()]
        datatype = o.get("datatype", "")
        texts: list[str] = []
        _collect(o, shape, texts)
        out[o.get("name", "")] = (datatype, shape, values(texts, datatype))
    return dict(root.attrib), out


def _collect(node: ET.Element, shape: list[int], texts: list[str]) -> None:
    if len(shape) <= 1:
        vs = list(node)
        assert all(v.tag == "v" for v in vs)
        assert len(vs) == (shape[0] if shape else 1)
        texts.extend(v.text or "" for v in vs)
        return
    rows = list(node)
    assert len(rows) == shape[0] and all(r.tag == "row" for r in rows)
    for r in rows:
        _collect(r, shape[1:], texts)


def csv_table(body: bytes) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
    return rows[0], rows[1:]


def same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    """Equal values, NaN equal to NaN."""
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))
