"""What structured output costs on the tiny GGUF model, side by side in one run: the request-side
work (schema check, grammar text, llama.cpp parsing it) and the time per generated token with
and without the grammar.

    PYTHONPATH=. python tests/bench/structured_overhead.py [build/gguf/tiny-llama-q8_0.gguf]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar

from appliance.structured.schema import check_schema, grammar_for_schema, json_spec

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["bolt", "nut", "gear"]},
        "sizes": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
        "made": {"type": "string", "format": "date"},
    },
    "required": ["name", "kind", "sizes", "made"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a part."}]


def per_token(llm: Any, grammar: Any, runs: int) -> float:
    """Median seconds per generated token of a greedy chat (64 tokens at most)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = llm.create_chat_completion(
            messages=MESSAGES, grammar=grammar, max_tokens=64, temperature=0, seed=1
        )
        times.append((time.perf_counter() - start) / out["usage"]["completion_tokens"])
    return float(statistics.median(times))


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "build/gguf/tiny-llama-q8_0.gguf"
    llm = llama_cpp.Llama(path, n_ctx=256, n_threads=1, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        check_schema(SCHEMA, "schema")
    checked = (time.perf_counter() - start) / n
    json_spec(SCHEMA, "schema")
    start = time.perf_counter()
    for _ in range(n):
        json_spec(SCHEMA, "schema")
    again = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        text = grammar_for_schema(SCHEMA)
    built = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        llama_cpp.llama_sampler_free(sampler)
    parsed = (time.perf_counter() - start) / n
    grammar = LlamaGrammar.from_string(text, verbose=False)
    free, held = [], []
    for _ in range(3):  # interleaved, so both see the same machine
        free.append(per_token(llm, None, 5))
        held.append(per_token(llm, grammar, 5))
    f, h = statistics.median(free), statistics.median(held)
    print(
        f"schema check: {checked * 1e6:.0f} µs first time, {again * 1e6:.0f} µs when seen before;"
        f" grammar text: {built * 1e6:.0f} µs; llama.cpp parse: {parsed * 1e6:.0f} µs"
    )
    print(f"per token: free {f * 1e3:.3f} ms, grammar {h * 1e3:.3f} ms, ratio {h / f:.2f}x")


if __name__ == "__main__":
    main()
