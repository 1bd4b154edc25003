"""Text pre- and post-processing: strings -> token tensors -> model -> one vector per text.

A manifest declares it (what `appliance build` writes for an embedding model):

    "preprocess":  {"type": "text", "tokenizer": "tokenizer.json", "max_length": 256,
                    "padding": "longest", "truncation": true,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "token_type_ids": "token_type_ids"}}
    "postprocess": {"type": "embedding", "output": "last_hidden_state", "pooling": "mean",
                    "normalize": true}

`inputs` maps each role the tokenizer fills to the model input it feeds (roles the model lacks
are left out). `pooling` is "mean" (over the attention mask), "cls" (the first token) or "none"
(the output is already one vector per text). The tokenizer file is a Hugging Face
`tokenizer.json`, read with the `tokenizers` library (imported on first use).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InvalidInput, ModelError
from ..manifest import Manifest, is_plain_name

PREPROCESS_TYPE = "text"
POSTPROCESS_TYPE = "embedding"
ROLES = ("input_ids", "attention_mask", "token_type_ids")
POOLINGS = ("mean", "cls", "none")
PADDINGS = ("longest", "max_length")

Pooling = Literal["mean", "cls", "none"]
Padding = Literal["longest", "max_length"]


@dataclass(frozen=True)
class TextSpec:
    """The "text" preprocessing and "embedding" postprocessing of a manifest, checked."""

    tokenizer: str
    max_length: int
    padding: Padding
    truncation: bool
    #: role (input_ids, attention_mask, token_type_ids) -> the model input it feeds
    inputs: dict[str, str]
    output: str
    pooling: Pooling
    normalize: bool

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> TextSpec | None:
        """The manifest's text processing, None when it declares none; ModelError if malformed.

        The declarations may be the legacy `preprocess` / `postprocess` or input / output
        `steps` (appliance/steps/text.py checks them the same way at `models add`)."""
        pre = next((d for _, d in manifest.declared("input") if d["type"] == PREPROCESS_TYPE), None)
        if pre is None:
            return None
        post = next(
            (d for _, d in manifest.declared("output") if d["type"] == POSTPROCESS_TYPE), None
        )
        where = f"model {manifest.name!r} version {manifest.version}"
        if post is None:
            raise ModelError(
                f"{where}: text preprocessing needs an 'embedding' postprocess in the manifest"
            )
        try:
            return cls.from_json(pre, post)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: invalid text processing in the manifest: {exc}") from None

    @classmethod
    def from_json(cls, pre: dict[str, Any], post: dict[str, Any]) -> TextSpec:
        return cls(**text_fields(pre), **embedding_fields(post))

    def to_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The manifest's (preprocess, postprocess) objects."""
        pre = {
            "type": PREPROCESS_TYPE,
            "tokenizer": self.tokenizer,
            "max_length": self.max_length,
            "padding": self.padding,
            "truncation": self.truncation,
            "inputs": dict(self.inputs),
        }
        post = {
            "type": POSTPROCESS_TYPE,
            "output": self.output,
            "pooling": self.pooling,
            "normalize": self.normalize,
        }
        return pre, post


def text_fields(pre: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a "text" declaration; ValueError/KeyError/TypeError if wrong."""
    tokenizer = str(pre["tokenizer"])
    if not is_plain_name(tokenizer):
        raise ValueError(f"'tokenizer' must be a plain file name, got {tokenizer!r}")
    max_length = pre["max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"'max_length' must be an integer of at least 2, got {max_length!r}")
    padding = pre.get("padding", "longest")
    if padding not in PADDINGS:
        raise ValueError(f"'padding' must be one of {PADDINGS}, got {padding!r}")
    inputs = pre["inputs"]
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise ValueError("'inputs' must map at least 'input_ids' to a model input")
    unknown = sorted(set(inputs) - set(ROLES))
    if unknown:
        raise ValueError(f"'inputs' has unknown roles {unknown} (known: {list(ROLES)})")
    return {
        "tokenizer": tokenizer,
        "max_length": max_length,
        "padding": padding,
        "truncation": bool(pre.get("truncation", True)),
        "inputs": {str(k): str(v) for k, v in inputs.items()},
    }


def embedding_fields(post: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of an "embedding" declaration; ValueError/KeyError if wrong."""
    pooling = post.get("pooling", "mean")
    if pooling not in POOLINGS:
        raise ValueError(f"'pooling' must be one of {POOLINGS}, got {pooling!r}")
    return {
        "output": str(post["output"]),
        "pooling": pooling,
        "normalize": bool(post.get("normalize", True)),
    }


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise ModelError(
            f"the 'tokenizers' library is not installed ({exc}): pip install 'appliance[text]'"
        ) from None
    return tokenizers


class TextEncoder:
    """Tokenizes a batch of texts into the model's int64 input tensors, as the spec says."""

    def __init__(self, spec: TextSpec, directory: Path, what: str) -> None:
        tokenizers = _tokenizers()
        path = directory / spec.tokenizer
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelError(f"{what}: cannot read the tokenizer {path}: {exc}") from None
        # tokenizer.json files carry their trainer's padding and truncation (e.g. a fixed 128):
        # the manifest decides instead.
        pad = tok.padding or {}
        pad_token = str(pad.get("pad_token") or "[PAD]")
        pad_id = pad.get("pad_id")
        if pad_id is None:
            pad_id = tok.token_to_id(pad_token)
        tok.no_truncation()
        tok.no_padding()
        if spec.truncation:
            tok.enable_truncation(spec.max_length)
        tok.enable_padding(
            pad_id=int(pad_id or 0),
            pad_token=pad_token,
            length=spec.max_length if spec.padding == "max_length" else None,
        )
        self._tok = tok
        self.spec = spec

    def encode(
        self, texts: list[str]
    ) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
        """The model's inputs for `texts`, and their attention mask (1 for real tokens)."""
        spec = self.spec
        encodings = self._tok.encode_batch(texts)
        if not spec.truncation:
            for i, e in enumerate(encodings):
                n = sum(e.attention_mask)
                if n > spec.max_length:
                    raise InvalidInput(
                        f"input {i} has {n} tokens, more than this model's {spec.max_length} "
                        "(its manifest turns truncation off)"
                    )
        arrays = {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }
        return {name: arrays[role] for role, name in spec.inputs.items()}, arrays["attention_mask"]


def pool(
    output: np.ndarray[Any, Any],
    mask: np.ndarray[Any, Any],
    pooling: Pooling,
    normalize: bool,
) -> np.ndarray[Any, Any]:
    """One float32 vector per text from the model's output (hidden states, or vectors)."""
    out = output.astype(np.float32, copy=False)
    if pooling == "mean":
        if out.ndim != 3:
            raise ModelError(f"mean pooling needs [batch, tokens, dim] output, got {out.shape}")
        weights = mask[:, : out.shape[1], None].astype(np.float32)
        vectors = (out * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    elif pooling == "cls":
        if out.ndim != 3:
            raise ModelError(f"cls pooling needs [batch, tokens, dim] output, got {out.shape}")
        vectors = out[:, 0, :]
    else:
        vectors = out.reshape(out.shape[0], -1)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)
