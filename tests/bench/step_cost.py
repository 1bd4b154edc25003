"""What one call of a built-in step costs, beside a bare Python call, in one run.

    PYTHONPATH=. .venv/bin/python tests/bench/step_cost.py [--rounds 7] [--scale 1.0]

Each row is the median over the rounds of the time per call (µs), measured in a loop of
`run_step(step, tensors, call, where)` as the request path and the pipeline executor call it.
The first rows say what a pass-through step adds to a request (issue 16: at most 20 µs): a
cast to the tensor's own datatype, against a plain function that hands the tensor on. The
others size the steps of a detect-crop-classify pipeline on typical tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from appliance.steps import parse_step
from appliance.steps.base import Array, StepCall, StepContext, run_step

CALL = StepCall({})


def per_call_us(fn: Callable[[], object], loops: int, rounds: int) -> float:
    fn()  # warm: first-call imports and caches
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter_ns() - start) / loops / 1000)
    return statistics.median(times)


def step_call(decl: dict[str, Any], tensors: Mapping[str, Array]) -> Callable[[], object]:
    step = parse_step(decl, StepContext("bench"))
    return lambda: run_step(step, tensors, CALL, "bench")


def candidates(rng: np.random.Generator, n: int, objects: int) -> tuple[Array, Array]:
    """A detector's [1, n, 4] boxes and [1, n] scores: many boxes around each of a few
    objects, or (objects 0) boxes scattered with little overlap (the slow case of NMS)."""
    if objects:
        pick = rng.integers(0, objects, n)
        middle = rng.uniform(50, 550, (objects, 2))[pick] + rng.normal(0, 4, (n, 2))
        half = rng.uniform(10, 40, (objects, 2))[pick] * rng.uniform(0.8, 1.2, (n, 2))
        boxes = np.concatenate([middle - half, middle + half], axis=1)
    else:
        corner = rng.uniform(0, 600, (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(10, 80, (n, 2))], axis=1)
    return boxes[None].astype(np.float32), rng.random((1, n)).astype(np.float32)


def cases() -> list[tuple[str, Callable[[], object], int]]:
    rng = np.random.default_rng(0)
    x = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
    hand_on: Callable[[Mapping[str, Array]], dict[str, Array]] = lambda t: {"input": t["input"]}  # noqa: E731
    tensors = {"input": x}
    boxes, scores = candidates(rng, 1000, objects=20)
    scattered, scattered_scores = candidates(rng, 1000, objects=0)
    image = rng.random((1, 3, 128, 128)).astype(np.float32)
    crop_boxes = rng.uniform(0, 96, (16, 2)).astype(np.float32)
    crop_boxes = np.concatenate([crop_boxes, crop_boxes + 32], axis=1)
    photo = rng.integers(0, 256, (1, 3, 720, 1280), dtype=np.uint8)
    text = np.array([json.dumps({"answer": {"label": "cat", "p": 0.9}}).encode()], dtype=object)
    return [
        ("bare call handing the tensor on", lambda: hand_on(tensors), 20000),
        (
            "cast to the same datatype",
            step_call({"type": "cast", "datatype": "FP32"}, tensors),
            20000,
        ),
        (
            "cast FP32 -> FP16 [1, 4]",
            step_call({"type": "cast", "datatype": "FP16"}, tensors),
            20000,
        ),
        ("reshape [1, 4] -> [4]", step_call({"type": "reshape", "shape": [4]}, tensors), 20000),
        (
            "argmax_label [1, 4]",
            step_call({"type": "argmax_label", "labels": ["r", "g", "b", "w"]}, {"logits": x}),
            10000,
        ),
        ("top_k 2 of [1, 4]", step_call({"type": "top_k", "k": 2}, {"scores": x}), 10000),
        (
            "json_field a.b path",
            step_call({"type": "json_field", "path": "answer.label"}, {"text": text}),
            10000,
        ),
        (
            "nms 1000 candidates around 20 objects",
            step_call({"type": "nms", "score_threshold": 0.0}, {"boxes": boxes, "scores": scores}),
            100,
        ),
        (
            "nms 1000 scattered, 300 kept",
            step_call(
                {"type": "nms", "score_threshold": 0.0},
                {"boxes": scattered, "scores": scattered_scores},
            ),
            10,
        ),
        (
            "crop 16 boxes to 32x32 of 128x128",
            step_call({"type": "crop", "size": [32, 32]}, {"image": image, "boxes": crop_boxes}),
            200,
        ),
        (
            "letterbox 1280x720 UINT8 -> 640x640",
            step_call(
                {"type": "letterbox", "size": [640, 640], "pad_value": 114}, {"image": photo}
            ),
            10,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the loop counts")
    args = parser.parse_args()
    rows = [
        (name, per_call_us(fn, max(1, int(loops * args.scale)), args.rounds))
        for name, fn, loops in cases()
    ]
    base = rows[0][1]
    print(f"{'per call (median of rounds)':40} {'µs':>10} {'µs over the bare call':>22}")
    for name, us in rows:
        print(f"{name:40} {us:10.2f} {us - base:22.2f}")


if __name__ == "__main__":
    main()
