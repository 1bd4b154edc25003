"""New versions that fail to load, fail their smoke inference or fail their acceptance inputs
never serve: the old version keeps serving throughout, and each failure reaches the hub."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

from tests.conftest import stop_server_process
from tests.sync.conftest import (
    Fleet,
    Load,
    acceptance_for,
    batch_failure,
    http_json,
    infer,
    kinds,
    runtime_failure,
    serving_version,
    sync_status,
    wait_for,
)


def test_failing_versions_are_rolled_back_while_the_old_one_serves(
    fleet: Fleet, variants: dict[str, Path], tmp_path: Path
) -> None:
    hub = fleet.hub
    device = fleet.start_device("dev1", fleet.store("dev1"))
    load = Load(device)

    def rolled_back(version: str) -> list[dict[str, Any]]:
        return [e for e in kinds(hub.events("dev1"), "rolled_back") if e["data"]["from"] == version]

    hub.publish("sample", variants["broken"], "2", *fleet.manifest_args)
    hub.rollout("sample", "2", "dev1")
    wait_for("version 2 rolled back", lambda: rolled_back("2"))

    hub.publish("sample", runtime_failure(variants["v1"], tmp_path / "fails.onnx"), "3")
    hub.rollout("sample", "3", "dev1")
    wait_for("version 3 rolled back", lambda: rolled_back("3"))

    wrong = acceptance_for(variants["v3"], tmp_path / "wrong.json", scale_expected=0.5)
    hub.publish("sample", variants["v3"], "4", "--acceptance", str(wrong))
    hub.rollout("sample", "4", "dev1")
    wait_for("version 4 rolled back", lambda: rolled_back("4"))
    assert serving_version(device) == "1"

    right = acceptance_for(variants["v2"], tmp_path / "right.json")
    hub.publish("sample", variants["v2"], "5", "--acceptance", str(right))
    hub.rollout("sample", "5", "dev1")
    wait_for("version 5 serving", lambda: serving_version(device) == "5")
    load.stop()
    assert load.failures == [] and load.answered > 0

    events = hub.events("dev1")
    failed = {e["data"]["version"]: e["data"] for e in kinds(events, "update_failed")}
    assert failed["2"]["stage"] == "load" and "cannot load" in failed["2"]["reason"]
    assert "smoke inference failed" in failed["3"]["reason"]
    assert failed["4"]["stage"] == "acceptance"
    assert "differs from the expected values" in failed["4"]["reason"]
    for version in ("2", "3", "4"):
        assert rolled_back(version)[0]["data"]["to"] == "1"
    assert kinds(events, "activated")[-1]["data"] == {
        "model": "sample",
        "version": "5",
        "previous": "1",
    }
    status = sync_status(device)
    assert set(status["rejected"]) == {"sample/2", "sample/3", "sample/4"}

    # Refusals survive a restart: back on version 4, the device does not try it again.
    stop_server_process(device)
    fleet.devices.remove(device)
    hub.rollout("sample", "4", "dev1")
    device = fleet.start_device("dev1", fleet.store("dev1"))
    # The CLI changed the repository behind the serving hub, which sees such a change within
    # `fleet_check_s` (1 s): a poll in that window may still be answered with version 5.
    wait_for(
        "the device to see version 4 assigned",
        lambda: sync_status(device)["assigned"] == {"sample": "4"},
    )
    assert serving_version(device) == "5"
    assert "sample/4" in sync_status(device)["rejected"]
    assert infer(device)["model_version"] == "5"


def test_a_version_failing_after_the_switch_is_rolled_back(
    fleet: Fleet, variants: dict[str, Path], tmp_path: Path
) -> None:
    """Passes its smoke test, then fails most real requests: back to the previous version once
    the error rate passes the threshold within the window."""
    env = {"APPLIANCE_HUB__MIN_REQUESTS": "5", "APPLIANCE_HUB__ERROR_RATE_THRESHOLD": "0.5"}
    device = fleet.start_device("dev1", fleet.store("dev1"), env)
    fleet.hub.publish("sample", batch_failure(variants["v1"], tmp_path / "b.onnx"), "2")
    fleet.hub.rollout("sample", "2", "dev1")
    wait_for("version 2 serving", lambda: serving_version(device) == "2")
    pair = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}
    statuses = []
    for _ in range(10):
        try:
            http_json(f"http://{device.url}/v2/models/sample/infer", "POST", pair)
            statuses.append(200)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    assert 500 in statuses
    wait_for("version 1 serving again", lambda: serving_version(device) == "1")
    back = wait_for("the rollback event", lambda: kinds(fleet.hub.events("dev1"), "rolled_back"))
    assert back[0]["data"]["from"] == "2" and back[0]["data"]["to"] == "1"
    assert "error rate" in back[0]["data"]["reason"]
    assert (fleet.tmp / "store-dev1" / "sample" / "ACTIVE").read_text().split()[0] == "1"
    assert "sample/2" in sync_status(device)["rejected"]
    assert http_json(f"http://{device.url}/v2/models/sample/infer", "POST", pair)["outputs"]
