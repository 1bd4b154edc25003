"""Masking text that arrives in pieces (LLM tokens): release only what can no longer change.

Checking each chunk alone leaks a value split across two chunks (`+86 138` / `0013 8000`, a
known LiteLLM bug). Here the text is held back from the earliest point where a value could
still be in progress: the trailing word of characters a value may hold, the groups before it
joined by single spaces when they look like number groups ("+86 138 "), an unfinished PEM
block, and the last `custom_span` characters when custom patterns are on. Everything before
that point is masked with the whole held text as context and released; `flush` masks the rest.

The result equals masking the whole text at once (tests/guards: property-based), as long as
no single value is longer than `max_hold` characters (a longer run is released in part).
"""

from __future__ import annotations

import re

from .pii import WORD_CHARS, PiiMasker

#: Raw characters kept before the held text: the boundary checks look one character back.
_CONTEXT = 8
#: Most characters of space-joined groups ("DE89 3704 0044 0532 0130 00") held back.
_GROUPS_SPAN = 64
_BEGIN = "-----BEGIN "
_END = re.compile(r"-----END (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----")


def _group_like(token: str) -> bool:
    """A token that may be one group of a spaced number (a digit in it, or IBAN's capitals)."""
    return any(c.isdigit() for c in token) or (len(token) <= 4 and token.isupper())


def hold_from(text: str, lo: int, max_hold: int, custom_span: int = 0) -> int:
    """Where the part of `text` that may still change starts (never before `lo`)."""
    end = len(text)
    h = end
    while h > lo and text[h - 1] in WORD_CHARS:
        h -= 1
    if h == end or _group_like(text[h:end]):
        while h - 1 > lo and text[h - 1] == " ":
            j = k = h - 1
            while k > lo and text[k - 1] in WORD_CHARS:
                k -= 1
            if k == j or end - k > _GROUPS_SPAN or not _group_like(text[k:j]):
                break
            h = k
    begin = text.rfind(_BEGIN, max(lo, end - max_hold))
    if begin >= 0 and _END.search(text, begin) is None:
        h = min(h, begin)
    if custom_span:
        h = min(h, end - custom_span)
    return max(h, lo, end - max_hold)


class StreamMasker:
    """Feed pieces of text, get back what is safe to release; `flush` at the end."""

    def __init__(self, masker: PiiMasker, max_hold: int = 8192) -> None:
        self.masker = masker
        self.max_hold = max_hold
        self._custom = masker.custom_span
        #: Released raw text kept as context, then the held text.
        self._text = ""
        self._lo = 0
        #: Every value masked so far (for metrics).
        self.found = 0

    def feed(self, piece: str) -> str:
        text = self._text + piece
        lo = self._lo
        cut = hold_from(text, lo, self.max_hold, self._custom)
        if cut <= lo:
            self._text = text
            return ""
        found = self.masker.find(text, lo)
        for f in reversed(found):  # a value across the cut: hold it whole
            if f.start < cut < f.end:
                cut = f.start
        if cut <= lo:
            self._text = text
            return ""
        done = [f for f in found if f.end <= cut]
        self.found += len(done)
        out = self.masker.replace(text, done, lo, cut) if done else text[lo:cut]
        keep = max(0, cut - _CONTEXT)
        self._text, self._lo = text[keep:], cut - keep
        return out

    def flush(self) -> str:
        text, lo = self._text, self._lo
        self._text, self._lo = "", 0
        if lo >= len(text):
            return ""
        found = self.masker.find(text, lo)
        self.found += len(found)
        return self.masker.replace(text, found, lo) if found else text[lo:]
