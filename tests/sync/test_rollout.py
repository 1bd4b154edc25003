"""A rollout published on a real hub reaches a real appliance: verified, activated, reported."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from appliance.registry import Registry
from tests.sync.conftest import (
    SAMPLE_INPUT,
    Fleet,
    http_json,
    infer,
    kinds,
    serving_version,
    sync_status,
    wait_for,
)


def test_rollout_reaches_the_device_and_is_reported(
    fleet: Fleet, variants: dict[str, Path]
) -> None:
    device = fleet.start_device("dev1", fleet.store("dev1"))
    assert serving_version(device) == "1"
    before = infer(device)["outputs"]

    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:  # inference answered throughout the switch, none failing
        while not stop.is_set():
            try:
                infer(device)
                answered[0] += 1
            except Exception as exc:
                failures.append(repr(exc))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        fleet.hub.publish(
            "sample", variants["v2"], "2", "--manifest", str(fleet.tmp / "manifest.json")
        )
        fleet.hub.rollout("sample", "2", "dev1")
        wait_for("version 2 serving", lambda: serving_version(device) == "2")
        wait_for(
            "the hub to show version 2",
            lambda: fleet.hub.device("dev1")["active"] == {"sample": "2"},
        )
    finally:
        stop.set()
        worker.join()
    assert failures == []
    assert answered[0] > 0
    assert infer(device)["outputs"] != before  # the new weights answer
    status = sync_status(device)
    assert status["active"] == {"sample": "2"} and status["pending"] == {}
    assert status["tuf"] == "ok"
    events = wait_for("the activated event", lambda: kinds(fleet.hub.events("dev1"), "activated"))
    assert events[0]["data"] == {"model": "sample", "version": "2", "previous": "1"}

    def polls() -> list[int]:
        return [code for path, code in fleet.proxy.statuses if path.endswith("/assignments")]

    # Unchanged assignments cost a 304: on a fast machine the rollout may land within a few
    # polls, so wait for polls after the last change rather than count what happened so far.
    wait_for("polls of unchanged assignments", lambda: polls().count(304) > polls().count(200))
    seen = polls()
    assert seen.count(304) > seen.count(200) > 0
    since_change = seen[len(seen) - seen[::-1].index(200) :]
    assert set(since_change) <= {304}  # every poll after the last change
    store = fleet.tmp / "store-dev1" / "sample"
    assert (store / "ACTIVE").read_text().split() == ["2", "1"]  # the previous version is kept


def test_a_model_with_a_100_character_name_is_published_and_served(
    fleet: Fleet, variants: dict[str, Path]
) -> None:
    """The hub takes every name the device serves (appliance/names.py): once it took 64 only."""
    name = "factory-line-7.defect-detector_" + "v" * 69
    assert len(name) == 100
    device = fleet.start_device("dev1", fleet.store("dev1"))
    fleet.hub.publish(name, variants["v2"], "1", *fleet.manifest_args)
    fleet.hub.rollout(name, "1", "dev1")
    wait_for("the model serving", lambda: sync_status(device)["active"].get(name) == "1")
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                        "data": SAMPLE_INPUT[0]}]}  # fmt: skip
    out = http_json(f"http://{device.url}/v2/models/{name}/infer", "POST", body)
    assert (out["model_name"], out["model_version"]) == (name, "1")
    assert out["outputs"] != infer(device)["outputs"]  # v2's weights, not the sample's
    assert (fleet.tmp / "store-dev1" / name / "ACTIVE").read_text().split() == ["1"]


def test_declared_steps_travel_with_the_rollout(fleet: Fleet, variants: dict[str, Path]) -> None:
    """The manifest's processing (a legacy postprocess, `steps`) reaches the device's store and
    serves there: once the agent passed postprocess where preprocess belonged."""
    device = fleet.start_device("dev1", fleet.store("dev1"))
    post = {"type": "classification", "output": "probabilities", "labels": ["a", "b", "c"]}
    steps = {"output": [{"type": "classification", "output": "probabilities", "name": "best"}]}
    published: list[tuple[str, str, dict[str, Any]]] = [
        ("sample", "2", {"postprocess": post}),
        ("stepped", "1", {"steps": steps}),
    ]
    for name, version, processing in published:
        manifest = fleet.tmp / f"manifest-{name}.json"
        manifest.write_text(json.dumps({**fleet.sample_manifest(), **processing}))
        fleet.hub.publish(name, variants["v2"], version, "--manifest", str(manifest))
        fleet.hub.rollout(name, version, "dev1")
    wanted = {"sample": "2", "stepped": "1"}
    wait_for("both serving", lambda: sync_status(device)["active"] == wanted)
    store = Registry(fleet.tmp / "store-dev1")
    got = store.get("sample", "2").manifest
    assert (got.preprocess, got.postprocess, got.steps) == (None, post, None)
    got = store.get("stepped", "1").manifest
    assert (got.preprocess, got.postprocess, got.steps) == (None, None, steps)
    for name, output in [("sample", "top_k_labels"), ("stepped", "top_k_indices")]:
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                            "data": SAMPLE_INPUT[0]}], "outputs": [{"name": output}],
                "parameters": {"top_k": 1}}  # fmt: skip
        out = http_json(f"http://{device.url}/v2/models/{name}/infer", "POST", body)
        assert [o["name"] for o in out["outputs"]] == [output]
    meta = http_json(f"http://{device.url}/v2/models/stepped")
    assert meta["parameters"]["steps"]["output"][0]["name"] == "best"


def test_a_dropped_connection_resumes_where_it_stopped(
    fleet: Fleet, variants: dict[str, Path]
) -> None:
    """Every target response is cut after 1 MiB: the 4 MiB model still arrives, in pieces, each
    request asking only for the bytes still missing."""
    device = fleet.start_device("dev1", fleet.store("dev1"))
    fleet.proxy.cut_after = 1024 * 1024
    fleet.hub.publish("sample", variants["big"], "2", *fleet.manifest_args)
    fleet.hub.rollout("sample", "2", "dev1")
    wait_for("version 2 serving", lambda: serving_version(device) == "2", 120)
    ranges = [r for r in fleet.proxy.requests if r.startswith("GET /tuf/targets/")]
    size = variants["big"].stat().st_size
    assert len(ranges) == -(-size // (1024 * 1024))  # one request per MiB, none repeated
    assert all(f"bytes={i * 1024 * 1024}-" in r for i, r in enumerate(ranges) if i)
