"""Offline is the normal case: with the hub unreachable or slow the appliance starts, serves and
answers health checks, and request latency stays as it is (measured side by side, reported)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from tests.sync.conftest import Fleet, infer, sync_status, wait_for


def test_the_appliance_serves_with_the_hub_down(fleet: Fleet) -> None:
    fleet.proxy.down = True  # unreachable from the first moment
    device = fleet.start_device("dev1", fleet.store("dev1"))  # waits for /v2/health/ready
    assert infer(device)["model_version"] == "1"
    wait_for("the offline state", lambda: sync_status(device)["state"] == "offline")
    assert sync_status(device)["outbox"]["events"] > 0  # telemetry waits on disk
    fleet.proxy.down = False
    wait_for("the outbox to drain", lambda: sync_status(device)["outbox"]["events"] == 0)


_CLIENT = """
import json, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
body = (b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", '
        b'"data": [5.1, 3.5, 1.4, 0.2]}]}')
out = []
for _ in range(n):
    req = urllib.request.Request(url, data=body, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    out.append(time.perf_counter() - t0)
print(json.dumps(out))
"""


def test_latency_with_the_hub_up_down_and_slow(fleet: Fleet) -> None:
    """Inference latency in three hub states, interleaved in rounds so drift hits all alike.
    Reported, not asserted against a threshold (a 2-core shared machine is noisy)."""
    device = fleet.start_device("dev1", fleet.store("dev1"))
    url = f"http://{device.url}/v2/models/sample/infer"

    def timed(n: int) -> list[float]:
        """Timed in a process of its own: the proxy's thread in this one must not compete
        with the client for the GIL."""
        out = subprocess.run(
            [sys.executable, "-c", _CLIENT, url, str(n)],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return [float(x) for x in json.loads(out.stdout)]

    timed(50)  # warm up
    samples: dict[str, list[float]] = {"up": [], "down": [], "slow": []}
    states = list(samples)
    for r in range(6):
        for state in states[r % 3 :] + states[: r % 3]:  # each state first, second, third alike
            fleet.proxy.down = state == "down"
            fleet.proxy.delay_s = 3.0 if state == "slow" else 0.0
            time.sleep(0.5)  # let polls hit the new state
            samples[state] += timed(100)
    fleet.proxy.down, fleet.proxy.delay_s = False, 0.0
    median = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    p99 = {k: sorted(v)[int(len(v) * 0.99)] * 1e3 for k, v in samples.items()}
    print(
        "latency ms (median / p99): "
        + ", ".join(f"hub {k} {median[k]:.3f} / {p99[k]:.3f}" for k in samples)
        + f"; ratio down/up {median['down'] / median['up']:.2f}, "
        f"slow/up {median['slow'] / median['up']:.2f}"
    )
    assert all(len(v) == 600 for v in samples.values())
