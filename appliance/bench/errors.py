"""The one error type of the benchmarks."""

from __future__ import annotations

from ..errors import ApplianceError


class BenchError(ApplianceError):
    """The benchmark could not be run or the server misbehaved during it."""
