"""A traced pipeline request: one span per node, children of the request's span, in its trace
(a real OTLP/HTTP receiver, as in tests/tracing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tests.pipelines.conftest import declare
from tests.pipelines.test_execution import CHAIN, FAN, body
from tests.tracing.receiver import Receiver
from tests.tracing.test_traces import SAMPLED, TRACE, traced


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


async def test_each_node_is_a_span_of_the_request(serve, receiver, tmp_path: Path):
    config = declare(tmp_path, {"chain": CHAIN, "fan": FAN}, **traced(receiver, 0.0))
    client = await serve(config)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for name in ("chain", "fan"):
        r = await client.post(
            f"/v2/models/{name}/infer", json=body(x), headers={"traceparent": SAMPLED}
        )
        assert r.status == 200, await r.text()
    await receiver.wait_for(2, "POST /v2/models/{name}/infer")
    chain = [s for s in receiver.spans if s.attributes.get("appliance.pipeline") == "chain"]
    assert sorted(s.name for s in chain) == ["node a", "node b"]
    assert {s.attributes["appliance.model"] for s in chain} == {"double", "addone"}
    requests = {s.span_id: s for s in receiver.spans if s.name.startswith("POST ")}
    for span in chain:
        parent = requests[span.parent]
        assert span.trace_id == TRACE
        assert parent.start_ns <= span.start_ns <= span.end_ns <= parent.end_ns
    # a fan-out's nodes are spans per row
    rows = [s for s in receiver.spans if s.attributes.get("appliance.pipeline") == "fan"]
    assert any("appliance.row" in s.attributes for s in rows), [s.name for s in rows]
