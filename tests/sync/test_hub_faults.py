"""The hub misbehaving on the wire, through the fault-injecting proxy in front of the real hub
(tests/sync/conftest.py: Proxy): answers that are not JSON, truncated, of the wrong shape or
HTML from a captive portal, TUF metadata that is garbage, telemetry acknowledgements that make
no sense, and a hub slower than the device's request timeout. The device serves throughout,
says what is wrong in its sync status and log, refuses what TUF refuses, loses no telemetry,
and takes the rollout once the hub behaves again."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.conftest import ServerProcess
from tests.sync.conftest import Fleet, infer, kinds, serving_version, sync_status, wait_for

ASSIGNMENTS = r"/api/v1/device/assignments$"
TIMESTAMP = r"/tuf/metadata/timestamp\.json$"
TELEMETRY = r"/api/v1/device/telemetry$"


def _logged(device: ServerProcess, text: str) -> Callable[[], bool | None]:
    """A log line saying `text` from now on (not one from an earlier fault)."""
    start = len(device.lines)

    def check() -> bool | None:
        return any(text in line for line in device.lines[start:]) or None

    return check


def test_a_misbehaving_hub_is_refused_and_the_device_serves_on(fleet: Fleet) -> None:
    device = fleet.start_device("dev1", fleet.store("dev1"))
    hub, proxy = fleet.hub, fleet.proxy
    hub.publish("sample", fleet.samples / "sample.onnx", "2", *fleet.manifest_args)
    wait_for("the first status", lambda: kinds(hub.events("dev1"), "status"))

    faults: list[tuple[Callable[[bytes], bytes], str]] = [
        (lambda _b: b"<html>captive portal</html>", "assignments are not valid JSON: unexpected"),
        (lambda b: b[: len(b) // 2], "assignments are not valid JSON"),
        (lambda _b: b'{"models": [{"name": "sample"}]}', "lacks 'version'"),
        (lambda _b: b'{"models": 5}', "models is not a list"),
    ]
    for i, (rewrite, expected) in enumerate(faults):
        check = _logged(device, expected)
        proxy.rewrite = {ASSIGNMENTS: rewrite}
        if i == 0:  # what the device will see only once the hub is sane
            hub.rollout("sample", "2", "dev1")
        wait_for(f"the device to refuse {expected!r}", check)
        assert infer(device)["model_version"] == "1"
    # Garbage TUF metadata: refused by TUF, nothing downloaded, the old version serves.
    check = _logged(device, "TUF metadata refused")
    proxy.rewrite = {TIMESTAMP: lambda b: b[:40]}
    wait_for("TUF to refuse the timestamp", check)
    assert infer(device)["model_version"] == "1"
    assert not any(p.startswith("/tuf/targets/") for p, _ in proxy.statuses)
    # Telemetry acknowledged with nonsense: nothing is forgotten on the device.
    proxy.rewrite = {TIMESTAMP: lambda b: b[:40], TELEMETRY: lambda _b: b"[1, 2"}
    depth = sync_status(device)["outbox"]["events"]
    time.sleep(1.5)
    assert sync_status(device)["outbox"]["events"] >= depth
    # A hub slower than hub.request_timeout_s (5 s in the tests): offline, serving on.
    check = _logged(device, "hub unreachable: TimeoutError")
    proxy.delay_s = 6.0
    wait_for("the timeout", check, timeout=30)
    started = time.monotonic()
    assert infer(device)["model_version"] == "1"
    assert time.monotonic() - started < 2.0  # requests never wait on the hub
    # Sane again: the rollout arrives and every event reaches the hub once, in order.
    proxy.delay_s = 0.0
    proxy.rewrite = {}
    wait_for("version 2", lambda: serving_version(device) == "2", timeout=60)
    wait_for("the outbox to drain", lambda: sync_status(device)["outbox"]["events"] == 0)
    seqs = [e["seq"] for e in hub.events("dev1")]
    assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert not any("Traceback" in line for line in device.lines)
