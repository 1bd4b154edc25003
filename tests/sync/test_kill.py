"""SIGKILL of the appliance at random points of an update (download, verification, storing,
activation): the store's active model is always a whole old or a whole new version, and the
next start resumes or cleans up and converges to the assigned version.

SYNC_KILL_TRIALS sets the number of trials (CI default 8; run e.g. 40 locally)."""

from __future__ import annotations

import collections
import functools
import os
import random
import shutil
import signal
import time
from pathlib import Path

from appliance.manifest import MANIFEST_NAME, Manifest, sha256_file
from appliance.registry import Registry
from tests.conftest import ServerProcess, stop_server_process
from tests.sync.conftest import Fleet, serving_version, sync_status, wait_for

TRIALS = int(os.environ.get("SYNC_KILL_TRIALS", "8"))


def check_store(root: Path) -> str:
    """The active version of `sample`, after checking every visible version is whole."""
    registry = Registry(root)
    for version in registry.versions("sample"):
        mv = registry.get("sample", version)
        digest, size = sha256_file(mv.file)
        assert (digest, size) == (mv.manifest.sha256, mv.manifest.size), f"version {version}"
    model_dir = root / "sample"
    for p in model_dir.iterdir():  # only whole versions are visible: a version dir has a manifest
        if p.is_dir() and not p.name.startswith("."):
            Manifest.read(p / MANIFEST_NAME)
    active = registry.active("sample")
    digest, _ = sha256_file(active.file)
    assert digest == active.manifest.sha256
    return active.manifest.version


def _serves(device: ServerProcess, version: str) -> bool:
    return serving_version(device) == version


def _late(device: ServerProcess) -> str | None:
    state = str(sync_status(device)["state"])
    return state if state in ("verifying", "storing", "activating", "idle") else None


def _idle(device: ServerProcess) -> bool:
    return bool(sync_status(device)["state"] == "idle")


def test_sigkill_during_an_update_never_leaves_a_mixed_version(
    fleet: Fleet, variants: dict[str, Path]
) -> None:
    hub, proxy = fleet.hub, fleet.proxy
    big = variants["big"]
    hub.publish("sample", big, "2", *fleet.manifest_args)
    hub.rollout("sample", "2", "dev1")
    new_sha, _ = sha256_file(big)
    proxy.bytes_per_s = 4 * 1024 * 1024  # a 4 MiB download takes about a second
    seed = fleet.store("seed")
    rng = random.Random(int(os.environ.get("SYNC_KILL_SEED", "3")))
    phases: collections.Counter[str] = collections.Counter()
    active_at_kill: collections.Counter[str] = collections.Counter()
    corrupt = resumed = 0
    store = fleet.tmp / "store-trial"
    for trial in range(TRIALS):
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(seed, store, symlinks=True)
        start = len(proxy.requests)
        device = fleet.start_device("dev1", store)
        if trial % 2 == 0:  # anywhere in the update
            time.sleep(rng.uniform(0.0, 1.3))
        else:  # in the short steps after the download: verifying, storing, activating
            wait_for("the download's end", functools.partial(_late, device), every=0.002)
            time.sleep(rng.uniform(0.0, 0.25))
        try:
            state = sync_status(device)["state"]  # what it was doing when the kill came
        except OSError:
            state = "unknown"
        device.proc.send_signal(signal.SIGKILL)
        device.proc.wait()
        fleet.devices.remove(device)
        phases[state] += 1
        try:
            active_at_kill[check_store(store)] += 1
        except AssertionError:
            corrupt += 1
            raise
        device = fleet.start_device("dev1", store)
        wait_for(f"trial {trial}: version 2", functools.partial(_serves, device, "2"), 120)
        wait_for("the update to finish", functools.partial(_idle, device))
        stop_server_process(device)
        fleet.devices.remove(device)
        assert check_store(store) == "2"
        resumed += any(" bytes=" in r for r in proxy.requests[start:])
        leftovers = [p.name for p in (store / "sample").iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers
        assert not any((store / ".sync" / "downloads").glob(f"{new_sha}*"))
    print(
        f"SIGKILL trials: {TRIALS}, corrupt or mixed activations: {corrupt}, active at kill: "
        f"{dict(active_at_kill)}, state at kill: {dict(phases)}, downloads resumed: {resumed}"
    )
    assert corrupt == 0
