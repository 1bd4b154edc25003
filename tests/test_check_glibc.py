"""build/check_glibc.py on real ELF files of this machine: the glibc limit, a bundled libc, the
architecture in the header."""

from __future__ import annotations

import _ctypes
import importlib.util
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils not installed")


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("check_glibc", ROOT / "build" / "check_glibc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_glibc"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_glibc = _load()


def loaded_libc() -> Path:
    """The libc this process runs with (from its memory map)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith("libc.so"):
            return Path(path)
    raise AssertionError("no libc in /proc/self/maps")


def bundle_with(tmp_path: Path, *files: Path) -> Path:
    bundle = tmp_path / "appliance"
    (bundle / "_internal").mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, bundle / "_internal" / f.name)
    (bundle / "_internal" / "README.txt").write_text("not an ELF file")
    return bundle


def test_elf_machine_reads_the_header() -> None:
    machine = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine(), platform.machine())
    assert check_glibc.elf_machine(Path(sys.executable).resolve()) == machine
    assert check_glibc.elf_machine(Path(__file__)) is None


def test_the_limit_decides_and_names_the_file(tmp_path: Path, capsys) -> None:
    ext = Path(_ctypes.__file__)
    bundle = bundle_with(tmp_path, ext)
    assert [p.name for p in check_glibc.elf_files(bundle)] == [ext.name]
    needed = check_glibc.needs(bundle / "_internal" / ext.name, check_glibc.find_objdump())
    assert check_glibc.version_key(needed.glibc) >= (2, 2) and needed.glibc_symbols
    assert check_glibc.check_bundle(bundle, fail_above="99.0") == ""
    problems = check_glibc.check_bundle(bundle, fail_above="2.0", report="2.0")
    assert f"_internal/{ext.name}: needs GLIBC_{needed.glibc}" in problems
    out = capsys.readouterr().out
    assert f"newest glibc symbol needed: GLIBC_{needed.glibc} (limit 2.0)" in out
    assert "stays within glibc 2.0 (Jetson, Ubuntu 22.04): no" in out


def test_a_bundled_libc_is_an_error(tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, loaded_libc())
    problems = check_glibc.check_bundle(bundle, fail_above="99.0")
    assert "glibc itself is bundled" in problems


def test_main_exit_status(tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, Path(_ctypes.__file__))
    assert check_glibc.main([str(bundle), "--max", "99.0"]) == 0
    assert check_glibc.main([str(bundle), "--max", "2.0"]) == 1
