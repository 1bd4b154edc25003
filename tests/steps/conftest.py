from __future__ import annotations

import pytest

from appliance import steps
from tests.support.steps import GateStep


@pytest.fixture
def test_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test steps of tests/support/steps.py, registered like built-ins for one test."""
    monkeypatch.setitem(steps._STEPS, "gate", "tests.support.steps:GateStep")
    monkeypatch.setitem(steps._STEPS, "boom", "tests.support.steps:BoomStep")
    GateStep.entered.clear()
    GateStep.release.clear()
