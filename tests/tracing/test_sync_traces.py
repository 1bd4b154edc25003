"""A rollout traced end to end: the device's sync spans (poll, verify, download, activate) and
the hub's request spans in one trace, received by a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sync.conftest import Fleet, serving_version, wait_for
from tests.sync.conftest import fleet as fleet  # a fixture
from tests.sync.conftest import variants as variants  # a fixture
from tests.tracing.receiver import Receiver, Span


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The receiver on an event loop of its own thread (the fleet's processes are blocking)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    r = asyncio.run_coroutine_threadsafe(Receiver().start(), loop).result(30)
    yield r
    assert r.runner is not None
    asyncio.run_coroutine_threadsafe(r.runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_rollout_is_one_trace_from_the_device_to_the_hub(
    fleet: Fleet, variants: dict[str, Path], receiver: Receiver
) -> None:
    fleet.hub.stop()
    fleet.hub.serve_args = ["--trace-endpoint", receiver.url, "--trace-ratio", "0"]
    fleet.hub.start()
    env = {
        "APPLIANCE_TRACING__ENABLED": "true",
        "APPLIANCE_TRACING__ENDPOINT": receiver.url,
        "APPLIANCE_TRACING__SCHEDULE_DELAY_MS": "50",
        "APPLIANCE_TRACING__SAMPLING_RATIO": "0",
    }
    device = fleet.start_device("dev1", fleet.store("dev1"), env)
    fleet.hub.publish("sample", variants["v2"], "2", *fleet.manifest_args)
    fleet.hub.rollout("sample", "2", "dev1")
    wait_for("version 2 serving", lambda: serving_version(device) == "2")

    def named(name: str) -> list[Span]:
        return [s for s in receiver.spans if s.name == name]

    activate = wait_for("the activate span", lambda: named("sync.activate"))[0]
    by_id = {s.span_id: s for s in receiver.spans}
    poll = by_id[activate.parent]
    assert poll.name == "sync.poll" and poll.parent == ""  # a new trace per poll
    assert poll.resource["service.name"] == "appliance"
    assert activate.attributes["appliance.model.version"] == "2"
    for child in ("sync.verify", "sync.download"):
        (span,) = [s for s in named(child) if s.trace_id == poll.trace_id]
        assert span.parent == poll.span_id
    # the hub's span of that poll's assignments request, in the same trace
    hub = wait_for(
        "the hub's span",
        lambda: [s for s in named("GET /api/v1/device/assignments") if s.trace_id == poll.trace_id],
    )[0]
    assert hub.parent == poll.span_id and hub.resource["service.name"] == "appliance-hub"
    assert hub.attributes["http.response.status_code"] == 200
