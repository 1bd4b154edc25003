"""Tensor elements as text, the same for XML, CSV and templates: numbers exactly as the JSON
answer writes them (floats in their shortest round-trip form for their width: float32 0.1 is
"0.1"), NaN and
infinity as JSON answers write them, booleans as true/false, BYTES as UTF-8 text."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import orjson

from ..errors import NotAcceptable

Array = np.ndarray[Any, Any]

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
#: Characters XML 1.0 cannot carry at all (not even escaped).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def as_text(array: Array, what: str, fmt: str) -> Array:
    """The elements of `array` as an array of str of the same shape; NotAcceptable for BYTES
    elements that are not UTF-8 (only binary tensor data can carry them)."""
    kind = array.dtype.kind
    if kind == "b":
        words: Array = np.where(array, "true", "false")
        return words
    if kind in "fiu":
        flat = _numbers(array)
        if kind == "f" and not np.isfinite(array).all():
            for i in np.flatnonzero(~np.isfinite(array)).tolist():
                flat[i] = _NON_FINITE[str(float(array.flat[i]))]
        numbers: Array = np.array(flat, dtype=object).reshape(array.shape)
        return numbers
    flat = [_decode(item, what, fmt) for item in array.reshape(-1)]
    texts: Array = np.array(flat, dtype=object).reshape(array.shape)
    return texts


def _numbers(array: Array) -> list[str]:
    """The elements' text as the JSON answer writes them (orjson: shortest round trip for
    the width, much faster than numpy's float formatting); non-finite ones come out null."""
    flat = array.reshape(-1)
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)  # as the codec does for JSON answers
    if not flat.size:
        return []
    text = orjson.dumps(np.ascontiguousarray(flat), option=orjson.OPT_SERIALIZE_NUMPY)
    return text[1:-1].decode("ascii").split(",")


def _decode(item: Any, what: str, fmt: str) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise NotAcceptable(
                f"{what} holds bytes that are not UTF-8, which {fmt} cannot carry: ask for "
                "json with binary tensor data (parameters.binary_data_output = true)"
            ) from None
    return str(item)


def check_xml_text(text: str, what: str) -> str:
    """`text`, when XML 1.0 can carry it (no NUL, no other C0 control but tab and newlines)."""
    bad = _NOT_XML.search(text)
    if bad is not None:
        raise NotAcceptable(
            f"{what} holds the character U+{ord(bad.group()):04X}, which XML 1.0 cannot carry: "
            "ask for json"
        )
    return text


def as_python(array: Array, what: str, fmt: str) -> Any:
    """`array` as nested Python lists (for templates): floats with the value their shortest
    text has (float32 0.1 is 0.1, not 0.10000000149011612), BYTES as str."""
    kind = array.dtype.kind
    if kind == "f" and array.dtype.itemsize < 8:
        if not np.isfinite(array).all():
            return np.array(array.astype(str), dtype=np.float64).tolist()
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        return orjson.loads(orjson.dumps(np.ascontiguousarray(array), option=_NUMPY))
    if kind in "fiub":
        return array.tolist()
    return as_text(array, what, fmt).tolist()
