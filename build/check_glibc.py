#!/usr/bin/env python3
"""Which glibc a PyInstaller bundle needs: `objdump -T` over every ELF file in it.

    python build/check_glibc.py dist/arm64/appliance [--max 2.36] [--report 2.35]

A bundle carries its own Python and libraries but uses the device's glibc, and the dynamic
loader refuses a library that references a symbol version the device's libc lacks ("version
`GLIBC_2.36' not found"). For every bundled ELF file this takes the newest GLIBC_x.y among its
undefined (imported) symbols; the check fails when one is above --max (2.36: Raspberry Pi OS,
Debian 12) and reports whether all stay within --report (2.35: Jetson's Ubuntu 22.04). The same
is done for libstdc++ (GLIBCXX_3.4.x) when the bundle leaves libstdc++ to the system: both
targets have GCC 12's, GLIBCXX_3.4.30. A bundled libc, loader or libpthread is always an error.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
# GCC 12's libstdc++ (Debian 12 and Ubuntu 22.04 alike).
SYSTEM_GLIBCXX = "3.4.30"
# Parts of glibc that must come from the device, never from the bundle.
GLIBC_FILES = re.compile(r"^(libc|libm|libdl|librt|libpthread|ld-linux[-\w]*)\.so")
UND = re.compile(r"\*UND\*\s+\S+\s+\(?(GLIBC|GLIBCXX|CXXABI)_([0-9][0-9.]*|PRIVATE)\)?\s+(\S+)")


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def elf_machine(path: Path) -> str | None:
    """The architecture in an ELF header (`file` says the same), or None for a non-ELF file."""
    with path.open("rb") as f:
        head = f.read(20)
    if len(head) < 20 or not head.startswith(ELF_MAGIC):
        return None
    number = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return MACHINES.get(number, f"machine {number}")


def elf_files(root: Path) -> list[Path]:
    """Every regular ELF file below `root` (or `root` itself when it is a file)."""
    candidates = [root] if root.is_file() else sorted(root.rglob("*"))
    return [p for p in candidates if p.is_file() and not p.is_symlink() and elf_machine(p)]


def find_objdump() -> str:
    """A cross objdump when installed; Debian's own reads aarch64 files through elf64-little."""
    for name in ("aarch64-linux-gnu-objdump", "objdump"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("check_glibc: no objdump (Debian: apt-get install binutils)")


@dataclass
class Needs:
    """What one ELF file imports, by symbol version."""

    glibc: str = "0"
    glibc_symbols: list[str] = field(default_factory=list)
    glibcxx: str = "0"
    private: list[str] = field(default_factory=list)


def needs(path: Path, objdump: str) -> Needs:
    proc = subprocess.run([objdump, "-T", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        if "not a dynamic object" in proc.stderr or "no dynamic symbols" in proc.stderr.lower():
            return Needs()
        raise SystemExit(f"check_glibc: {objdump} -T {path} failed: {proc.stderr.strip()}")
    out = Needs()
    for m in UND.finditer(proc.stdout):
        kind, version, symbol = m.groups()
        if version == "PRIVATE":
            out.private.append(symbol)
        elif kind == "GLIBC":
            if version_key(version) > version_key(out.glibc):
                out.glibc, out.glibc_symbols = version, [symbol]
            elif version == out.glibc:
                out.glibc_symbols.append(symbol)
        elif kind == "GLIBCXX" and version_key(version) > version_key(out.glibcxx):
            out.glibcxx = version
    return out


def check_bundle(root: Path, fail_above: str = "2.36", report: str = "2.35") -> str:
    """Print the report; return "" when the bundle passes, else why it fails."""
    objdump = find_objdump()
    files = elf_files(root)
    if not files:
        return f"{root}: no ELF files"
    base = root if root.is_dir() else root.parent
    results = {p: needs(p, objdump) for p in files}
    top = max((n.glibc for n in results.values()), key=version_key)
    problems = []
    over_report = []
    for path, n in results.items():
        rel = path.relative_to(base).as_posix()
        if GLIBC_FILES.match(path.name):
            problems.append(f"{rel}: glibc itself is bundled (it must come from the device)")
        if n.private:
            problems.append(f"{rel}: uses GLIBC_PRIVATE symbols {sorted(set(n.private))[:5]}")
        if version_key(n.glibc) > version_key(fail_above):
            problems.append(f"{rel}: needs GLIBC_{n.glibc} ({', '.join(n.glibc_symbols[:5])})")
        if version_key(n.glibc) > version_key(report):
            over_report.append(f"{rel} (GLIBC_{n.glibc}: {', '.join(n.glibc_symbols[:5])})")
    bundles_libstdcxx = any(p.name.startswith("libstdc++.so") for p in files)
    glibcxx = max((n.glibcxx for n in results.values()), key=version_key)
    if not bundles_libstdcxx and version_key(glibcxx) > version_key(SYSTEM_GLIBCXX):
        problems.append(
            f"libstdc++ is left to the system but GLIBCXX_{glibcxx} is needed "
            f"(Debian 12 and Ubuntu 22.04 have {SYSTEM_GLIBCXX})"
        )
    machines = sorted({elf_machine(p) or "?" for p in files})
    print(f"{root}: {len(files)} ELF files ({', '.join(machines)}), objdump {objdump}")
    print(f"  newest glibc symbol needed: GLIBC_{top} (limit {fail_above})")
    cxx = "bundled" if bundles_libstdcxx else f"from the system, needs GLIBCXX_{glibcxx}"
    if glibcxx == "0" and not bundles_libstdcxx:
        cxx = "not used"
    print(f"  libstdc++: {cxx}")
    if over_report:
        print(f"  stays within glibc {report} (Jetson, Ubuntu 22.04): no; these need more:")
        for line in over_report:
            print(f"    {line}")
    else:
        print(f"  stays within glibc {report} (Jetson, Ubuntu 22.04): yes")
    return "\n".join(problems)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundle", type=Path, help="one-folder bundle directory, or one ELF file")
    ap.add_argument("--max", default="2.36", help="fail above this glibc (Raspberry Pi OS)")
    ap.add_argument("--report", default="2.35", help="report whether within this one (Jetson)")
    args = ap.parse_args(argv)
    problems = check_bundle(args.bundle, args.max, args.report)
    if problems:
        print(f"check_glibc: FAILED\n{problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
