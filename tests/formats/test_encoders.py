"""The XML and CSV encoders on answers the sample models cannot give: NaN and infinity, text
XML cannot carry, bytes that are not UTF-8, scalars, empty tables."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.codec import InferResponse
from appliance.errors import NotAcceptable
from appliance.formats.csv_answer import encode_csv
from appliance.formats.xml_answer import encode_xml
from tests.support.formats import csv_table, same, xml_answer


def answer(**outputs: np.ndarray) -> InferResponse:
    return InferResponse("m", "3", outputs, "id-1", {"task": "t", "fallback": False})


def test_non_finite_floats_and_scalars() -> None:
    f = np.array([np.nan, np.inf, -np.inf, 0.1, -0.0], dtype=np.float32)
    r = answer(f=f, s=np.array(7, dtype=np.int8), h=np.array([1.5], dtype=np.float16))
    body = encode_xml(r)
    attrs, got = xml_answer(body)
    assert attrs == {"model_name": "m", "model_version": "3", "id": "id-1"}
    assert b"<v>NaN</v><v>Infinity</v><v>-Infinity</v><v>0.1</v><v>-0.0</v>" in body
    assert same(got["f"][2], f) and got["s"] == ("INT8", [], np.array([7], dtype=np.int8))
    assert got["h"][0] == "FP16" and got["h"][2].tolist() == [1.5]
    assert b'<parameter name="task">t</parameter><parameter name="fallback">false' in body
    header, rows = csv_table(encode_csv(answer(f=f)))
    assert header == ["f"] and [r[0] for r in rows] == ["NaN", "Infinity", "-Infinity", "0.1",
                                                         "-0.0"]  # fmt: skip


def test_text_xml_cannot_carry_and_bytes_that_are_not_utf8() -> None:
    texts = np.array([b"ok", b"nul\x00"], dtype=object)
    with pytest.raises(NotAcceptable, match=r"output 't' holds the character U\+0000"):
        encode_xml(answer(t=texts))
    _, rows = csv_table(encode_csv(answer(t=texts)))
    assert rows == [["ok"], ["nul\x00"]]
    raw = np.array([b"\xff\xfe"], dtype=object)
    for encode in (encode_xml, encode_csv):
        with pytest.raises(NotAcceptable, match=r"not UTF-8.*binary tensor data"):
            encode(answer(t=raw))


def test_empty_and_mismatched_tables() -> None:
    assert encode_csv(answer(a=np.zeros((0, 2), np.float32), b=np.zeros(0, np.int64))) == (
        b"a[0],a[1],b\r\n"
    )
    with pytest.raises(NotAcceptable, match=r"outputs 'a' \(2 rows\) and 'b' \(3 rows\) differ"):
        encode_csv(answer(a=np.zeros(2), b=np.zeros(3)))
    with pytest.raises(NotAcceptable, match=r"output 's' has shape \[\]"):
        encode_csv(answer(s=np.array(1.0)))


def test_names_and_text_are_escaped() -> None:
    name = "out/1:a\"b'&<c>"
    texts = np.array(["<&>\"'", "é\ttab\nline"], dtype=object)
    body = encode_xml(
        InferResponse("m&m", "1", {name: texts, "n": np.array([1, 2])}, "id<1>", {"k": "<v>"})
    )
    attrs, got = xml_answer(body)
    assert attrs == {"model_name": "m&m", "model_version": "1", "id": "id<1>"}
    assert list(got) == [name, "n"] and got[name][2].tolist() == texts.tolist()
    assert b'<parameter name="k">&lt;v&gt;</parameter>' in body
