"""Guard costs, measured side by side in one run (python -m tests.bench.guards_bench):

1. masking a 10 KB text with every detector on (the issue's goal: <= 1 ms);
2. the input rules (limits, control characters, every built-in injection rule) on a 4 KB
   prompt (goal: <= 200 us);
3. with --gguf: SSE streaming from the tiny GGUF model through the real server, masking off
   and on, requests alternated: time to first token and tokens/s (goal: >= 0.97x, TTFT + <= 5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from appliance.guards.pii import PiiMasker
from appliance.guards.rules import InputRules, injection_rules
from appliance.guards.stream import StreamMasker
from tests.guards import corpus


def best_of(fn: Callable[[], object], repeat: int = 7, number: int = 50) -> tuple[float, float]:
    """(median, min) seconds per call over `repeat` rounds of `number` calls."""
    rounds = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - t) / number)
    return statistics.median(rounds), min(rounds)


def text_of(size: int, seed: int, every: int = 1) -> str:
    """English and Chinese filler; with `every` = n, a paragraph of 4 valid and 2 invalid
    identifiers after every n-th paragraph of filler (0: none)."""
    rng = random.Random(seed)
    out, i = "", 0
    while len(out) < size:
        i += 1
        if every and i % every == 0:
            values = rng.sample(corpus.valid_values(rng), 4)
            out += corpus.document(rng, values + rng.sample(corpus.invalid_values(rng), 2))
        words = rng.sample(corpus.FILLER_EN.split(), 10)
        out += " ".join(words) + ". " + corpus.FILLER_ZH + "\n"
    return out[:size]


def bench_masking() -> None:
    masker = PiiMasker()
    cases = [
        ("dense", text_of(10_000, 1)),
        ("typical", text_of(10_000, 1, every=10)),
        ("none", text_of(10_000, 2, every=0)),
    ]
    for label, text in cases:
        found = len(masker.find(text))
        med, low = best_of(partial(masker.mask, text))
        print(f"mask 10 KB, {label:7s}: {med * 1e3:.3f} ms median, {low * 1e3:.3f} ms min "
              f"({found} values)")  # fmt: skip


def bench_rules() -> None:
    rules = InputRules(
        max_chars=20000, max_bytes=80000, control_chars="strip", rules=injection_rules("reject")
    )
    rng = random.Random(3)
    prompt = ""
    while len(prompt) < 4096:
        prompt += (
            " ".join(rng.sample(corpus.FILLER_EN.split(), 12)) + ". " + corpus.FILLER_ZH[:20] + "\n"
        )
    prompt = prompt[:4096]
    hits: list = []
    med, low = best_of(lambda: rules.check(prompt, hits), number=200)
    print(f"input rules 4 KB prompt: {med * 1e6:.1f} us median, {low * 1e6:.1f} us min")


async def bench_stream(gguf: Path, rounds: int) -> None:
    import tempfile

    import openai
    from aiohttp.test_utils import TestClient

    from appliance.api.http import LOADER
    from appliance.config import load_config
    from appliance.registry import Registry
    from appliance.server import build, sources_from_store
    from tests.support.front import FrontServer

    with tempfile.TemporaryDirectory() as tmp:
        store = Registry(Path(tmp) / "models")
        store.add("plain", gguf)
        # "masked" is a task over the same model instance, with PII masking on: the two
        # differ by the guards (and the task's routing), not by a second llama context.
        config = load_config(None, {
            "store": {"path": str(store.root)},
            "model_defaults": {"probe_first_load": False},
            "tasks": {"masked": {"variants": [{"model": "plain"}],
                                 "guards": {"pii": {"entities": ["all"]}}}},
        }, {})  # fmt: skip
        app = build(config, sources_from_store(store.root), store)
        client = TestClient(FrontServer(app, host="127.0.0.1"))
        await client.start_server()
        await app[LOADER]
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
        prompt = "Beautiful is better than"
        stats: dict[str, list[tuple[float, float, int]]] = {"plain": [], "masked": []}
        tokens_seen: list[str] = []
        try:
            for i in range(rounds * 2 + 2):
                name = ("plain", "masked")[i % 2]
                t0 = time.perf_counter()
                first = None
                pieces = 0
                stream = await api.completions.create(
                    model=name, prompt=prompt, stream=True, temperature=0, seed=1,
                    max_tokens=128, stream_options={"include_usage": True},
                )  # fmt: skip
                tokens = 0
                texts = []
                async for chunk in stream:
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].text:
                        pieces += 1
                        texts.append(chunk.choices[0].text)
                        if first is None:
                            first = time.perf_counter() - t0
                total = time.perf_counter() - t0
                if i >= 2:  # the first of each warms up
                    stats[name].append((first or total, total, tokens))
                if name == "plain":
                    tokens_seen = texts
        finally:
            await client.close()
    for name, rows in stats.items():
        ttft = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[2] / (r[1] - r[0]) for r in rows if r[1] > r[0])
        per_token = statistics.median((r[1] - r[0]) / max(r[2] - 1, 1) for r in rows)
        print(f"stream {name:6s}: TTFT {ttft * 1e3:.2f} ms, {tps:.0f} tokens/s "
              f"({per_token * 1e3:.2f} ms/token), {rows[0][2]} tokens, n={len(rows)}")  # fmt: skip
    p, m = stats["plain"], stats["masked"]
    ratio = statistics.median(r[2] / (r[1] - r[0]) for r in m) / statistics.median(
        r[2] / (r[1] - r[0]) for r in p
    )
    added = statistics.median(r[0] for r in m) - statistics.median(r[0] for r in p)
    print(f"masked/plain tokens/s: {ratio:.3f}x; TTFT added: {added * 1e3:+.2f} ms "
          "(end to end, alternated; noisy on a loaded machine)")  # fmt: skip
    replay(tokens_seen)


def replay(pieces: list[str]) -> None:
    """The masker's own cost on the model's real token stream: CPU per token, and after how
    many tokens the first text is released (what masking adds to the time to first token)."""
    masker = PiiMasker()
    rounds = []
    first = 0
    for _ in range(21):
        stream = StreamMasker(masker)
        t = time.perf_counter()
        released = [stream.feed(p) for p in pieces]
        released.append(stream.flush())
        rounds.append((time.perf_counter() - t) / len(pieces))
        first = next(i for i, r in enumerate(released) if r) + 1
    print(f"stream masker on the model's {len(pieces)} tokens: "
          f"{statistics.median(rounds) * 1e6:.1f} us/token median; first text released "
          f"with token {first}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--gguf", type=Path, help="a GGUF chat model (build/gguf/tiny-llama-q8_0.gguf)"
    )
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    bench_masking()
    bench_rules()
    if args.gguf:
        asyncio.run(bench_stream(args.gguf, args.rounds))


if __name__ == "__main__":
    main()
