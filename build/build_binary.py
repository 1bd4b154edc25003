"""Build the `appliance` binary with PyInstaller, on and for this machine (no cross-compiling).

    python build/build_binary.py [--mode onedir|onefile|both] [--backends onnx]

A clean virtual environment (.venv-build) holds only the runtime dependencies, the chosen
backends' extras and PyInstaller, so nothing from a development environment (torch, onnx,
tritonclient...) can slip into the bundle. The git revision is baked in. Every binary built runs
`--version` and `selftest` before the build counts as done. Output: dist/appliance/ (one folder,
the default for devices) and dist/appliance-onefile.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BUILDINFO = ROOT / "appliance" / "_buildinfo.py"
DIST = ROOT / "dist"
BINARIES = {"onedir": DIST / "appliance" / "appliance", "onefile": DIST / "appliance-onefile"}


def _run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def requirements(backends: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    extras = project["optional-dependencies"]
    for b in backends:
        if b not in extras:
            raise SystemExit(f"no extra named {b!r} in pyproject.toml")
        reqs += extras[b]
    return [*reqs, "pyinstaller>=6.3"]


def build_venv(path: Path, reqs: list[str]) -> Path:
    """A venv with exactly `reqs`; rebuilt only when the list changes."""
    stamp = path / ".requirements"
    wanted = "\n".join(sorted(reqs))
    python = path / "bin" / "python"
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(path, ignore_errors=True)
        venv.create(path, with_pip=True)
        _run([str(python), "-m", "pip", "install", "--quiet", *reqs])
        stamp.write_text(wanted)
    return python


def git_revision() -> str:
    if os.environ.get("APPLIANCE_GIT_REVISION"):  # a build from a copy without .git (arm64)
        return os.environ["APPLIANCE_GIT_REVISION"]
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def smoke(binary: Path) -> None:
    """The binary alone must report its build and pass its self-test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "PYTHON"))}
    _run([str(binary), "--version"], env=env)
    _run([str(binary), "selftest"], env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=["onedir", "onefile", "both"], default="onedir")
    ap.add_argument("--backends", default="onnx", help="comma-separated extras to bundle")
    ap.add_argument("--venv", default=str(ROOT / ".venv-build"), help="build environment")
    ap.add_argument("--no-smoke", action="store_true", help="skip --version and selftest")
    ap.add_argument(
        "--prepared-venv",
        action="store_true",
        help="use --venv as it is (e.g. with JetPack's onnxruntime-gpu; build/build_arm64.py)",
    )
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if args.prepared_venv:
        python = Path(args.venv) / "bin" / "python"
    else:
        python = build_venv(Path(args.venv), requirements(backends))
    modes = ["onedir", "onefile"] if args.mode == "both" else [args.mode]
    revision = git_revision()
    BUILDINFO.write_text(
        f'"""Written by build/build_binary.py."""\n\nGIT_REVISION = {revision!r}\n'
    )
    try:
        for mode in modes:
            env = {
                **os.environ,
                "APPLIANCE_ONEFILE": "1" if mode == "onefile" else "0",
                "APPLIANCE_BACKENDS": ",".join(backends),
            }
            _run(
                [str(python), "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
                 "--distpath", str(DIST), "--workpath", str(ROOT / "build" / "pyinstaller" / mode),
                 str(ROOT / "packaging" / "appliance.spec")],
                env=env,
            )  # fmt: skip
    finally:
        BUILDINFO.unlink(missing_ok=True)
    for mode in modes:
        binary = BINARIES[mode]
        digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:16]
        print(f"built {binary} ({binary.stat().st_size / 2**20:.1f} MiB, sha256 {digest}…)")
        if not args.no_smoke:
            smoke(binary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
