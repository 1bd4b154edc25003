"""The status page's summary (`GET /api/status`) carries the sync agent's state: the same
answer as `GET /v2/sync`, for a device syncing with a real hub."""

from __future__ import annotations

from tests.sync.conftest import Fleet, http_json, sync_status, wait_for


def test_the_summary_carries_the_sync_state(fleet: Fleet) -> None:
    device = fleet.start_device("dev1", fleet.store("dev1"))
    wait_for("a first check", lambda: sync_status(device)["last_check"] is not None)
    summary = http_json(f"http://{device.url}/api/status")
    direct = sync_status(device)
    sync = summary["sync"]
    assert (sync["hub"], sync["device_id"]) == (direct["hub"], "dev1")
    assert sync["outbox"].keys() == direct["outbox"].keys()
    assert sync["active"] == direct["active"] == {"sample": "1"}
    assert sync["pending"] == direct["pending"] == {}
    assert summary["models"][0]["stored"]["active"] == "1"
