"""The single entry below the fronts: which model answers a request (tasks, A/B, fallback) and
the guards around it (result cache, circuit breaker, retries). Calls down into the engine only."""

from .router import Router, Served, Task, guarded, header_name

__all__ = ["Router", "Served", "Task", "guarded", "header_name"]
