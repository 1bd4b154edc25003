#!/usr/bin/env python3
"""Build the arm64 (aarch64) binary for Raspberry Pi OS and Jetson, on any Linux host.

    python build/build_arm64.py [build] [--backends onnx] [--mode onedir|onefile|both]
    python build/build_arm64.py rootfs     # create (or reuse) the arm64 root filesystem, print it
    python build/build_arm64.py jetson     # on a Jetson only: GPU build (see README "arm64")

PyInstaller does not cross-compile and bundles the build system's C libraries, so the binary is
built on the distribution of the oldest device it targets: Debian 12 (bookworm) arm64, the base
of 64-bit Raspberry Pi OS. On an x86_64 host (root needed) that system runs under QEMU user-mode
emulation: this script installs qemu-user-static, binfmt-support and debootstrap when missing,
registers the aarch64 binfmt handler, debootstraps the root filesystem once into a cache
directory, and runs the unchanged build/build_binary.py (same spec, same clean-venv rule, same
--version/selftest check) inside it, with PyPI's aarch64 wheels. On an aarch64 host it runs
build/build_binary.py directly. Either way the result lands in dist/arm64/ and every bundled ELF
file is checked by build/check_glibc.py (fails above glibc 2.36, reports 2.35 for Jetson).

Traps this avoids (see ../shared/NOTES.md): onnxruntime crashes on import under QEMU when the
guest reads the host's x86 /proc/cpuinfo, so an aarch64 one is bind-mounted over it; the host's
pip and certificate variables point at host files, so the chroot is entered with `env -i` and
the host's extra CA certificates are installed in the root filesystem; every mount made here is
unmounted in a `finally`, failure or not.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_binary
import check_glibc

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / ".cache" / "arm64"
OUT = ROOT / "dist" / "arm64"
SUITE = "bookworm"
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap")
# python3-venv: ensurepip for build_binary's clean venv; libpython3.11: the shared libpython
# PyInstaller bundles; binutils: PyInstaller's and check_glibc's objdump inside the guest.
ROOTFS_PACKAGES = ("python3", "python3-venv", "libpython3.11", "binutils", "ca-certificates")
# Compiling llama.cpp (the gguf backend) needs a toolchain; installed only for that variant.
GGUF_PACKAGES = ("build-essential", "python3-dev")
# Raise when ROOTFS_PACKAGES or the way the root filesystem is made changes: the cache is rebuilt.
ROOTFS_RECIPE = "1"
# Libraries every target system has (Raspberry Pi OS and Ubuntu 22.04 both ship them, and apt
# itself needs libstdc++): left out of the bundle, because bookworm's builds of them are what
# needs glibc 2.36, while Jetson's Ubuntu 22.04 has 2.35. The .deb depends on their packages.
SYSTEM_LIBS = ("libstdc++.so.6", "libgcc_s.so.1", "libexpat.so.1")
SYSTEM_LIB_PACKAGES = "libstdc++6, libgcc-s1, libexpat1"
# On a Jetson, CUDA, cuDNN and TensorRT belong to JetPack (and are hundreds of MiB).
JETPACK_LIBS = ("libcuda*", "libcublas*", "libcudnn*", "libcufft*", "libcurand*", "libcusparse*",
                "libcusolver*", "libnvinfer*", "libnvonnxparser*", "libnvrtc*", "libnvToolsExt*",
                "libcupti*", "libnvdla*", "libnvrm*", "libnvos*")  # fmt: skip
# An aarch64 /proc/cpuinfo (one Cortex-A72 core per host CPU, as on a Raspberry Pi 4).
CPUINFO_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

"""
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Per backend set (`/opt/appliance-build/onnx/{src,venv}`), so variants do not rebuild each
# other's venv.
GUEST_BUILD = "/opt/appliance-build"
GUEST_WHEELS = "/wheels"
# llama.cpp's native CPU detection picks flags that do not compile under emulation: a portable
# ARMv8-A baseline (every 64-bit Pi and Jetson has it).
GGUF_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"


class Arm64Error(Exception):
    """A problem main() reports in one line before exiting 1."""


