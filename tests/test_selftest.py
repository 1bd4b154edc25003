"""`appliance selftest` and `--version`, and that the bundled self-test data is reproducible."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import selftest
from appliance.version import version_text

ROOT = Path(__file__).resolve().parent.parent


def test_selftest_passes_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "selftest"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selftest ok: sample model on cpu")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"probabilities": [0.5, 0.25, 0.25]}, "wrong answer: probabilities"),
        ({"label": [2]}, "wrong answer: label"),
    ],
)
def test_selftest_fails_on_a_wrong_answer(tmp_path, monkeypatch, change, fragment) -> None:
    data = tmp_path / "data"
    shutil.copytree(selftest.data_dir(), data)
    expected = json.loads((data / "sample.expected.json").read_text())
    (data / "sample.expected.json").write_text(json.dumps({**expected, **change}))
    monkeypatch.setattr(selftest, "data_dir", lambda: data)
    ok, reason = selftest.run_selftest(30)
    assert not ok and fragment in reason


def test_selftest_fails_on_a_broken_model(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(selftest.data_dir(), data)
    (data / "sample.onnx").write_bytes(b"not a model")
    monkeypatch.setattr(selftest, "data_dir", lambda: data)
    ok, reason = selftest.run_selftest(30)
    assert not ok and "did not load" in reason


def test_bundled_data_is_what_the_build_script_makes(tmp_path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_sample_models.py"),
         "--out", str(tmp_path / "samples"), "--selftest-data", str(tmp_path / "data")],
        check=True, capture_output=True,
    )  # fmt: skip
    bundled = selftest.data_dir()
    assert (tmp_path / "data" / "sample.onnx").read_bytes() == (
        bundled / "sample.onnx"
    ).read_bytes()
    made = json.loads((tmp_path / "data" / "sample.expected.json").read_text())
    shipped = json.loads((bundled / "sample.expected.json").read_text())
    assert made["input"] == shipped["input"] and made["label"] == shipped["label"]
    assert made["probabilities"] == pytest.approx(shipped["probabilities"], rel=1e-4)


def test_version_names_revision_and_backends() -> None:
    text = version_text()
    first = text.splitlines()[0]
    assert first.startswith("appliance ") and "(git " in first
    assert "onnx: onnxruntime " in text and "devices: " in text and "cpu" in text
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == text
