"""A strict GGUF header reader in pure Python, run before any native code sees a file.

llama.cpp's parser has a history of crashes on crafted files; this reader walks the whole header
(metadata and tensor table) with every count and length checked against the file's real size, so
a truncated, mislabelled or hostile file is refused with a clear message instead. It also gives
`appliance models add` a model's metadata without loading it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

MAGIC = b"GGUF"
#: Generous ceilings: real models have hundreds of tensors and tens of metadata keys.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_DIMS = 4
MAX_STRING = 64 << 20
#: Largest ggml_type id known to current llama.cpp, with room to grow.
MAX_GGML_TYPE = 64
#: Arrays with at most this many elements are kept in `metadata`; longer ones by length only.
KEEP_ARRAY = 64

_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass
class GgufInfo:
    version: int
    tensor_count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Lengths of the long arrays (e.g. tokenizer.ggml.tokens) that were not kept.
    array_lengths: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, suffix: str, default: Any = None) -> Any:
        """An architecture-scoped key, e.g. get("context_length") -> llama.context_length."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


class _Reader:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, why: str) -> ModelError:
        return ModelError(f"{self.path}: not a valid GGUF file: {why} (at byte {self.pos})")

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} runs past the end of the file ({len(self.buf)} bytes)")
        self.pos += n

    def take(self, n: int, what: str) -> bytes:
        """A copy, so that no view outlives the mapping (mmap refuses to close otherwise)."""
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start : self.pos])

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.scalar(fmt, size, what)
        if vtype == _STRING:
            return self.string(what)
        raise self.fail(f"{what} has unknown value type {vtype}")


def read_gguf(path: Path) -> GgufInfo:
    """Parse and check the header; raise ModelError naming the first problem found."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise ModelError(f"{path}: not a valid GGUF file: only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    return _parse(_Reader(view, path), size)
                finally:
                    view.release()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None


def _parse(r: _Reader, size: int) -> GgufInfo:
    if r.take(4, "magic") != MAGIC:
        raise r.fail("wrong magic (expected 'GGUF')")
    version = r.u32("version")
    if version not in (2, 3):
        raise r.fail(f"unsupported version {version} (2 or 3)")
    tensor_count = r.u64("tensor count")
    kv_count = r.u64("metadata count")
    if tensor_count > MAX_TENSORS:
        raise r.fail(f"absurd tensor count {tensor_count}")
    if kv_count > MAX_KV:
        raise r.fail(f"absurd metadata count {kv_count}")
    info = GgufInfo(version, tensor_count)
    for i in range(kv_count):
        key = r.string(f"metadata key {i}")
        vtype = r.u32(f"type of {key}")
        if vtype == _ARRAY:
            etype = r.u32(f"element type of {key}")
            count = r.u64(f"length of {key}")
            # every element takes at least one byte: a larger count cannot be honest
            if count > size - r.pos:
                raise r.fail(f"array {key} claims {count} elements")
            if etype == _ARRAY:
                raise r.fail(f"nested array in {key}")
            if etype in _SCALARS and count > KEEP_ARRAY:
                r.skip(count * _SCALARS[etype][1], key)
                info.array_lengths[key] = count
                continue
            items = [r.value(etype, f"{key}[{j}]") for j in range(count)]
            if count <= KEEP_ARRAY:
                info.metadata[key] = items
            else:
                info.array_lengths[key] = count
        else:
            info.metadata[key] = r.value(vtype, key)
    alignment = info.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment!r} is not a power of two")
    offsets = []
    for i in range(tensor_count):
        name = r.string(f"name of tensor {i}")
        n_dims = r.u32(f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name} has {n_dims} dimensions")
        dims = [r.u64(f"dimension of {name}") for _ in range(n_dims)]
        if any(d == 0 or d > size * 64 for d in dims):
            raise r.fail(f"tensor {name} has impossible dimensions {dims}")
        ggml_type = r.u32(f"type of {name}")
        if ggml_type > MAX_GGML_TYPE:
            raise r.fail(f"tensor {name} has unknown type {ggml_type}")
        offsets.append((name, r.u64(f"offset of {name}")))
    data_start = -(-r.pos // alignment) * alignment
    for name, offset in offsets:
        if offset % alignment or data_start + offset >= size:
            raise r.fail(f"tensor {name} data offset {offset} lies outside the file")
    if tensor_count and data_start > size:
        raise r.fail("the tensor data section is missing")
    return info


def read_model(path: Path) -> GgufInfo:
    """read_gguf, plus what a servable model needs: an architecture and some tensors."""
    info = read_gguf(path)
    if not info.architecture:
        raise ModelError(f"{path}: not a GGUF model: general.architecture is missing")
    if info.tensor_count == 0:
        raise ModelError(f"{path}: not a GGUF model: it holds no tensors")
    return info
