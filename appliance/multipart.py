"""Reading multipart/form-data bodies (pictures into the device, model uploads into the hub).

aiohttp reports a malformed body (no boundary, a part without headers, a body that ends before
its closing boundary) as ValueError or one of its HTTP parser errors: the client's mistake, so a
400 naming what is wrong, never a 500."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aiohttp.http_exceptions import HttpProcessingError

from .errors import InvalidInput


@contextlib.contextmanager
def malformed_is_400() -> Iterator[None]:
    """Around the code that reads a multipart body with aiohttp's reader (and nothing else that
    raises ValueError: it would become a 400 too)."""
    try:
        yield
    except HttpProcessingError as exc:
        raise InvalidInput(f"malformed multipart body: {exc.message}") from None
    except ValueError as exc:
        raise InvalidInput(f"malformed multipart body: {exc}") from None
