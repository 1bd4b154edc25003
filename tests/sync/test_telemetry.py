"""Telemetry reaches the hub exactly once and in order: the hub stopped for a while and started
again on the same data, and the appliance SIGKILLed while it uploads."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from appliance.sync.outbox import Outbox
from tests.conftest import stop_server_process
from tests.sync.conftest import Fleet, Load, sync_status, wait_for

ENV = {"APPLIANCE_HUB__METRICS_INTERVAL_S": "0.1", "APPLIANCE_HUB__UPLOAD_BATCH": "5"}


def test_every_event_arrives_once_and_in_order(fleet: Fleet) -> None:
    store = fleet.store("dev1")
    device = fleet.start_device("dev1", store, ENV)
    rounds, kills = 3, 0
    rng = random.Random(6)
    for _ in range(rounds):
        load = Load(device)  # keeps the metrics changing: an event every 0.1 s
        fleet.hub.stop()
        time.sleep(3)
        queued = sync_status(device)["outbox"]["events"]
        assert queued > 20, queued
        fleet.proxy.delay_s = 0.05  # each batch of 5 takes 50 ms or more: the kill lands mid-upload
        fleet.hub.start()
        time.sleep(rng.uniform(0.0, 0.3))
        load.stop()
        device.proc.send_signal(signal.SIGKILL)
        device.proc.wait()
        fleet.devices.remove(device)
        kills += 1
        fleet.proxy.delay_s = 0.0
        device = fleet.start_device("dev1", store, ENV)
    wait_for("the outbox to drain", lambda: sync_status(device)["outbox"]["events"] == 0)
    stop_server_process(device)
    fleet.devices.remove(device)

    box = Outbox(store / ".sync" / "outbox.sqlite", 1 << 24)
    written, dropped = box.last_seq(), box.dropped
    box.close()
    seqs = [e["seq"] for e in fleet.hub.events("dev1")]
    lost = len(set(range(1, written + 1)) - set(seqs))
    duplicated = len(seqs) - len(set(seqs))
    print(
        f"telemetry: {written} events written by the device, {len(seqs)} stored by the hub, "
        f"lost {lost}, duplicated {duplicated}, dropped {dropped}, SIGKILLs {kills}"
    )
    assert dropped == 0
    assert (lost, duplicated) == (0, 0)
    assert seqs == sorted(seqs)
    assert written > rounds * 20


def test_outbox_keeps_events_while_the_hub_is_down(fleet: Fleet, tmp_path: Path) -> None:
    """Disk use is capped: with a small cap and the hub away, the oldest events go, the drop is
    an event itself, and the hub gets it once the hub is back."""
    env = {**ENV, "APPLIANCE_HUB__OUTBOX_MAX_BYTES": "65536"}
    store = fleet.store("dev2")
    fleet.proxy.down = True
    device = fleet.start_device("dev2", store, env)
    load = Load(device)
    wait_for("the outbox to drop", lambda: sync_status(device)["outbox"]["dropped"] > 0, 120)
    load.stop()
    assert sync_status(device)["outbox"]["bytes"] <= 65536
    fleet.proxy.down = False
    wait_for("the outbox to drain", lambda: sync_status(device)["outbox"]["events"] == 0)
    events = fleet.hub.events("dev2")
    drops = [e for e in events if e["kind"] == "dropped"]
    assert drops
    seqs = {e["seq"] for e in events}
    for e in drops:
        seqs |= set(range(e["data"]["first_seq"], e["data"]["last_seq"] + 1))
    assert seqs == set(range(1, max(seqs) + 1)), "every seq is either stored or reported dropped"
