"""Hub-only error types (the shared ones live in appliance.errors)."""

from __future__ import annotations

from ..errors import ApplianceError


class Forbidden(ApplianceError):
    """Authenticated, but this credential may not do that (a device on an admin route)."""

    status = 403


class Conflict(ApplianceError):
    """The change contradicts what the hub already holds (a version published twice)."""

    status = 409
