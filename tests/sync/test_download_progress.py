"""A device's download in progress: /v2/sync reports bytes done of the total while it runs, and
the log says how far it got at a bounded rate (every 10 %, at most once a second, or 5 s)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from appliance.manifest import sha256_file
from tests.sync.conftest import Fleet, serving_version, sync_status, wait_for


def test_sync_state_and_log_show_download_progress(fleet: Fleet, variants: dict[str, Path]) -> None:
    hub, proxy = fleet.hub, fleet.proxy
    big = variants["big"]
    _, size = sha256_file(big)
    hub.publish("sample", big, "2", *fleet.manifest_args)
    hub.rollout("sample", "2", "dev1")
    proxy.bytes_per_s = 1024 * 1024  # about 4 s for the 4 MiB file
    device = fleet.start_device("dev1", fleet.store("dev1"))
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and serving_version(device) != "2":
        p = sync_status(device)["progress"].get("sample")
        if p and "bytes" in p:
            assert p["version"] == "2"
            seen.append((p["bytes"], p["total"]))
        time.sleep(0.1)
    wait_for("version 2", lambda: serving_version(device) == "2")
    assert sync_status(device)["progress"] == {}  # gone once the update is over
    partial = [done for done, total in seen if 0 < done < total]
    assert len(partial) >= 3, seen
    assert partial == sorted(partial) and all(total == size for _, total in seen)

    log = "".join(device.lines)
    percents = [int(p) for p in re.findall(r"download sample 2: (\d+) % \(", log)]
    assert percents and percents[-1] == 100, log[-3000:]
    assert percents == sorted(percents)
    # About 4 s at 10 % steps but at most one line a second: a handful, never one per chunk.
    assert 3 <= len(percents) <= 11, percents
