"""What an answer costs to write in each format, side by side with JSON, in one run.

    PYTHONPATH=. .venv/bin/python tests/bench/formats_encode.py [--rows 1 100 1000]

For an answer shaped like build/samples/sample.onnx's (probabilities [N, 3] FP32, label [N]
INT64): the codec's JSON, XML, CSV and a Markdown report template (rendered in the sandbox,
thread hand-off included), median of repeated runs, and each as a multiple of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from appliance.codec import InferRequest, InferResponse, encode_response
from appliance.config import FormatsConfig
from appliance.formats.csv_answer import encode_csv
from appliance.formats.templates import compile_templates
from appliance.formats.xml_answer import encode_xml

REPORT = """# {{ model_name }} (version {{ model_version }})
| row | label | top probability |
|---|---|---|
{% for p in outputs.probabilities -%}
| {{ loop.index0 }} | {{ outputs.label[loop.index0] }} | {{ '%.3f'|format(p|max) }} |
{% endfor %}"""


def median_s(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--repeat", type=int, default=51)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    templates = compile_templates({"markdown": ("report.md.j2", REPORT)}, FormatsConfig(), "m")
    loop = asyncio.new_event_loop()
    for n in args.rows:
        outputs = {
            "probabilities": rng.random((n, 3), dtype=np.float32),
            "label": rng.integers(0, 3, n),
        }
        response = InferResponse("sample", "1", outputs, "id-1", templates=templates)
        request = InferRequest({})
        render = partial(templates.render, "markdown", response, {})
        json_s = median_s(partial(encode_response, response, request), args.repeat)
        costs = {
            "xml": median_s(partial(encode_xml, response), args.repeat),
            "csv": median_s(partial(encode_csv, response), args.repeat),
            "markdown": median_s(lambda: loop.run_until_complete(render()), args.repeat),  # noqa: B023
        }
        line = ", ".join(f"{k} {v * 1e6:.0f} µs ({v / json_s:.1f}x)" for k, v in costs.items())
        print(f"{n} rows: json {json_s * 1e6:.1f} µs, {line}")
    loop.close()


if __name__ == "__main__":
    main()
