"""Hand the C heap's free pages back to the operating system after a model loads or unloads.

Loading a model allocates far more than the loaded model keeps (onnxruntime parses the whole
protobuf, copies the initializers, optimizes the graph, then frees the copies); glibc keeps those
freed pages mapped, so the idle device would carry them for its whole life (about 30 MiB after a
64 MiB ONNX model here, tests/bench/memory_breakdown.py). `malloc_trim(0)` returns them; it
walks the heap once (milliseconds), so it runs off the request path, after a load or an unload.
Where the C library has no `malloc_trim` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked = False


def release() -> bool:
    """Return the heap's free memory to the OS; True where the C library could."""
    global _trim, _looked
    if not _looked:
        _looked = True
        try:
            fn = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
        except OSError:
            fn = None
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _trim = fn
    if _trim is None:
        return False
    _trim(0)
    return True
