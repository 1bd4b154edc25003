"""Result cache: the same model version given the same input gives the same answer.

Optional per model (`cache_bytes`, 0 = off). A key is the sha256 of the model name and version,
every input tensor (name, datatype, shape, bytes, in name order), the requested outputs and the
request parameters that could change an answer. The version is in the key, and a model's cache
is emptied the first time it is asked for a version other than the one its entries came from,
so an answer never crosses a version switch. Entries are evicted least recently used first, so
the bytes held stay under the budget. Language models are cached only where the answer is
deterministic: greedy (temperature 0) or seeded sampling; embeddings always.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import orjson

from ..codec import InferRequest
from ..llm import EmbeddingResult, Generation, GenerationResult
from ..tensors import datatype_of

#: Request parameters that change how an answer travels, never what it is.
TRANSPORT_PARAMETERS = frozenset({"timeout", "binary_data_output"})
#: Rough bookkeeping cost of one entry (key, dict, array headers), counted against the budget.
_ENTRY_OVERHEAD = 256


class ResultCache:
    """An LRU map from key to a stored answer, bounded in bytes, for one model."""

    def __init__(self, name: str, budget: int) -> None:
        self.name = name
        self.budget = budget
        #: The model version the entries belong to.
        self.version = ""
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def for_version(self, version: str) -> ResultCache:
        """Drop everything if the model now serves another version."""
        if version != self.version:
            self._entries.clear()
            self.bytes = 0
            self.version = version
        return self

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        size = nbytes + _ENTRY_OVERHEAD
        if size > self.budget:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted


def _array_bytes(h: Any, array: np.ndarray[Any, Any]) -> None:
    if array.dtype.kind == "O":
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    else:
        h.update(np.ascontiguousarray(array).data)


def tensor_key(
    name: str, version: str, request: InferRequest, ignore: frozenset[str] = frozenset()
) -> str:
    """The key of a tensor request; `ignore` names extra parameters that do not change an
    answer (a task's sticky key)."""
    h = hashlib.sha256()
    h.update(orjson.dumps([name, version]))
    for input_name in sorted(request.inputs):
        array = request.inputs[input_name]
        datatype = request.datatypes.get(input_name) or datatype_of(array)
        h.update(orjson.dumps([input_name, datatype, array.dtype.str, list(array.shape)]))
        _array_bytes(h, array)
    outputs = sorted(request.outputs) if request.outputs is not None else None
    params = {
        k: v
        for k, v in request.parameters.items()
        if k not in TRANSPORT_PARAMETERS and k not in ignore
    }
    h.update(orjson.dumps([outputs, params], option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()


def outputs_size(outputs: dict[str, np.ndarray[Any, Any]]) -> int:
    size = 0
    for array in outputs.values():
        if array.dtype.kind == "O":
            size += sum(len(x) if isinstance(x, (bytes, str)) else 64 for x in array.reshape(-1))
        size += array.nbytes
    return size


def frozen(outputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """Outputs marked read-only: a cached answer is shared by every request that hits it."""
    for array in outputs.values():
        array.flags.writeable = False
    return outputs


def generation_key(name: str, version: str, request: Generation) -> str | None:
    """The key of a generation, or None when sampling makes its answer vary."""
    s = request.sampling
    if s.temperature != 0 and s.seed is None:
        return None
    body = [name, version, request.kind, request.messages, request.prompt, vars(s),
            request.structure()]  # fmt: skip
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def generation_size(result: GenerationResult) -> int | None:
    """Its size; None for a generation the client cut short (an answer, not one to keep)."""
    if result.finish_reason not in ("stop", "length"):
        return None
    return len(result.text.encode()) + 64


def embedding_key(name: str, version: str, texts: list[str]) -> str:
    return hashlib.sha256(orjson.dumps([name, version, "embed", texts])).hexdigest()


def embedding_size(result: EmbeddingResult) -> int | None:
    return int(result.vectors.nbytes)