def log(msg: str) -> None:
    print(f"[build_arm64 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


@contextlib.contextmanager
def timed(what: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[what] = time.monotonic() - start
        log(f"{what}: {timings[what]:.0f} s")


def is_arm64_host() -> bool:
    return platform.machine() in ("aarch64", "arm64")


# -- host preparation ---------------------------------------------------------------------------


def ensure_host_packages(packages: tuple[str, ...]) -> None:
    """apt-get install the packages that are not installed yet."""
    missing = []
    for pkg in packages:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}", pkg], capture_output=True, text=True
        )
        if out.returncode != 0 or not out.stdout.endswith(" installed"):
            missing.append(pkg)
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise Arm64Error(f"install {', '.join(missing)} (no apt-get here)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


BINFMT = Path("/proc/sys/fs/binfmt_misc")


def ensure_binfmt() -> None:
    """Mount binfmt_misc if needed and enable the aarch64 handler, with flag F (fix binary: a
    chroot needs no copy of qemu inside)."""
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    text = entry.read_text() if entry.exists() else ""
    if not text.startswith("enabled"):
        raise Arm64Error(f"{entry} is not enabled after update-binfmts:\n{text}")
    flags = next(
        (line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), ""
    )
    if "F" not in flags:
        raise Arm64Error(f"{entry} lacks flag F (fix binary); re-register it: {text!r}")


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (CI machines may only reach that one)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["URIs:"]:  # deb822 (.sources)
                urls = words[1:]
            elif words[:1] == ["deb"]:  # one-line format: deb [options] URL suite...
                urls = [w for w in words[1:] if "://" in w][:1]
            else:
                continue
            for url in urls:
                if "/debian" in url and "security" not in url:
                    return url.rstrip("/")
    return "http://deb.debian.org/debian"


# -- mounts -------------------------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (the order to unmount them)."""
    prefix = str(root.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: Path) -> None:
    """Unmount everything below `root`; lazily when busy. Raises if something stays."""
    for point in mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], check=False)
    left = mounts_under(root)
    if left:
        raise Arm64Error(f"could not unmount {left}")


@contextlib.contextmanager
def guest_mounts(rootfs: Path) -> Iterator[None]:
    """/proc (with an aarch64 cpuinfo over it), /sys (onnxruntime's cpuinfo reads the CPU lists
    there) and /dev for a chroot; always unmounted."""
    try:
        run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        run(["mount", "--bind", str(rootfs / ".cpuinfo"), str(rootfs / "proc" / "cpuinfo")])
        run(["mount", "-t", "sysfs", "sysfs", str(rootfs / "sys")])
        run(["mount", "--bind", "/dev", str(rootfs / "dev")])
        yield
    finally:
        unmount_all(rootfs)


def guest_env(extra: dict[str, str] | None = None) -> list[str]:
    """`env -i NAME=VALUE...`: nothing of the host's environment enters the chroot."""
    env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        # A pip that is not Debian's (the venv's own, once upgraded) reads certifi, not the
        # system bundle that holds the extra certificates installed here.
        "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "180",
        "DEBIAN_FRONTEND": "noninteractive",
        **(extra or {}),
    }
    return ["env", "-i", *(f"{k}={v}" for k, v in env.items())]


def in_guest(rootfs: Path, cmd: list[str], extra_env: dict[str, str] | None = None) -> None:
    run([*guest_env(extra_env), shutil.which("chroot") or "/usr/sbin/chroot", str(rootfs), *cmd])


# -- root filesystem ----------------------------------------------------------------------------


def cpuinfo_text() -> str:
    return "".join(CPUINFO_CORE.format(n=n) for n in range(os.cpu_count() or 1))


def _install_host_certificates(rootfs: Path) -> None:
    """The host's extra CA certificates (a proxy's, a company's) into the guest's trust store:
    where update-ca-certificates finds them (apt runs it on upgrades), and appended to the bundle
    pip reads now; rehashing in the guest would cost minutes of emulated openssl."""
    extra = Path("/usr/local/share/ca-certificates")
    dest = rootfs / "usr" / "local" / "share" / "ca-certificates"
    bundle = rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    dest.mkdir(parents=True, exist_ok=True)
    if not extra.is_dir():
        return
    text = bundle.read_text() if bundle.exists() else ""
    for crt in sorted(extra.glob("*.crt")):
        shutil.copyfile(crt, dest / crt.name)
        pem = crt.read_text().strip()
        if pem not in text:
            text = text.rstrip("\n") + "\n" + pem + "\n"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_text(text.lstrip("\n"))


def rootfs_stamp(packages: tuple[str, ...]) -> str:
    return f"recipe {ROOTFS_RECIPE}\nsuite {SUITE}\npackages {' '.join(sorted(packages))}\n"


