"""An ONNX text encoder served as an embedding model (what `appliance build` makes).

The manifest declares "text" preprocessing (appliance/preprocess/text.py): texts are tokenized,
run through onnxruntime in batches of `[model_defaults.text] batch_size`, pooled and normalized.
It is a `TextModel` in "embedding" mode, so /v1/embeddings serves it as it serves a GGUF
embedding model, and KServe v2 / MQTT see the same tensors: BYTES "text" in, FP32 "embedding" out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InvalidInput, ModelError
from ..llm import Cancelled, EmbeddingResult, Emit, Generation, GenerationResult
from ..manifest import Manifest
from ..preprocess.text import TextEncoder, TextSpec, pool
from ..tensors import Signature, TensorSpec
from .base import LoadContext
from .onnx import OnnxBackend


class OnnxTextBackend(OnnxBackend):
    mode: Literal["chat", "embedding"] = "embedding"

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        super().__init__(manifest, path, context)
        what = f"model {manifest.name!r} version {manifest.version}"
        spec = TextSpec.from_manifest(manifest)
        assert spec is not None  # OnnxBackend.__new__ picks this class only then
        tensors = self.signature
        missing = [n for n in spec.inputs.values() if n not in tensors.input_by_name]
        if missing:
            raise ModelError(f"{what}: the manifest feeds inputs {missing} the model lacks")
        unfed = [t.name for t in tensors.inputs if t.name not in spec.inputs.values()]
        if unfed:
            raise ModelError(f"{what}: the manifest's text processing does not feed {unfed}")
        out = tensors.output_by_name.get(spec.output)
        if out is None:
            raise ModelError(f"{what}: the model has no output {spec.output!r}")
        self.spec = spec
        self.encoder = TextEncoder(spec, path.parent, what)
        self.limits = context.config.text
        self.dim = int(out.shape[-1]) if out.shape else -1
        self.n_ctx = spec.max_length
        self.signature = Signature(
            (TensorSpec("text", "BYTES", (-1,)),),
            (TensorSpec("embedding", "FP32", (-1, self.dim)),),
        )

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        raise InvalidInput("this is an embedding model: it cannot generate text")

    def embed(self, texts: list[str]) -> EmbeddingResult:
        if not texts:
            raise InvalidInput("no texts to embed")
        limit = self.limits.max_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                raise InvalidInput(
                    f"input {i} has {len(text)} characters, more than the limit of {limit} "
                    "([model_defaults.text] max_chars)"
                )
        vectors, tokens = [], 0
        step = self.limits.batch_size
        for start in range(0, len(texts), step):
            feed, mask = self.encoder.encode(texts[start : start + step])
            output = OnnxBackend.run(self, feed, [self.spec.output])[self.spec.output]
            vectors.append(pool(output, mask, self.spec.pooling, self.spec.normalize))
            tokens += int(mask.sum())
        return EmbeddingResult(np.concatenate(vectors), tokens)

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        texts = [_text(i, x) for i, x in enumerate(inputs["text"].reshape(-1))]
        return {"embedding": self.embed(texts).vectors}


def _text(index: int, item: Any) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input 'text': element {index} is not UTF-8 text") from None
    if isinstance(item, str):
        return item
    raise InvalidInput(f"input 'text': element {index} is not a string")
