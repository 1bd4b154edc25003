"""The frozen binary is built for the machine it claims: its ELF headers, what it reports about
itself, and the glibc its bundled files need.

Runs with APPLIANCE_BINARY, like test_binary.py. APPLIANCE_BINARY_ARCH is the architecture
expected (default: this machine's; `make binary-arm64-test` sets aarch64 and runs the binary
under QEMU); APPLIANCE_BINARY_MAX_GLIBC, when set, is the newest glibc the bundle may need.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.packaging.test_binary import BARE_ENV, BINARY

pytestmark = pytest.mark.skipif(not BINARY, reason="APPLIANCE_BINARY is not set")
ROOT = Path(__file__).resolve().parents[2]
ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
EXPECTED = ALIASES.get(
    os.environ.get("APPLIANCE_BINARY_ARCH", "") or platform.machine(),
    os.environ.get("APPLIANCE_BINARY_ARCH", "") or platform.machine(),
)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "build" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_glibc: Any = _load("check_glibc")


def bundle() -> Path:
    """The one-folder bundle, or the one-file binary itself."""
    assert BINARY
    binary = Path(BINARY).resolve()
    return binary.parent if (binary.parent / "_internal").is_dir() else binary


def test_every_bundled_elf_file_is_for_the_expected_architecture() -> None:
    assert BINARY
    assert check_glibc.elf_machine(Path(BINARY)) == EXPECTED
    files = check_glibc.elf_files(bundle())
    wrong = {p.name: check_glibc.elf_machine(p) for p in files}
    wrong = {name: m for name, m in wrong.items() if m != EXPECTED}
    assert not wrong, f"not {EXPECTED}: {wrong}"


def test_the_binary_reports_the_architecture_it_runs_as(tmp_path: Path) -> None:
    assert BINARY
    proc = subprocess.run(
        [str(Path(BINARY).resolve()), "--version"], capture_output=True, text=True,
        env=BARE_ENV, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f" on linux {EXPECTED}\n" in proc.stdout, proc.stdout


@pytest.mark.skipif(
    not os.environ.get("APPLIANCE_BINARY_MAX_GLIBC"), reason="APPLIANCE_BINARY_MAX_GLIBC not set"
)
def test_no_bundled_file_needs_a_newer_glibc(capsys: pytest.CaptureFixture[str]) -> None:
    limit = os.environ["APPLIANCE_BINARY_MAX_GLIBC"]
    problems = check_glibc.check_bundle(bundle(), fail_above=limit)
    assert problems == "", problems
    assert f"(limit {limit})" in capsys.readouterr().out
