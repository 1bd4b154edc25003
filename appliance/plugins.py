"""Plugin directories: installed distributions outside the Python environment.

The frozen binary has no environment to `pip install` into, so `[plugins] dirs` names
directories filled with `pip install --target DIR appliance-plugin-x`. At start-up each is
checked, then appended to `sys.path`: importlib.metadata reads the distributions there like any
installed one, so both registries (`appliance.steps`, `appliance.backends` entry points) see
their plugins, and worker processes get the same directories (isolation/process.load_call).

Appended, not prepended: a plugin directory can add modules but never replace a bundled
package (numpy, aiohttp) or the appliance itself.

Code in a plugin directory runs with the server's rights, so a directory anyone else can write
to is refused (see `check_dir`).
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

#: The plugin directories in use in this process, resolved, in config order.
_ACTIVE: list[str] = []


def entries(group: str, builtin: Collection[str]) -> dict[str, tuple[str, str]]:
    """What installed packages add to an entry-point group (`appliance.steps`,
    `appliance.backends`): name -> ("module:Class", distribution name). A built-in name cannot
    be taken over; of two plugins with one name, the first found wins."""
    import importlib.metadata  # here: only a name no built-in has makes it scan (~0.6 MiB)

    found: dict[str, tuple[str, str]] = {}
    for ep in importlib.metadata.entry_points(group=group):
        if ep.name in builtin or ep.name in found:
            continue
        dist = ep.dist.name if ep.dist is not None else ep.value.partition(":")[0]
        found[ep.name] = (ep.value, dist)
    return found


def use_dirs(dirs: Sequence[str], key: str = "plugins.dirs") -> list[str]:
    """Check every directory, then put them on sys.path (once each); returns those added."""
    resolved = []
    for i, d in enumerate(dirs):
        path = Path(d)
        check_dir(path, f"{key}[{i}] = {d!r}")
        resolved.append(str(path.resolve()))
    added = []
    for d in resolved:
        if d not in sys.path:
            sys.path.append(d)
            added.append(d)
        if d not in _ACTIVE:
            _ACTIVE.append(d)
    if added:
        importlib.invalidate_caches()
    return added


def active_dirs() -> list[str]:
    """The plugin directories this process uses (a worker process gets the same)."""
    return list(_ACTIVE)


def forget_dirs(dirs: Sequence[str]) -> None:
    """Take directories off sys.path again (tests; a server never does)."""
    for d in dirs:
        while d in sys.path:
            sys.path.remove(d)
        if d in _ACTIVE:
            _ACTIVE.remove(d)
    importlib.invalidate_caches()


def check_dir(path: Path, where: str) -> None:
    """Refuse a plugin directory that someone other than root or the server's user can change.

    Checked: the directory and everything in it (not following links) is neither writable by
    every user nor by a group other than root's or the server's, and belongs to root or the
    server's user; no directory above it is writable by every user without the sticky bit
    (someone could swap the directory itself)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"{where}: not a directory")
    path = path.resolve()
    why = _unsafe(path)
    if why is None:
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                why = _unsafe(Path(root) / name)
                if why is not None:
                    break
            if why is not None:
                break
    if why is None:
        for parent in path.parents:
            mode = parent.stat().st_mode
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                why = f"{parent} is writable by every user (and not sticky)"
                break
    if why is not None:
        raise ConfigError(
            f"{where}: {why}. Code in a plugin directory runs with the server's rights: only "
            "root (or the server's own user) may be able to change it (e.g. chown -R root: DIR; "
            "chmod -R go-w DIR)"
        )


def _unsafe(path: Path) -> str | None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode means nothing; its target is checked where it lives
    if st.st_mode & stat.S_IWOTH:
        return f"{path} is writable by every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"{path} is writable by group {st.st_gid}"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to user {st.st_uid}"
    return None


# -- what is installed ---------------------------------------------------------------------


@dataclass(frozen=True)
class PluginEntry:
    """One entry point of one of the two groups, and whether it loads here."""

    group: str  # "step" or "backend"
    name: str
    target: str  # "module:Class"
    distribution: str
    version: str
    location: str
    #: "ok", or why it cannot be used ("does not import: ...", "ignored: a built-in ...").
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def report() -> list[PluginEntry]:
    """Every plugin step and backend installed (environment and plugin directories), each
    imported to say whether it works."""
    import importlib.metadata

    from . import backends, steps
    from .errors import ApplianceError

    builtin = {"step": set(steps._STEPS), "backend": set(backends._BACKENDS)}
    groups = {"step": steps.ENTRY_POINT_GROUP, "backend": backends.ENTRY_POINT_GROUP}
    out = []
    for kind, group in groups.items():
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist
            location = ""
            if dist is not None:
                location = str(dist.locate_file(""))
            if ep.name in builtin[kind]:
                status = f"ignored: {ep.name!r} is a built-in {kind}"
            else:
                try:
                    if kind == "step":
                        steps.get_step(ep.name)
                    else:
                        backends.get_backend(ep.name)
                    status = "ok"
                except ApplianceError as exc:
                    status = exc.message
            out.append(
                PluginEntry(
                    kind,
                    ep.name,
                    ep.value,
                    dist.name if dist is not None else "?",
                    dist.version if dist is not None else "?",
                    location,
                    status,
                )
            )
    return out
