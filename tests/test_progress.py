"""Progress of long transfers: the throttle of plain lines, and the lines `appliance models add`
and `appliance hub publish --url` write when their stderr is not a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.progress import MIN_BYTES, Progress, Throttle, describe
from tests.conftest import ROOT
from tests.sync.conftest import Hub, variant

LINE = re.compile(r"(\d+) % \(")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_says_every_tenth_at_most_once_a_second_or_every_5_s() -> None:
    clock = Clock()
    t = Throttle(1000, clock=clock)
    assert not t.due(50)  # 5 %, no time passed
    clock.now += 0.5
    assert not t.due(150)  # 15 % but under a second since the start
    clock.now += 0.6
    assert t.due(160)  # 16 %, a second on
    clock.now += 1.0
    assert not t.due(200)  # only 4 % more
    clock.now += 4.5
    assert t.due(210)  # 5 s since the last line, bytes moved
    clock.now += 10
    assert not t.due(210)  # stalled: nothing new to say
    assert t.due(1000)  # the end always
    assert not t.due(1000)  # once


def test_progress_writes_plain_lines_off_a_terminal_and_nothing_for_small_files() -> None:
    out = io.StringIO()
    with Progress("copying m.onnx", 100 << 20, out, min_bytes=1) as p:
        for i in range(1, 101):
            p.throttle.clock = lambda i=i: p.throttle.start + i * 0.2  # type: ignore[misc]
            p(i << 20)
    lines = out.getvalue().splitlines()
    percents = [int(m.group(1)) for m in map(LINE.search, lines) if m]
    assert percents[-1] == 100 and percents == sorted(percents)
    assert 5 <= len(lines) <= 12, lines
    assert lines[-1].startswith("copying m.onnx: 100 % (100.0 MiB of 100.0 MiB, ")
    quiet = io.StringIO()
    with Progress("copying small", MIN_BYTES - 1, quiet) as p:
        p(MIN_BYTES - 1)
    assert quiet.getvalue() == ""
    assert describe("x", 512, None, 1.0) == "x: 512 B (512 B/s)"


@pytest.fixture(scope="module")
def big_model(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big") / "big.onnx"
    return variant(samples / "sample.onnx", out, 1.0, MIN_BYTES + (4 << 20))


def _percents(stderr: str, what: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(rf"{re.escape(what)}: (\d+) % \(", stderr)]


def test_models_add_of_a_large_file_reports_its_copy(big_model: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "add", "big", str(big_model),
         "--models", str(tmp_path / "store")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    percents = _percents(proc.stderr, "copying big.onnx")
    assert percents and percents[-1] == 100, proc.stderr
    assert "added big version 1" in proc.stdout


def test_hub_publish_reports_its_upload_and_its_copy(big_model: Path, tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub")
    hub.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "appliance", "hub", "publish", "big", str(big_model),
             "--version", "1", "--data", str(hub.data), "--url", hub.url],
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        )  # fmt: skip
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stderr
    percents = _percents(proc.stderr, "uploading big.onnx")
    assert percents and percents[-1] == 100, proc.stderr
    assert "published: big/1/model.onnx" in proc.stdout
    # On the data directory (no --url): the copy into the artifact store.
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "hub", "publish", "big", str(big_model),
         "--version", "2", "--data", str(hub.data)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _percents(proc.stderr, "copying big.onnx")[-1] == 100, proc.stderr
