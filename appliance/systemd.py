"""systemd integration: readiness, status and watchdog notifications (sd_notify), stdlib only.

Why: the unit runs with `Type=notify`, so systemd (and anything ordered `After=appliance`)
considers the appliance started only when it says `READY=1`, which it does once the models are
loaded, not merely when the process exists. With `WatchdogSec=` the server pings `WATCHDOG=1`
from a task on the serving event loop: a loop that blocks (a deadlock, a runaway synchronous
call) stops the pings, and systemd kills and restarts the service instead of leaving a process
that accepts connections and never answers.

The protocol is a few `KEY=VALUE` lines in one datagram on the AF_UNIX socket named by
$NOTIFY_SOCKET (see sd_notify(3)); implementing it here avoids a dependency on python-systemd
(libsystemd), which a one-file build or a small device may not have. Outside systemd
($NOTIFY_SOCKET unset) everything here does nothing, and a failed send is logged once and
never raised into the server: notifications are advisory, serving is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from .api.app import ENGINE, LOADER, App, Key

log = logging.getLogger("appliance.systemd")

#: "host:port" the server listens on, for the STATUS line; `serve()` sets the bound port.
ADDRESS = Key("systemd_address", str)


class Notifier:
    """Sends sd_notify datagrams to one socket; a no-op when there is none.

    The socket is non-blocking: when systemd does not read its queue fast enough a notification is
    dropped (and logged once) rather than stalling the event loop that serves requests.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._target: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address is None:
            return
        if self.address.startswith("@"):
            # Linux abstract namespace: a leading NUL instead of '@', no file on disk.
            self._target = "\0" + self.address[1:]
        elif self.address.startswith("/"):
            self._target = self.address
        else:  # e.g. vsock:CID:PORT (systemd >= 253 in VMs): not supported here
            self._warn(f"unsupported NOTIFY_SOCKET {self.address!r}: not notifying systemd")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """True when started by systemd with a notify socket we can use."""
        return self._target is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; True if sent. Never raises."""
        if self._target is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._target)
        except OSError as exc:
            self._warn(f"cannot notify systemd on {self.address!r}: {exc}")
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (further notification failures are not logged)", message)


def notify(*lines: str) -> bool:
    """One-shot sd_notify: `notify("READY=1")`; False (and nothing sent) outside systemd."""
    notifier = Notifier.from_env()
    try:
        return notifier.notify(*lines)
    finally:
        notifier.close()


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when systemd expects none.

    $WATCHDOG_PID, when set, names the process systemd watches: a child that inherited the
    environment must not ping on its parent's behalf.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watched = env.get("WATCHDOG_PID")
    if watched:
        try:
            if int(watched) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Service:
    """What the notifications of one running app share: the socket and the background tasks."""

    notifier: Notifier
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping_sent: bool = False

    def stopping(self) -> None:
        if not self.stopping_sent:
            self.stopping_sent = True
            self.notifier.notify("STOPPING=1", "STATUS=stopping: draining requests")


_SERVICE = Key("systemd_service", _Service)


async def _announce_ready(app: App, notifier: Notifier) -> None:
    """READY=1 once every model has been tried: systemd's "started" means "can serve"."""
    loader = app[LOADER]
    engine = app[ENGINE]
    where = app.get(ADDRESS, "?")
    count = len(engine.models())
    notifier.notify(f"STATUS=loading {count} model(s)")
    try:
        # Shielded: cancelling this task at shutdown must not cancel the engine's loader, whose
        # owner (_engine_ctx) cleans it up.
        await asyncio.shield(loader)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the server still answers health and reports the failure there
        notifier.notify("READY=1", f"STATUS=model loading failed: {exc!r}; serving on {where}")
        return
    models = engine.models()
    ready = sum(1 for m in models if m.status == "ready")
    failed = len(models) - ready
    status = f"serving {ready} model(s) on {where}"
    if failed:
        status += f" ({failed} failed to load)"
    notifier.notify("READY=1", f"STATUS={status}")


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """Pings from the serving loop itself: if the loop blocks, the pings stop."""
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def systemd_ctx(app: App) -> AsyncIterator[None]:
    """A cleanup context (api/app.py): readiness, status and watchdog for the app's lifetime.

    Must come after the engine's context in `app.cleanup_ctx` (it awaits app[LOADER], which that
    one creates). Startup is not delayed: readiness is announced from a task once models load, so
    /v2/health/live answers meanwhile. Does nothing when not started by systemd.
    """
    notifier = Notifier.from_env()
    if not notifier.enabled:
        yield
        return
    if LOADER not in app:
        raise RuntimeError("systemd_ctx must be added to cleanup_ctx after the engine's context")
    service = _Service(notifier)
    app[_SERVICE] = service
    interval = watchdog_interval()
    if interval is not None:
        service.tasks.append(asyncio.create_task(_watchdog(notifier, interval)))
    service.tasks.append(asyncio.create_task(_announce_ready(app, notifier)))
    try:
        yield
    finally:
        service.stopping()
        for task in service.tasks:
            task.cancel()
        for task in service.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        notifier.close()


async def _on_shutdown(app: App) -> None:
    """STOPPING=1 as soon as shutdown begins, before in-flight requests drain (up to
    server.shutdown_timeout_s); the watchdog keeps pinging until the cleanup."""
    service = app.get(_SERVICE)
    if service is not None:
        service.stopping()


def install(app: App, address: str | None = None) -> None:
    """Add systemd notifications to an app made by server.build (after its engine context)."""
    if address is not None:
        app[ADDRESS] = address
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(systemd_ctx)