def ensure_rootfs(cache: Path, timings: dict[str, float]) -> Path:
    """The bookworm arm64 root filesystem in `cache`, debootstrapped once and then reused.

    Made in a temporary directory and renamed when complete, so an interrupted run leaves no
    half-made cache behind."""
    rootfs = cache / f"rootfs-{SUITE}"
    stamp = rootfs / ".appliance-rootfs"
    if stamp.exists() and stamp.read_text() == rootfs_stamp(ROOTFS_PACKAGES):
        log(f"reusing {rootfs}")
        _refresh_host_files(rootfs)
        return rootfs
    tmp = cache / f"rootfs-{SUITE}.partial"
    for old in (tmp, rootfs):
        if old.exists():
            unmount_all(old)
            shutil.rmtree(old)
    cache.mkdir(parents=True, exist_ok=True)
    with timed("rootfs debootstrap (first stage, download)", timings):
        run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
             f"--include={','.join(ROOTFS_PACKAGES)}", SUITE, str(tmp), host_mirror()])  # fmt: skip
    try:
        with timed("rootfs second stage (emulated)", timings):
            run([*guest_env(), shutil.which("chroot") or "/usr/sbin/chroot", str(tmp),
                 "/debootstrap/debootstrap", "--second-stage"])  # fmt: skip
    finally:
        unmount_all(tmp)  # debootstrap mounts /proc and /sys itself
    # The first stage leaves /proc a symlink to the host's; the second makes it a directory.
    # A plain file there is what QEMU_LD_PREFIX=ROOTFS runs from the host read instead of the
    # host's /proc/cpuinfo; chroots get the same text bind-mounted over their /proc.
    (tmp / ".cpuinfo").write_text(cpuinfo_text())
    (tmp / "proc" / "cpuinfo").write_text(cpuinfo_text())
    _refresh_host_files(tmp)
    stamp_tmp = tmp / ".appliance-rootfs"
    stamp_tmp.write_text(rootfs_stamp(ROOTFS_PACKAGES))
    tmp.rename(rootfs)
    return rootfs


def _refresh_host_files(rootfs: Path) -> None:
    """DNS and CA certificates can change between runs: take the host's current ones."""
    resolv = Path("/etc/resolv.conf")
    target = rootfs / "etc" / "resolv.conf"
    if resolv.exists():
        target.unlink(missing_ok=True)
        shutil.copyfile(resolv.resolve(), target)
    _install_host_certificates(rootfs)


def ensure_guest_packages(rootfs: Path, packages: tuple[str, ...]) -> None:
    """apt-get install extra packages in the guest once (recorded in a stamp of their own)."""
    stamp = rootfs / ".appliance-extra"
    have = set(stamp.read_text().split()) if stamp.exists() else set()
    if set(packages) <= have:
        return
    with guest_mounts(rootfs):
        in_guest(rootfs, ["apt-get", "update", "-qq"])
        in_guest(rootfs, ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages])
    _install_host_certificates(rootfs)
    stamp.write_text(" ".join(sorted(have | set(packages))))


# -- the build ----------------------------------------------------------------------------------


def source_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: what a clean clone would hold."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    )  # fmt: skip
    return [f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def copy_source(dest: Path) -> None:
    """A fresh copy of the source tree (no .git, dist, caches) for the guest to build from."""
    if dest.exists():
        shutil.rmtree(dest)
    for rel in source_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)


def binary_names(mode: str) -> list[str]:
    return {"onedir": ["appliance"], "onefile": ["appliance-onefile"]}.get(
        mode, ["appliance", "appliance-onefile"]
    )


