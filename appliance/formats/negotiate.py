"""Which format a request's answer takes: its `format` parameter, else its Accept header.

`format` (KServe v2 `parameters.format`, the URL query `?format=`, the MQTT user property)
names a format exactly and wins over Accept. Accept is read as HTTP says (media ranges with
q-values; a more specific range wins over a wildcard at the same q); among equals the
server's order counts (json first). Nothing acceptable: 406 with the formats available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InvalidInput, NotAcceptable
from . import CONTENT_TYPES, JSON

#: Accept values that ask for nothing in particular: answered in JSON without parsing.
PLAIN_ACCEPT = frozenset({"", "*/*", "application/json", "application/*"})
#: Media types by format (the first is the one answers carry).
MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "json": ("application/json",),
    "xml": ("application/xml", "text/xml"),
    "csv": ("text/csv",),
    "html": ("text/html", "application/xhtml+xml"),
    "markdown": ("text/markdown", "text/x-markdown"),
    "text": ("text/plain",),
}
assert set(MEDIA_TYPES) == set(CONTENT_TYPES)


def is_plain(accept: str | None) -> bool:
    """Whether an Accept header leaves the answer in JSON with no negotiation to do."""
    return accept is None or accept.strip().lower() in PLAIN_ACCEPT


def choose(asked: Any, accept: str | None, offered: Sequence[str], what: str,
           field: str = "parameters.format") -> str:  # fmt: skip
    """The format to answer in; `offered` are the model's formats (server order), `what`
    names the model in messages, `field` where `asked` came from."""
    if asked is not None:
        if not isinstance(asked, str):
            raise InvalidInput(f"{field} must be a string (one of {', '.join(offered)})")
        name = asked.strip().lower()
        if name not in offered:
            known = "" if name in CONTENT_TYPES else "unknown "
            raise NotAcceptable(
                f"{known}format {asked[:40]!r} is not available for {what} "
                f"(available: {', '.join(offered)})"
            )
        return name
    if is_plain(accept):
        return JSON
    assert accept is not None
    ranges = _parse(accept)
    best: tuple[float, int, int] | None = None
    chosen = None
    for order, fmt in enumerate(offered):
        for alias, media in enumerate(MEDIA_TYPES[fmt]):
            score = _score(media, ranges)
            if score is None or (alias and score[1] < 2):  # an alias counts named exactly
                continue
            key = (score[0], score[1], -order)
            if best is None or key > best:
                best, chosen = key, fmt
    if chosen is None:
        raise NotAcceptable(
            f"Accept {accept[:80]!r} matches no format of {what} (available: "
            f"{', '.join(f'{f} ({MEDIA_TYPES[f][0]})' for f in offered)}); the parameter "
            "'format' names one directly"
        )
    return chosen


def _parse(accept: str) -> list[tuple[str, str, float]]:
    """(type, subtype, q) of each media range."""
    out = []
    for part in accept.split(","):
        part = part.strip()
        if not part:
            continue
        media, *params = (p.strip() for p in part.split(";"))
        kind, slash, sub = media.lower().partition("/")
        if not slash or not kind or not sub:
            raise InvalidInput(f"Accept: {media[:40]!r} is not a media range (type/subtype)")
        q = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0
                if not 0.0 <= q <= 1.0:
                    raise InvalidInput(f"Accept: q={value[:20]!r} must be a number from 0 to 1")
        out.append((kind, sub, q))
    return out


def _score(media: str, ranges: list[tuple[str, str, float]]) -> tuple[float, int] | None:
    """(q, specificity) of the most specific range matching `media`; None when none does or
    its q is 0 (not acceptable)."""
    kind, _, sub = media.partition("/")
    found: tuple[float, int] | None = None
    for rkind, rsub, q in ranges:
        if rkind == kind and rsub == sub:
            spec = 2
        elif rkind == kind and rsub == "*":
            spec = 1
        elif rkind == "*" and rsub == "*":
            spec = 0
        else:
            continue
        if found is None or spec > found[1]:
            found = (q, spec)
    if found is None or found[0] <= 0:
        return None
    return found
