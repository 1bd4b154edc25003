"""One error type for every failure a client or operator can see.

Each subclass carries its HTTP status; the access layer maps it in one place (HTTP status + JSON
body, MQTT error reply), so every protocol reports the same failure the same way.
"""

from __future__ import annotations

import errno


class ApplianceError(Exception):
    """Base error: `status` is the HTTP status code that best describes it."""

    status: int = 500
    #: Seconds after which retrying may succeed (sent as Retry-After), if any.
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ApplianceError):
    """The request is malformed or does not match the model (a client mistake)."""

    status = 400


class Unauthorized(ApplianceError):
    status = 401


class Forbidden(ApplianceError):
    """A valid token without the scope the route needs (an infer token on an admin route)."""

    status = 403


class TooManyAttempts(ApplianceError):
    """Too many failed authentication attempts from one client address: refused unchecked
    until the window has passed (Retry-After)."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(ApplianceError):
    """Unknown model, version or route."""

    status = 404


class NotAcceptable(ApplianceError):
    """The answer cannot be given in the format the client asked for (unknown, not offered by
    this model, or an answer that format cannot hold, like a 3-D tensor as CSV)."""

    status = 406


class PayloadTooLarge(ApplianceError):
    status = 413


class UnsupportedMediaType(ApplianceError):
    """The body's Content-Type is not one this model or route takes, or not what it holds."""

    status = 415


class Overloaded(ApplianceError):
    """The model's queue is full: refused at once instead of growing memory."""

    status = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ApplianceError):
    status = 503


class DeadlineExceeded(ApplianceError):
    """The request could not be served within its timeout."""

    status = 504


class InferenceFailed(ApplianceError):
    """The runtime failed on input that passed validation: a server-side fault."""

    status = 500


class OutputInvalid(ApplianceError):
    """A model's output broke a guard rule (appliance/guards/validate.py): the model, not the
    client, is at fault, so 502 like a gateway given a bad answer upstream. With `fallback`,
    a task's fallback model answers instead (routing/router.py)."""

    status = 502

    def __init__(self, message: str, rule: str = "", fallback: bool = False) -> None:
        super().__init__(message)
        self.rule = rule
        self.fallback = fallback


class WorkerDied(ApplianceError):
    """The worker process of a model served with `isolation = "process"` died (a native crash,
    an out-of-memory kill) or hung; the model restarts it by itself."""

    status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelError(ApplianceError):
    """A model could not be added, verified or loaded (store or backend problem)."""

    status = 500


class StoreFull(ModelError):
    """The disk under the model store has no room: what was being written is discarded, what
    was active stays active (HTTP 507 Insufficient Storage)."""

    status = 507


#: SQLITE_FULL, SQLite's "database or disk is full" (sqlite3.SQLITE_FULL from Python 3.11).
_SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error means the filesystem has no room (or the user's quota is used): an OS
    error, or SQLite's word for it (checked without importing sqlite3)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__module__ == "sqlite3" and (
        getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc)
    )


class ConfigError(ApplianceError):
    """A configuration key has a bad value; the message names the key and the value."""

    status = 500
