"""FP32 reference embeddings from a Hugging Face folder, in PyTorch (run in the converter Python).

    python hf_reference.py MODEL_DIR SENTENCES.json OUT.npy --pooling mean --max-length 256
        [--no-normalize] [--transformers]

`appliance build` runs this file by path with the converter Python (torch, transformers, and
sentence-transformers when there), so nothing here imports appliance. A folder with modules.json
goes through sentence-transformers itself (the library users compare against); any other folder
through transformers with the same pooling and normalization as the manifest declares. Prints
one JSON line: which library made the vectors. Writes a float32 .npy (no pickle).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any


def with_sentence_transformers(model_dir: Path, sentences: list[str], normalize: bool) -> Any:
    import sentence_transformers

    model = sentence_transformers.SentenceTransformer(
        str(model_dir), device="cpu", local_files_only=True
    )
    vectors = model.encode(
        sentences, batch_size=32, normalize_embeddings=normalize, convert_to_numpy=True
    )
    return vectors, f"sentence-transformers {sentence_transformers.__version__}"


def with_transformers(
    model_dir: Path, sentences: list[str], pooling: str, normalize: bool, max_length: int
) -> Any:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    for start in range(0, len(sentences), 32):
        batch = tokenizer(
            sentences[start : start + 32],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out.append(pooled.numpy())
    import numpy as np

    return np.concatenate(out), f"transformers {transformers.__version__} ({pooling} pooling)"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("sentences", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--no-normalize", action="store_true")
    parser.add_argument("--transformers", action="store_true", help="never sentence-transformers")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sentences = json.loads(args.sentences.read_text(encoding="utf-8"))
    normalize = not args.no_normalize
    use_st = (
        not args.transformers
        and (args.model_dir / "modules.json").is_file()
        and importlib.util.find_spec("sentence_transformers") is not None
    )
    if use_st:
        vectors, library = with_sentence_transformers(args.model_dir, sentences, normalize)
    else:
        vectors, library = with_transformers(
            args.model_dir, sentences, args.pooling, normalize, args.max_length
        )
    import numpy as np

    np.save(args.out, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
    print(json.dumps({"library": library, "count": len(sentences)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
