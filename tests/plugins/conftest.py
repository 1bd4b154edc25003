"""Plugin directories as a device has them: the example plugin installed by pip --target, and
the test plugins of site/ (installed layout: module + .dist-info), copied so a test may change
their permissions. Whatever a test put on sys.path is taken off again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import backends, plugins, steps
from appliance.steps import base as steps_base

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "plugins" / "appliance-plugin-example"
SITE = Path(__file__).resolve().parent / "site"
#: The modules the plugin directories hold.
MODULES = ("appliance_plugin_example", "appliance_plugin_broken", "appliance_plugin_faulty")


def pip_install(source: Path, work: Path, *args: str, python: str | None = None) -> None:
    """`pip [--python PYTHON] install ARGS` of a copy of `source` in `work` (the build writes
    into its source folder), offline."""
    copy = work / f"src-{source.name}"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    where = ["--python", python] if python else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *where, "install", "-q", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", *args, str(copy)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, `pip install --target DIR` as the README says."""
    work = tmp_path_factory.mktemp("example-plugin")
    target = work / "plugins"
    pip_install(EXAMPLE, work, "--target", str(target))
    return target


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    """The broken and the faulty plugins, installed."""
    target = tmp_path / "test-plugins"
    shutil.copytree(SITE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(autouse=True)
def _clean_path() -> Iterator[None]:
    """Each test starts with no plugin directory; the modules it imported are forgotten."""
    path = list(sys.path)
    yield
    plugins.forget_dirs(plugins.active_dirs())
    sys.path[:] = path
    for name in list(sys.modules):
        if name.split(".")[0] in MODULES:
            del sys.modules[name]
    for cls in [c for c in backends.PLUGIN_OF if c.__module__.split(".")[0] in MODULES]:
        del backends.PLUGIN_OF[cls]
    for type_ in ("clip", "explode", "broken_step"):
        steps_base.PLUGIN_OF.pop(type_, None)
    assert "clip" not in steps.types()
