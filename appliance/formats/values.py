"""Tensor elements as text, the same for XML, CSV and templates: floats in their shortest
round-trip form for their own width (float32 0.1 is "0.1", as in the JSON answer), NaN and
infinity as JSON answers write them, booleans as true/false, BYTES as UTF-8 text."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import NotAcceptable

Array = np.ndarray[Any, Any]

_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
#: Characters XML 1.0 cannot carry at all (not even escaped).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def as_text(array: Array, what: str, fmt: str) -> Array:
    """The elements of `array` as an array of str of the same shape; NotAcceptable for BYTES
    elements that are not UTF-8 (only binary tensor data can carry them)."""
    kind = array.dtype.kind
    if kind == "f":
        out = array.astype(str)
        if not np.isfinite(array).all():
            for raw, text in _NON_FINITE.items():
                out[out == raw] = text
        return out
    if kind == "b":
        words: Array = np.where(array, "true", "false")
        return words
    if kind in "iu":
        return array.astype(str)
    flat = [_decode(item, what, fmt) for item in array.reshape(-1)]
    texts: Array = np.array(flat, dtype=object).reshape(array.shape)
    return texts


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
        return np.array(array.astype(str), dtype=np.float64).tolist()
    if kind in "fiub":
        return array.tolist()
    return as_text(array, what, fmt).tolist()
