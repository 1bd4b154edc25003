#!/usr/bin/env python3
"""Build dist/appliance_<version>_<arch>.deb from a one-folder PyInstaller bundle.

    python build/make_deb.py --bundle dist/appliance [--out dist] [--arch arm64] [--depends D]

The package holds the bundle in /opt/appliance (the one-folder build: nothing is unpacked to a
temporary directory at every start, which the service's ProtectSystem=strict would complicate),
a /usr/bin/appliance symlink, the systemd unit and a default config (a conffile), plus the
maintainer scripts in packaging/deb that create the `appliance` user and enable, but do not
start, the service. Nothing Python is a dependency: the bundle brings its own interpreter.

Only dpkg-deb is used (no debhelper, no network). Before building, every file is checked for
paths of the build machine (the checkout, the bundle, the staging directory), because a package
that mentions them works only on the machine that built it, and leaks its layout.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"

PACKAGE = "appliance"
INSTALL_DIR = "opt/appliance"
EXECUTABLE = "appliance"  # the bundle's entry point, relative to the bundle directory
LINK = "usr/bin/appliance"
UNIT = "lib/systemd/system/appliance.service"
CONFIG = "etc/appliance/config.toml"
SCRIPTS = ("postinst", "prerm", "postrm")
DEPENDS = "adduser"
MAINTAINER = "appliance maintainers <maintainers@appliance.invalid>"
DESCRIPTION = """\
edge inference server (KServe v2 HTTP API)
 One process that serves quantized models (ONNX) to the machines around it
 over the KServe Open Inference Protocol v2, and keeps working offline.
 .
 Self-contained: a PyInstaller build with its own Python in /opt/appliance.
 Installs the systemd service appliance.service, enabled but not started:
 run `systemctl start appliance` after installing.
 Config: /etc/appliance/config.toml; models: /var/lib/appliance/models."""


class DebError(Exception):
    """A problem with the inputs or the result; main() prints it and exits 1."""


def package_version() -> str:
    """appliance.__version__ of this checkout (the bundle's own is checked by `_check_runs`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import appliance

    return appliance.__version__


def debian_version(version: str) -> str:
    """A PEP 440 version as a Debian one: pre-releases sort before the release with '~'."""
    v = re.sub(r"(?<=\d)[.-]?(a|b|rc|dev)(?=\d)", r"~\1", version)
    if not re.fullmatch(r"[0-9][A-Za-z0-9.+~]*", v):
        raise DebError(f"version {version!r} cannot be a Debian version")
    return v


def host_arch() -> str:
    try:
        out = subprocess.run(
            ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DebError(f"cannot ask dpkg for the architecture: {exc}") from None
    return out.stdout.strip()


def _bundle_files(bundle: Path) -> list[str]:
    """Every path in the bundle, relative, with '/' after directories; checks symlinks stay in."""
    out = []
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if path.is_symlink():
            target = str(path.readlink())
            inside = (path.parent / target).resolve()
            if Path(target).is_absolute() or not inside.is_relative_to(bundle.resolve()):
                raise DebError(f"{path}: symlink to {target} leaves the bundle")
            out.append(rel)
        elif path.is_dir():
            out.append(rel + "/")
        elif path.is_file():
            out.append(rel)
        else:
            raise DebError(f"{path}: not a file, directory or symlink")
    return out


def expected_paths(bundle_files: list[str]) -> list[str]:
    """The package's file list as `dpkg-deb -c` names it (./path, directories with '/')."""
    paths = {"./"}
    for rel in (LINK, UNIT, CONFIG, *(f"{INSTALL_DIR}/{f}" for f in bundle_files)):
        parts = rel.rstrip("/").split("/")
        for i in range(1, len(parts)):
            paths.add("./" + "/".join(parts[:i]) + "/")
        paths.add("./" + rel)
    paths.add(f"./{INSTALL_DIR}/")
    return sorted(paths)


def control(
    version: str, arch: str, maintainer: str, installed_kib: int, depends: str = DEPENDS
) -> str:
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        f"Architecture: {arch}\n"
        f"Maintainer: {maintainer}\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: {depends}\n"
        "Section: misc\n"
        "Priority: optional\n"
        f"Description: {DESCRIPTION}\n"
    )


def _normalize_modes(tree: Path) -> None:
    """0755 directories and executables, 0644 the rest: no build-machine umask or setuid bits."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(0o755 if path.is_dir() or mode & 0o111 else 0o644)


def _installed_kib(tree: Path) -> int:
    total = 0
    for path in tree.rglob("*"):
        if path.is_symlink() or path.is_dir():
            total += 1
        elif path.is_file():
            total += math.ceil(path.stat().st_size / 1024)
    return total


def stage(
    bundle: Path, staging: Path, version: str, arch: str, maintainer: str, depends: str = DEPENDS
) -> None:
    """Lay out the package tree (data and DEBIAN/) in `staging`."""
    shutil.copytree(bundle, staging / INSTALL_DIR, symlinks=True)
    (staging / LINK).parent.mkdir(parents=True)
    (staging / LINK).symlink_to(f"/{INSTALL_DIR}/{EXECUTABLE}")
    for src, dest in ((PACKAGING / "appliance.service", UNIT), (PACKAGING / "config.toml", CONFIG)):
        (staging / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, staging / dest)
    _normalize_modes(staging)
    installed = _installed_kib(staging)
    debian = staging / "DEBIAN"
    debian.mkdir(mode=0o755)
    (debian / "control").write_text(control(version, arch, maintainer, installed, depends))
    (debian / "conffiles").write_text(f"/{CONFIG}\n")
    for name in SCRIPTS:
        shutil.copyfile(PACKAGING / "deb" / name, debian / name)
        (debian / name).chmod(0o755)
    for name in ("control", "conffiles"):
        (debian / name).chmod(0o644)


def find_leaks(tree: Path, needles: list[str]) -> list[str]:
    """Files under `tree` whose bytes contain one of `needles` (build-machine paths)."""
    found = []
    encoded = [n.encode() for n in needles]
    for path in sorted(tree.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.stat().st_size == 0:
            continue
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for needle, raw in zip(needles, encoded, strict=True):
                if data.find(raw) != -1:
                    found.append(f"{path.relative_to(tree).as_posix()}: contains {needle}")
    return found


def _leak_needles(*paths: Path) -> list[str]:
    """The absolute build paths worth looking for (not '/' or '/tmp': too common to mean us)."""
    out: list[str] = []
    for p in paths:
        for s in {str(p), str(p.resolve())}:
            if len(Path(s).parts) >= 3 and s not in out:
                out.append(s)
    return out


def _check_runs(bundle: Path, version: str) -> None:
    """The bundle's executable starts and reports the (upstream) version being packaged."""
    exe = bundle / EXECUTABLE
    try:
        out = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DebError(f"{exe} --version failed: {exc}") from None
    text = out.stdout + out.stderr
    if out.returncode != 0 or version not in text.split():
        raise DebError(
            f"{exe} --version exited {out.returncode} and printed {text.strip()!r}; "
            f"expected version {version}"
        )


def verify(deb: Path, bundle_files: list[str]) -> None:
    """The built package holds exactly the expected paths, owned by root, with the symlink."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            members = list(tar)
    if proc.returncode != 0:
        raise DebError(f"dpkg-deb --fsys-tarfile {deb} failed")
    names = sorted(m.name + ("/" if m.isdir() and m.name != "./" else "") for m in members)
    expected = expected_paths(bundle_files)
    if names != expected:
        extra = sorted(set(names) - set(expected))
        missing = sorted(set(expected) - set(names))
        raise DebError(f"{deb}: unexpected contents; extra {extra}, missing {missing}")
    for m in members:
        if (m.uid, m.gid) != (0, 0) or m.mode & 0o6000:
            raise DebError(f"{deb}: {m.name} is {m.uid}:{m.gid} mode {m.mode:o}")
    link = next(m for m in members if m.name == f"./{LINK}")
    if not link.issym() or link.linkname != f"/{INSTALL_DIR}/{EXECUTABLE}":
        raise DebError(f"{deb}: ./{LINK} is not a symlink to /{INSTALL_DIR}/{EXECUTABLE}")


def build(
    bundle: Path,
    out_dir: Path,
    version: str | None = None,
    arch: str | None = None,
    maintainer: str = MAINTAINER,
    run_check: bool | None = None,
    allow_bundle_leaks: bool = False,
    extra_depends: str = "",
) -> Path:
    """Build and verify the package; returns its path."""
    if shutil.which("dpkg-deb") is None:
        raise DebError("dpkg-deb not found (Debian/Ubuntu: it comes with dpkg)")
    bundle = bundle.resolve()
    exe = bundle / EXECUTABLE
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise DebError(
            f"{exe}: no executable; --bundle takes PyInstaller's one-folder output directory"
        )
    upstream = version or package_version()
    version = debian_version(upstream)
    host = host_arch()
    arch = arch or host
    bundle_files = _bundle_files(bundle)
    if run_check is None:
        run_check = arch == host  # a cross-built bundle cannot run here
    if run_check:
        _check_runs(bundle, upstream)
    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir.resolve() / f"{PACKAGE}_{version}_{arch}.deb"
    with tempfile.TemporaryDirectory(prefix="appliance-deb-") as tmp:
        staging = Path(tmp) / "root"
        staging.mkdir()
        depends = ", ".join(d for d in (DEPENDS, extra_depends.strip(", ")) if d)
        stage(bundle, staging, version, arch, maintainer, depends)
        needles = _leak_needles(ROOT, bundle, staging, out_dir)
        leaks = find_leaks(staging, needles)
        ours = [leak for leak in leaks if not leak.startswith(f"{INSTALL_DIR}/")]
        theirs = [leak for leak in leaks if leak.startswith(f"{INSTALL_DIR}/")]
        if ours or (theirs and not allow_bundle_leaks):
            raise DebError("build-machine paths in the package:\n  " + "\n  ".join(leaks))
        for leak in theirs:
            print(f"warning: build-machine path in the bundle: {leak}", file=sys.stderr)
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(staging), str(deb)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    verify(deb, bundle_files)
    return deb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--bundle", required=True, type=Path, help="PyInstaller one-folder output directory"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory (./dist)")
    ap.add_argument("--version", help="package version (default: appliance.__version__)")
    ap.add_argument("--arch", help="Debian architecture (default: dpkg --print-architecture)")
    ap.add_argument("--maintainer", default=os.environ.get("DEB_MAINTAINER", MAINTAINER))
    ap.add_argument(
        "--depends",
        default="",
        help="more Depends (libraries the bundle leaves to the system, e.g. the arm64 build's)",
    )
    ap.add_argument(
        "--no-run-check",
        dest="run_check",
        action="store_false",
        default=None,
        help="do not run `<bundle>/appliance --version` (done by default for the host's arch)",
    )
    ap.add_argument(
        "--allow-bundle-leaks",
        action="store_true",
        help="only warn about build-machine paths inside the bundle",
    )
    args = ap.parse_args(argv)
    try:
        deb = build(
            args.bundle,
            args.out,
            version=args.version,
            arch=args.arch,
            maintainer=args.maintainer,
            run_check=args.run_check,
            allow_bundle_leaks=args.allow_bundle_leaks,
            extra_depends=args.depends,
        )
    except DebError as exc:
        print(f"make_deb: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        print(f"make_deb: {' '.join(map(str, exc.cmd))} failed: {err}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
