"""The pure-Python GGUF header check that runs before llama.cpp sees a file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from appliance.backends import detect_backend
from appliance.backends.gguf_file import read_gguf
from appliance.errors import ModelError


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", 8) + s(value)


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    out = s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    return out + struct.pack("<II", ggml_type, 0)[:4] + struct.pack("<Q", offset)


def gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"\0" * 64, version: int = 3,
         tensor_count: int | None = None, kv_count: int | None = None) -> bytes:  # fmt: skip
    head = b"GGUF" + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count,
                        len(kvs) if kv_count is None else kv_count)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(tensors)
    pad = -len(body) % 32
    return body + b"\0" * pad + data


VALID_KVS = [
    kv_str("general.architecture", "llama"),
    kv_u32("llama.context_length", 256),
    kv_str("tokenizer.chat_template", "{{ messages }}"),
    # a long array of strings: kept by length only
    s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 100)[:4] + struct.pack("<IQ", 8, 100)
    + b"".join(s(f"t{i}") for i in range(100)),
]  # fmt: skip


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_valid_header_and_metadata(tmp_path):
    p = write(tmp_path, gguf(VALID_KVS, [tensor("w", [4, 4], 0, 0), tensor("b", [4], 0, 32)]))
    info = read_gguf(p)
    assert info.version == 3 and info.tensor_count == 2
    assert info.architecture == "llama" and info.get("context_length") == 256
    assert info.metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert info.array_lengths["tokenizer.ggml.tokens"] == 100
    assert detect_backend(p) == "gguf"


def _bad(tmp_path: Path, data: bytes) -> str:
    with pytest.raises(ModelError) as exc:
        read_gguf(write(tmp_path, data))
    return exc.value.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"GGUF", "only 4 bytes"),
        (b"GGML" + b"\0" * 60, "wrong magic"),
        (gguf(VALID_KVS, [], version=1), "unsupported version 1"),
        (gguf(VALID_KVS, [], version=99), "unsupported version 99"),
        (gguf(VALID_KVS, [], tensor_count=2**40), "absurd tensor count"),
        (gguf(VALID_KVS, [], kv_count=2**40), "absurd metadata count"),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 0, len(VALID_KVS) + 1) + b"".join(VALID_KVS),
            "runs past the end",
        ),
        (gguf([s("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**62)], []), "claims"),
        (
            gguf([s("k") + struct.pack("<IIQ", 9, 4, 0)[:4] + struct.pack("<IQ", 4, 2**50)], []),
            "array k claims",
        ),
        (gguf([s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1)], []), "nested array"),
        (gguf([s("k") + struct.pack("<I", 77) + b"\0" * 8], []), "unknown value type 77"),
        (gguf([s(b"\xff\xfe") + struct.pack("<I", 4) + b"\0" * 4], []), "not UTF-8"),
        (gguf([kv_u32("general.alignment", 3)], []), "not a power of two"),
        (gguf(VALID_KVS, [tensor("w", [4, 4], 0, 1 << 30)]), "outside the file"),
        (gguf(VALID_KVS, [tensor("w", [4, 4], 0, 7)]), "outside the file"),
        (gguf(VALID_KVS, [tensor("w", [1, 2, 3, 4, 5])]), "5 dimensions"),
        (gguf(VALID_KVS, [tensor("w", [0])]), "impossible dimensions"),
        (gguf(VALID_KVS, [tensor("w", [4], 200)]), "unknown type 200"),
    ],
    ids=[
        "tiny",
        "magic",
        "v1",
        "v99",
        "tensors",
        "kvs",
        "truncated-kv",
        "string-len",
        "array-len",
        "nested",
        "vtype",
        "utf8",
        "alignment",
        "offset",
        "misaligned",
        "dims",
        "zero-dim",
        "ggml-type",
    ],
)
def test_hostile_headers_are_refused(tmp_path, data, fragment):
    message = _bad(tmp_path, data)
    assert "not a valid GGUF file" in message and fragment in message, message


def test_every_truncation_of_a_valid_file_is_refused_cleanly(tmp_path):
    data = gguf(VALID_KVS, [tensor("w", [4, 4], 0, 0)])
    header_end = len(data) - 64
    for cut in range(0, header_end, 7):
        with pytest.raises(ModelError):
            read_gguf(write(tmp_path, data[:cut], f"cut{cut}.gguf"))
