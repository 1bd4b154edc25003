"""Rules on the text a client sends: limits, hygiene, deny/allow patterns, prompt injection.

Order per text: limits (characters, bytes, tokens; the number of messages across a request),
invisible and control characters (Unicode Cc/Cf/Co, newline and tab excepted) stripped or
refused, then matching on the NFKC form (full-width letters and ligatures read as what they
look like): allowed scripts, allow patterns blanked out, then deny rules and the built-in
prompt-injection rules. Each rule has an action: `reject` (InvalidInput naming the rule: the
text never reaches the model), `redact` (the match replaced by `[REDACTED]`), `flag` (counted
and logged only).

Patterns run on RE2 (google-re2): linear time in the text whatever the pattern, so a user's
regex cannot hang the server (Python's `re` backtracks; the `regex` module's timeout bounds
the damage but still burns the time). All patterns run as one RE2 set: one pass over the text
tells which rules matched, and only those run again to find positions.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

from .outcomes import GuardRejected, Hit
from .patterns import INJECTION

Action = Literal["reject", "redact", "flag"]
REDACTED = "[REDACTED]"

#: Unicode Cc/Cf/Co characters but tab, newline and carriage return (built on first use): the
#: Basic Multilingual Plane's in one class, the rest in another, tried only when the text has
#: characters beyond the BMP (a class mixing both is 60x slower to scan in `re`).
_invisible: tuple[re.Pattern[str], re.Pattern[str]] | None = None
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def invisible() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Controls, format characters (zero-width, bidi overrides, tags) and private use, as
    Python character classes: scanning a 4 KB prompt takes microseconds (RE2's Python wrapper
    maps positions in non-ASCII text slowly)."""
    global _invisible
    if _invisible is None:

        def cf(codes: Iterable[int]) -> str:
            return "".join(re.escape(chr(c)) for c in codes if unicodedata.category(chr(c)) == "Cf")

        bmp = f"[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f{cf(range(0x10000))}\\ue000-\\uf8ff]"
        astral = cf(itertools.chain(range(0x10000, 0x20000), range(0xE0000, 0xE1000)))
        private = "\\U000f0000-\\U000ffffd\\U00100000-\\U0010fffd"
        _invisible = (re.compile(bmp), re.compile(f"[{astral}{private}]"))
    return _invisible


def find_invisible(text: str) -> re.Match[str] | None:
    bmp, astral = invisible()
    found = bmp.search(text)
    if found is None and _ASTRAL.search(text) is not None:
        found = astral.search(text)
    return found


def strip_invisible(text: str) -> str:
    bmp, astral = invisible()
    return astral.sub("", bmp.sub("", text))


__all__ = ["GuardRejected", "Hit", "InputRules", "Rule", "injection_rules"]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str
    action: Action = "reject"
    literal: bool = False


@dataclass
class InputRules:
    max_chars: int = 0
    max_bytes: int = 0
    max_tokens: int = 0
    max_messages: int = 0
    control_chars: Literal["strip", "reject", "keep"] = "strip"
    normalize: bool = True
    #: Allowed Unicode scripts (RE2 names: Latin, Han, Cyrillic, ...); Common and Inherited
    #: (digits, punctuation, combining marks) always pass. Empty: any script.
    scripts: Sequence[str] = ()
    rules: Sequence[Rule] = ()
    #: Patterns whose matches are exempt from the deny rules (a known-good phrase).
    allow: Sequence[str] = ()
    _set: Any = field(init=False, default=None)
    _each: list[Any] = field(init=False, default_factory=list)
    _scripts: Any = field(init=False, default=None)
    _allow: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.control_chars != "keep":
            invisible()
        options = re2.Options()
        options.case_sensitive = False
        if self.rules:
            self._set = re2.Set.SearchSet(options)
            for rule in self.rules:
                self._set.Add(_source(rule))
                self._each.append(re2.compile(_source(rule), options))
            self._set.Compile()
        if self.scripts:
            allowed = "".join(rf"\p{{{s}}}" for s in (*self.scripts, "Common", "Inherited"))
            self._scripts = re2.compile(rf"[^{allowed}\s]")
        if self.allow:
            self._allow = re2.compile("|".join(f"(?:{a})" for a in self.allow), options)

    @property
    def active(self) -> bool:
        return bool(
            self.max_chars or self.max_bytes or self.max_tokens or self.max_messages
            or self.control_chars != "keep" or self.scripts or self.rules
        )  # fmt: skip

    def check_count(self, messages: int) -> None:
        if self.max_messages and messages > self.max_messages:
            raise GuardRejected(
                "max_messages", f"{messages} messages, at most {self.max_messages} allowed"
            )

    def check(
        self, text: str, hits: list[Hit], count_tokens: Callable[[str], int] | None = None
    ) -> str:
        """The text as the model may see it (stripped, redacted), or GuardRejected."""
        if self.max_chars and len(text) > self.max_chars:
            raise GuardRejected(
                "max_chars", f"{len(text)} characters, at most {self.max_chars} allowed"
            )
        if self.max_bytes:
            size = len(text.encode("utf-8"))
            if size > self.max_bytes:
                raise GuardRejected("max_bytes", f"{size} bytes, at most {self.max_bytes} allowed")
        if self.max_tokens and count_tokens is not None:
            n = count_tokens(text)
            if n > self.max_tokens:
                raise GuardRejected("max_tokens", f"{n} tokens, at most {self.max_tokens} allowed")
        if self.control_chars != "keep":
            text = self._invisible(text, hits)
        view = unicodedata.normalize("NFKC", text) if self.normalize else text
        if self._scripts is not None:
            m = self._scripts.search(view)
            if m is not None:
                raise GuardRejected(
                    "scripts", f"character {m.group()!r} is not in the allowed scripts "
                    f"({', '.join(self.scripts)})"
                )  # fmt: skip
        if self._set is None:
            return text
        if self._allow is not None:
            view = self._allow.sub(lambda m: " " * len(m.group()), view)
        matched = self._set.Match(view)
        if not matched:
            return text
        redact = []
        for i in sorted(matched):
            rule = self.rules[i]
            hits.append(Hit(rule.name, rule.action))
            if rule.action == "reject":
                raise GuardRejected(rule.name, "the input matches a denied pattern")
            if rule.action == "redact":
                redact.append(self._each[i])
        if redact:
            # Redaction rewrites the normalized view: what the model sees is what was matched.
            for pattern in redact:
                view = str(pattern.sub(REDACTED, view))
            return view
        return text

    def _invisible(self, text: str, hits: list[Hit]) -> str:
        found = find_invisible(text)
        if found is None:
            return text
        if self.control_chars == "reject":
            raise GuardRejected(
                "control_chars", f"invisible or control character U+{ord(found.group()):04X}"
            )
        hits.append(Hit("control_chars", "redact"))
        return strip_invisible(text)


def _source(rule: Rule) -> str:
    return re2.escape(rule.pattern) if rule.literal else rule.pattern


def injection_rules(
    action: Action, off: Sequence[str] = (), extra: Sequence[Rule] = ()
) -> list[Rule]:
    """The built-in prompt-injection rules with `action`, less those in `off`, plus `extra`."""
    unknown = [name for name in off if name not in INJECTION]
    if unknown:
        raise ValueError(f"unknown built-in rule {unknown[0]!r} (known: {', '.join(INJECTION)})")
    out = [Rule(name, pattern, action) for name, pattern in INJECTION.items() if name not in off]
    return out + list(extra)
