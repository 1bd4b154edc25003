"""A pipeline published on a real hub is rolled out like a model: TUF-verified, stored as a
version, bound to the models the device serves, switched to with no gap; one that does not
bind (a model the device does not serve) is refused and the serving version goes on."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from typing import Any

from tests.sync.conftest import (
    SAMPLE_INPUT,
    Fleet,
    http_json,
    kinds,
    sync_status,
    wait_for,
)

LABELS = ["setosa", "versicolor", "virginica"]


def _declaration(model: str, label: bool = False) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [
        {"name": "m", "model": model, "inputs": {"input": "request.x"}},
    ]
    outputs = [{"name": "probabilities", "source": "m.probabilities"}]
    if label:
        nodes.append({
            "name": "best",
            "step": {"type": "argmax_label", "labels": LABELS},
            "inputs": {"logits": "m.probabilities"},
        })  # fmt: skip
        outputs.append({"name": "species", "source": "best.label"})
    return {
        "kind": "pipeline",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "nodes": nodes,
        "outputs": outputs,
    }


def _write(tmp: Path, name: str, doc: dict[str, Any]) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def _infer(url: str) -> dict[str, Any]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                        "data": SAMPLE_INPUT[0]}]}  # fmt: skip
    return dict(http_json(f"http://{url}/v2/models/iris/infer", "POST", body))


def _version(url: str) -> str | None:
    meta = http_json(f"http://{url}/v2/models/iris")
    ready = meta["parameters"]["status"] == "ready"
    return str(meta["versions"][0]) if ready else None


def test_a_pipeline_is_rolled_out_served_and_a_broken_one_refused(fleet: Fleet) -> None:
    device = fleet.start_device("dev1", fleet.store("dev1"))
    tmp = fleet.tmp

    fleet.hub.publish("iris", _write(tmp, "v1", _declaration("sample")), "1")
    fleet.hub.rollout("iris", "1", "dev1")
    wait_for("pipeline version 1 serving", lambda: _version(device.url) == "1")
    answer = _infer(device.url)
    assert answer["model_name"] == "iris" and answer["model_version"] == "1"
    assert [o["name"] for o in answer["outputs"]] == ["probabilities"]
    probabilities = answer["outputs"][0]["data"]
    wait_for(
        "the hub to show the pipeline",
        lambda: fleet.hub.device("dev1")["active"] == {"sample": "1", "iris": "1"},
    )
    stored = tmp / "store-dev1" / "iris"
    assert (stored / "1" / "pipeline.json").is_file()
    assert json.loads((stored / "1" / "manifest.json").read_text())["backend"] == "pipeline"

    # A version naming a model this device does not serve: refused at bind, 1 serves on.
    fleet.hub.publish("iris", _write(tmp, "v2", _declaration("nosuch")), "2")
    fleet.hub.rollout("iris", "2", "dev1")
    wait_for("version 2 refused", lambda: "iris/2" in sync_status(device)["rejected"])
    assert _version(device.url) == "1"
    assert _infer(device.url)["model_version"] == "1"
    assert "nosuch" in sync_status(device)["rejected"]["iris/2"]
    events = wait_for(
        "the failure events", lambda: kinds(fleet.hub.events("dev1"), "update_failed")
    )
    assert events[0]["data"]["model"] == "iris" and events[0]["data"]["stage"] == "bind"
    rolled = kinds(fleet.hub.events("dev1"), "rolled_back")
    assert rolled and rolled[0]["data"]["to"] == "1"
    assert (stored / "ACTIVE").read_text().split()[0] == "1"

    # Version 3 binds but answers its signed acceptance input wrongly: refused, 1 serves on.
    def acceptance(name: str, expected: list[float]) -> str:
        case = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                        "data": SAMPLE_INPUT[0]}],
            "outputs": [{"name": "probabilities", "shape": [1, 3], "data": expected}],
        }  # fmt: skip
        path = tmp / f"{name}.acceptance.json"
        path.write_text(json.dumps([case]))
        return str(path)

    wrong = [p + 0.5 for p in probabilities]
    v3 = _write(tmp, "v3", _declaration("sample", label=True))
    fleet.hub.publish("iris", v3, "3", "--acceptance", acceptance("wrong", wrong))
    fleet.hub.rollout("iris", "3", "dev1")
    wait_for("version 3 refused", lambda: "iris/3" in sync_status(device)["rejected"])
    assert "differs from the expected values" in sync_status(device)["rejected"]["iris/3"]
    assert _version(device.url) == "1"
    failed = wait_for(
        "the acceptance failure",
        lambda: [e for e in kinds(fleet.hub.events("dev1"), "update_failed")
                 if e["data"]["version"] == "3"],
    )  # fmt: skip
    assert failed[0]["data"]["stage"] == "acceptance"

    # Version 4 passes its acceptance input and replaces 1: the new output is served.
    v4 = _write(tmp, "v4", _declaration("sample", label=True))
    fleet.hub.publish("iris", v4, "4", "--acceptance", acceptance("right", probabilities))
    fleet.hub.rollout("iris", "4", "dev1")
    wait_for("pipeline version 4 serving", lambda: _version(device.url) == "4")
    answer = _infer(device.url)
    out = {o["name"]: o["data"] for o in answer["outputs"]}
    best = max(range(3), key=lambda i: out["probabilities"][i])
    assert out["species"] == [LABELS[best]]

    def activated() -> list[dict[str, Any]]:
        events = kinds(fleet.hub.events("dev1"), "activated")
        return [e for e in events if e["data"]["model"] == "iris"]

    assert [e["data"]["version"] for e in wait_for("the activations", activated)] == ["1", "4"]
    assert (stored / "ACTIVE").read_text().split() == ["4", "1"]


def test_the_hub_refuses_a_broken_declaration(fleet: Fleet) -> None:
    bad = _declaration("sample")
    bad["nodes"] = [{"name": "m", "step": {"type": "no_such_step"}, "inputs": {"x": "request.x"}}]
    path = _write(fleet.tmp, "bad", bad)
    try:
        fleet.hub.publish("iris", path, "1")
    except AssertionError as exc:
        assert "no_such_step" in str(exc)
    else:
        raise AssertionError("a broken declaration was published")


def _picker(on_error: str) -> dict[str, Any]:
    """The sample model on x, and field "q" of the JSON text t (a failure on a text that is
    not JSON with "fail", no rows with "empty")."""
    return {
        "kind": "pipeline",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "t", "datatype": "BYTES", "shape": [1]},
        ],
        "nodes": [
            {"name": "m", "model": "sample", "inputs": {"input": "request.x"}},
            {"name": "j", "step": {"type": "json_field", "path": "q", "on_error": on_error},
             "inputs": {"text": "request.t"}},
        ],
        "outputs": [{"name": "p", "source": "m.probabilities"}, {"name": "q", "source": "j.value"}],
    }  # fmt: skip


def test_a_pipeline_version_that_fails_in_service_is_rolled_back(fleet: Fleet) -> None:
    env = {"APPLIANCE_HUB__MIN_REQUESTS": "4", "APPLIANCE_HUB__ERROR_WINDOW_S": "120"}
    device = fleet.start_device("dev1", fleet.store("dev1"), env)
    fleet.hub.publish("iris", _write(fleet.tmp, "p1", _picker("empty")), "1")
    fleet.hub.rollout("iris", "1", "dev1")
    wait_for("pipeline version 1 serving", lambda: _version(device.url) == "1")
    fleet.hub.publish("iris", _write(fleet.tmp, "p2", _picker("fail")), "2")
    fleet.hub.rollout("iris", "2", "dev1")
    wait_for("pipeline version 2 serving", lambda: _version(device.url) == "2")
    body = {"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": SAMPLE_INPUT[0]},
        {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["not json"]},
    ]}  # fmt: skip
    url = f"http://{device.url}/v2/models/iris/infer"
    for _ in range(6):  # version 2 fails on these; version 1 answers with no q
        try:
            http_json(url, "POST", body)
        except urllib.error.HTTPError as exc:
            assert exc.code == 500
    wait_for("the rollback to version 1", lambda: _version(device.url) == "1")
    answer = http_json(url, "POST", body)
    assert answer["model_version"] == "1"
    assert {o["name"]: o["shape"] for o in answer["outputs"]}["q"][0] == 0
    status = sync_status(device)
    assert "error rate" in status["rejected"]["iris/2"]
    rolled = wait_for("the rollback event", lambda: kinds(fleet.hub.events("dev1"), "rolled_back"))
    assert rolled[0]["data"]["from"] == "2" and rolled[0]["data"]["to"] == "1"
    assert (fleet.tmp / "store-dev1" / "iris" / "ACTIVE").read_text().split()[0] == "1"
