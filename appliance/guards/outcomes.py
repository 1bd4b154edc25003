"""What a guard reports: a rule that matched an input, a refusal, a broken output rule
(plain Python: importing them costs nothing and needs no extra)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput


@dataclass
class Hit:
    """A rule that matched a text: for metrics and the log (never the text itself)."""

    rule: str
    action: str


class GuardRejected(InvalidInput):
    """A guard refused the input: 400 naming the rule."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"refused by guard rule {rule!r}: {message}")
        self.rule = rule
        self.param = "guards"


@dataclass
class Violation:
    """An output rule broken, with a detail for the error message."""

    rule: str
    detail: str