def collect(dist: Path, mode: str, out: Path) -> list[Path]:
    """Copy the built binaries from `dist` into `out` (replacing old ones)."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in binary_names(mode):
        src, dest = dist / name, out / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink(missing_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True)
            results.append(dest / "appliance")
        else:
            shutil.copy2(src, dest)
            results.append(dest)
    return results


def build_env(backends: list[str], keep_system_libs: bool, jetson: bool = False) -> dict[str, str]:
    """Variables for build_binary.py and the spec (and pip, for llama-cpp-python)."""
    system_libs = ([] if keep_system_libs else list(SYSTEM_LIBS)) + (
        list(JETPACK_LIBS) if jetson else []
    )
    env = {
        "APPLIANCE_GIT_REVISION": build_binary.git_revision(),
        "APPLIANCE_SYSTEM_LIBS": ",".join(system_libs),
        # An older cached wheel (llama-cpp-python) beats compiling a newer sdist for 35 minutes.
        "PIP_PREFER_BINARY": "1",
    }
    if "gguf" in backends:
        env["CMAKE_ARGS"] = GGUF_CMAKE_ARGS
    return env


def lock_cache(cache: Path) -> None:
    """One build at a time per cache (held until the process exits): a second one would
    unmount the first one's /proc and rewrite its source tree."""
    cache.mkdir(parents=True, exist_ok=True)
    lock = (cache / ".lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    _LOCKS.append(lock)


_LOCKS: list[IO[str]] = []


def build_emulated(args: argparse.Namespace, backends: list[str]) -> list[Path]:
    timings: dict[str, float] = {}
    if os.geteuid() != 0:
        raise Arm64Error("building under emulation needs root (debootstrap, chroot, mount)")
    cache = Path(args.cache).resolve()
    lock_cache(cache)
    with timed("host packages and binfmt", timings):
        ensure_host_packages(HOST_PACKAGES)
        ensure_binfmt()
    with timed("rootfs (total)", timings):
        rootfs = ensure_rootfs(cache, timings)
    if "gguf" in backends:
        with timed("guest toolchain for gguf", timings):
            ensure_guest_packages(rootfs, GGUF_PACKAGES)
    guest_dir = f"{GUEST_BUILD}/{'-'.join(backends)}"
    src = rootfs / guest_dir.lstrip("/") / "src"
    copy_source(src)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    guest_wheels = rootfs / GUEST_WHEELS.lstrip("/")
    shutil.rmtree(guest_wheels, ignore_errors=True)
    shutil.copytree(wheels, guest_wheels)
    env = {**build_env(backends, args.keep_system_libs), "PIP_FIND_LINKS": GUEST_WHEELS}
    try:
        with guest_mounts(rootfs):
            if "gguf" in backends:
                with timed("llama-cpp-python wheel (emulated compile, or the cached one)", timings):
                    _ensure_gguf_wheel(rootfs, env)
            with timed("build_binary.py in the guest (pip install + PyInstaller + smoke)", timings):
                in_guest(rootfs, ["python3", f"{guest_dir}/src/build/build_binary.py",
                                  "--mode", args.mode, "--backends", ",".join(backends),
                                  "--venv", f"{guest_dir}/venv"], env)  # fmt: skip
    finally:  # a wheel that took half an hour to compile is kept even when PyInstaller fails
        for wheel in guest_wheels.glob("*.whl"):
            if not (wheels / wheel.name).exists():
                shutil.copy2(wheel, wheels / wheel.name)
                log(f"cached {wheels / wheel.name}")
    binaries = collect(src / "dist", args.mode, Path(args.out))
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    return binaries


def _ensure_gguf_wheel(rootfs: Path, env: dict[str, str]) -> None:
    """Compile llama-cpp-python for aarch64 into the wheel cache once (it takes about half an
    hour under emulation); pip reuses the cached wheel afterwards."""
    reqs = [r for r in build_binary.requirements(["gguf"]) if r.startswith("llama-cpp-python")]
    pip_venv = f"{GUEST_BUILD}/pip-venv"  # Debian's python3 has no pip without python3-pip
    if not (rootfs / pip_venv.lstrip("/") / "bin" / "pip").exists():
        in_guest(rootfs, ["python3", "-m", "venv", pip_venv])
    in_guest(rootfs, [f"{pip_venv}/bin/pip", "wheel", "--no-deps", "--wheel-dir", GUEST_WHEELS,
                      *reqs], env)  # fmt: skip


def build_native(args: argparse.Namespace, backends: list[str]) -> list[Path]:
    """On an aarch64 machine: build_binary.py as is, then the same collection and checks."""
    env = {**os.environ, **build_env(backends, args.keep_system_libs, args.command == "jetson")}
    if args.command == "jetson":
        env.pop("CMAKE_ARGS", None)  # the prepared venv has llama.cpp built for CUDA already
    venv = args.venv or str(ROOT / ".venv-build-arm64")
    cmd = [sys.executable, str(ROOT / "build" / "build_binary.py"), "--mode", args.mode,
           "--backends", ",".join(backends), "--venv", venv]  # fmt: skip
    if getattr(args, "prepared_venv", False):
        cmd.append("--prepared-venv")
    run(cmd, env=env)
    return collect(ROOT / "dist", args.mode, Path(args.out))


def check(binaries: list[Path], args: argparse.Namespace) -> None:
    """aarch64 ELF files only, and no glibc symbol newer than Raspberry Pi OS has."""
    for binary in binaries:
        machine = check_glibc.elf_machine(binary)
        if machine != "aarch64":
            raise Arm64Error(f"{binary} is an ELF file for {machine}, not aarch64")
        # A one-folder bundle is checked file by file; a one-file binary carries the same
        # libraries compressed inside, so only its bootloader can be read here.
        target = binary.parent if binary.name == "appliance" else binary
        problems = check_glibc.check_bundle(target, fail_above=args.max_glibc)
        if problems:
            raise Arm64Error(f"glibc check failed:\n{problems}")
        files = (
            [p for p in target.rglob("*") if p.is_file() and not p.is_symlink()]
            if target.is_dir()
            else [target]
        )
        size = sum(p.stat().st_size for p in files)
        log(f"{target}: aarch64, {size / 2**20:.1f} MiB")


# -- Jetson -------------------------------------------------------------------------------------


def build_jetson(args: argparse.Namespace) -> list[Path]:
    """JetPack 6 GPU build, on the Jetson itself: JetPack's onnxruntime-gpu wheel (TensorRT and
    CUDA providers) and llama.cpp compiled with CUDA exist only there."""
    if not is_arm64_host():
        raise Arm64Error("`jetson` builds on the Jetson itself (JetPack 6); this is not aarch64")
    if not Path("/usr/local/cuda").exists():
        raise Arm64Error("no /usr/local/cuda: install JetPack 6 (nvidia-jetpack) first")
    backends = [b for b in args.backends.split(",") if b]
    venv = Path(args.venv or ROOT / ".venv-build-jetson")
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    reqs = [r for r in build_binary.requirements(backends) if not r.startswith("onnxruntime")]
    env = {**os.environ, **build_env(backends, args.keep_system_libs, jetson=True)}
    if "gguf" in backends:
        env["CMAKE_ARGS"] = f"-DGGML_CUDA=on -DGGML_NATIVE=OFF {args.cuda_cmake_args}".strip()
    onnx = [args.ort_wheel] if "onnx" in backends else []
    run([str(python), "-m", "pip", "install", *onnx, *reqs], env=env)
    args.venv = str(venv)
    args.prepared_venv = True
    return build_native(args, backends)


# -- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", nargs="?", default="build", choices=["build", "rootfs", "jetson"])
    ap.add_argument("--backends", default="onnx", help="comma-separated extras to bundle (onnx)")
    ap.add_argument("--mode", choices=["onedir", "onefile", "both"], default="onedir")
    ap.add_argument("--cache", default=str(CACHE), help="root filesystem and wheel cache")
    ap.add_argument("--out", default=str(OUT), help="where the binaries go (dist/arm64)")
    ap.add_argument("--venv", help="native builds: the build venv (default .venv-build-arm64)")
    ap.add_argument("--max-glibc", default="2.36", help="fail when a bundled ELF needs more")
    ap.add_argument(
        "--keep-system-libs",
        action="store_true",
        help=f"bundle {', '.join(SYSTEM_LIBS)} too (then glibc 2.36 is needed)",
    )
    ap.add_argument(
        "--ort-wheel",
        default="onnxruntime-gpu",
        help="jetson: JetPack's onnxruntime-gpu wheel (a file, or a name with PIP_INDEX_URL)",
    )
    ap.add_argument(
        "--cuda-cmake-args",
        default="-DCMAKE_CUDA_ARCHITECTURES=87",
        help="jetson: extra CMAKE_ARGS for llama.cpp (87: Orin)",
    )
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    try:
        if args.command == "rootfs":
            if is_arm64_host():
                raise Arm64Error("an aarch64 host builds natively and needs no root filesystem")
            lock_cache(Path(args.cache).resolve())
            ensure_host_packages(HOST_PACKAGES)
            ensure_binfmt()
            print(ensure_rootfs(Path(args.cache).resolve(), {}))
            return 0
        if args.command == "jetson":
            binaries = build_jetson(args)
        elif is_arm64_host():
            binaries = build_native(args, backends)
        else:
            binaries = build_emulated(args, backends)
        check(binaries, args)
    except Arm64Error as exc:
        print(f"build_arm64: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(
            f"build_arm64: {' '.join(map(str, exc.cmd))} exited {exc.returncode}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
