"""Personal data and secrets found in text by pattern *and* validation, and masked.

A bare regex masks every 16-digit number and misses a phone number written with spaces; here
each detector finds candidates with a pattern, then keeps only values that validate: Luhn for
payment cards, mod 97 for IBANs, ISO 7064 MOD 11-2 plus a real birth date and province for
Chinese resident IDs, `phonenumbers` metadata for phone numbers, `ipaddress` for IP addresses.
Every pattern is bounded by digit-run / word boundaries in ASCII, so a phone number inside an
ID, or digits glued to Chinese text, are judged as the whole run they belong to.

The built-in patterns are written for Python's `re` without nested unbounded repetition (no
catastrophic backtracking; each repetition has a small upper bound); a user's custom pattern
runs on RE2 (linear time, whatever the pattern).

Why not Presidio or LLM Guard: they need spaCy or torch and miss Chinese identifiers.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Style = Literal["placeholder", "mask", "keep_last", "hash"]

#: Every built-in entity, in the order overlaps are resolved (earlier wins).
ENTITIES = ("secret", "email", "cn_id", "iban", "card", "mac", "ipv6", "ipv4", "phone")
PLACEHOLDERS = {
    "secret": "SECRET", "email": "EMAIL", "cn_id": "CN_ID", "iban": "IBAN", "card": "CARD",
    "mac": "MAC", "ipv6": "IP", "ipv4": "IP", "phone": "PHONE",
}  # fmt: skip
DEFAULT_REGIONS = ("CN", "US")
#: A number written without "+" is read in a region only when it looks national there: many
#: digit strings (dates, counts) are valid numbers somewhere. CN: a mobile or a 0-prefixed
#: landline; US: ten digits, the area code not starting with 0 or 1.
_CN_MOBILE = re.compile(r"1[3-9]\d{9}")
_NATIONAL = {
    "CN": re.compile(r"1[3-9]\d{9}|0\d{9,11}"),
    "US": re.compile(r"[2-9]\d{9}"),
}

#: Chinese provinces (the first two digits of a resident ID).
_PROVINCES = frozenset(
    ("11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
     "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64",
     "65", "71", "81", "82", "83", "91")
)  # fmt: skip
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)

#: Each pattern starts with a literal or a character class, so `re` skips through the text
#: in C to where a value can start (a leading lookbehind would make it try every position: 10x
#: slower); the boundary is a lookbehind placed after that first character.
_PATTERNS: dict[str, tuple[str, ...]] = {
    "secret": (
        r"sk-(?<![A-Za-z0-9_-]sk-)(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,200}(?![A-Za-z0-9_-])",
        r"A(?<![A-Za-z0-9_-]A)(?:KIA|SIA)[0-9A-Z]{16}(?![A-Za-z0-9_-])",
        r"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])",
        r"gh(?<![A-Za-z0-9_-]gh)[pousr]_[A-Za-z0-9]{36,251}(?![A-Za-z0-9_-])",
        r"github_pat_(?<![A-Za-z0-9_-]github_pat_)[A-Za-z0-9_]{22,255}(?![A-Za-z0-9_-])",
        r"xox(?<![A-Za-z0-9_-]xox)[abpors]-[A-Za-z0-9-]{10,250}(?![A-Za-z0-9_-])",
        r"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{8,4096}\."
        r"[A-Za-z0-9_-]{8,4096}(?![A-Za-z0-9_-])",
        r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----"
        r"(?:[A-Za-z0-9+/=\s:,.-]{0,16384}?-----END (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----"
        r"|[A-Za-z0-9+/=\s]{0,16384})",
    ),
    "email": (
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
        r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,8}\.[A-Za-z]{2,24}"
        r"(?![A-Za-z0-9-]|\.[A-Za-z0-9])",
    ),
    "cn_id": (
        r"[1-9](?<![0-9A-Za-z][1-9])\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])"
        r"(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])",
    ),
    "iban": (
        r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?"
        r"(?![A-Za-z0-9])",
    ),
    "card": (
        r"[2-6](?<![0-9A-Za-z][2-6])(?:\d{12,18}|\d{3}([ -])\d{4}\1\d{4}\1\d{1,7}"
        r"|(?<=3)\d{3}([ -])\d{6}\2\d{5})(?![0-9A-Za-z])",
    ),
    "mac": (
        r"[0-9A-Fa-f](?<![0-9A-Za-z:.-][0-9A-Fa-f])(?:[0-9A-Fa-f]([:-])[0-9A-Fa-f]{2}"
        r"(?:\1[0-9A-Fa-f]{2}){4}|[0-9A-Fa-f]{3}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4})"
        r"(?![0-9A-Za-z]|[:.-][0-9A-Fa-f])",
    ),
    "ipv6": (
        r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{1,4}|(?=::))(?::[0-9A-Fa-f]{0,4}){2,7}"
        r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![0-9A-Za-z_]|:[0-9A-Za-z])",
    ),
    "ipv4": (r"[0-9](?<![0-9A-Za-z.][0-9])\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![0-9A-Za-z]|\.\d)",),
    "phone": (
        r"[+(0-9](?<![0-9A-Za-z+_][+(0-9])"
        r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}"
        r"|(?<=\()\d{1,4}\)[ .-]?\d{2,5}|(?<=\d)\d{1,4})"
        r"(?:[ .-]?\d{2,5}){0,4}(?![0-9A-Za-z_])",
    ),
}
#: Values found from an anchor (a fast literal) and matched from the start of the run of
#: `chars` before it, at most `reach` back: the same values as a search, far fewer tries.
_ANCHORS: dict[str, tuple[str, str, int]] = {
    "email": ("@", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-", 65),
    "ipv6": (r":(?=[0-9A-Fa-f]{0,4}:)", "0123456789ABCDEFabcdef:", 45),
}

#: Characters a value of a built-in entity may hold besides single spaces between groups.
WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@._%+-:()")
_SEP = re.compile(r"[ .-]")
_DIGITS = re.compile(r"\d")


# -- validators: the candidate's text -> the value's length (a candidate may be trimmed), or 0


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def cn_id_ok(value: str) -> bool:
    """18 characters, province, a real birth date not in the future, MOD 11-2 check digit."""
    if len(value) != 18 or value[:2] not in _PROVINCES:
        return False
    try:
        born = datetime.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if born > datetime.date.today():
        return False
    total = sum(int(c) * w for c, w in zip(value[:17], _CN_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == value[17].upper()


def _id_shaped(digits: str) -> bool:
    """18 digits carrying a birth date where an ID has one: never a card number."""
    if len(digits) != 18 or digits[:2] not in _PROVINCES:
        return False
    try:
        datetime.date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    except ValueError:
        return False
    return 1800 <= int(digits[6:10]) <= 2099


def _card(value: str) -> int:
    digits = value.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19 or _id_shaped(digits):
        return 0
    return len(value) if luhn_ok(digits) else 0


def mod97_ok(value: str) -> bool:
    """ISO 13616's check: the IBAN rotated and read in base 36 is 1 modulo 97."""
    compact = value.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rotated = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rotated)) % 97 == 1


def _iban(value: str) -> int:
    from stdnum import iban

    # A trailing group may be the next word in capitals ("... 7654 32 THE"): longest first.
    # mod 97 first (cheap); python-stdnum then checks the country's length and format.
    for cut in _cuts(value, " "):
        if mod97_ok(value[:cut]) and iban.is_valid(value[:cut]):
            return cut
    return 0


def _cn_id(value: str) -> int:
    return len(value) if cn_id_ok(value) else 0


def _ipv4(value: str) -> int:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return 0
    return len(value)


def _ipv6(value: str) -> int:
    text = value[:-1] if value.endswith(":") and not value.endswith("::") else value
    groups = [g for g in re.split(r"[:.]", text) if g]
    if len(groups) < 2 and text != "::1":
        return 0
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return 0
    return len(text)


def _mac(value: str) -> int:
    return len(value)


def _email(value: str) -> int:
    local = value.partition("@")[0]
    return 0 if local.endswith(".") or ".." in value else len(value)


def _secret(value: str) -> int:
    if value.startswith("eyJ"):  # a JWT: its header must be base64url JSON naming "alg"
        head = value.partition(".")[0]
        try:
            decoded = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
        except (binascii.Error, ValueError):
            return 0
        return len(value) if b'"alg"' in decoded else 0
    return len(value)


def _cuts(value: str, seps: str) -> list[int]:
    """Lengths to try, longest first: the whole value, then up to each separator."""
    return [len(value)] + [i for i in range(len(value) - 1, 0, -1) if value[i] in seps]


@dataclass
class _Phone:
    regions: tuple[str, ...]

    def __call__(self, value: str) -> int:
        import phonenumbers

        if len(_DIGITS.findall(value)) < 7:
            return 0
        for cut in _cuts(value, " .-"):
            text = value[:cut]
            if text[-1] in " .-(":
                continue
            plain = "".join(_DIGITS.findall(text))
            if not 7 <= len(plain) <= 17:
                continue
            if text.startswith("+") or plain.startswith("00"):  # international ("00": IDD)
                digits = plain[2:] if plain.startswith("00") else plain
                # Chinese mobiles: 1[3-9] and nine digits (every block, even those
                # phonenumbers' metadata does not list yet).
                if digits.startswith("86") and _CN_MOBILE.fullmatch(digits[2:]):
                    return cut
                if _valid_number(phonenumbers, "+" + digits, None):
                    return cut
                continue
            if "CN" in self.regions and _CN_MOBILE.fullmatch(plain):
                return cut
            for region in self.regions:
                shape = _NATIONAL.get(region)
                if shape is not None and not shape.fullmatch(plain):
                    continue
                if _valid_number(phonenumbers, text, region):
                    return cut
        return 0


def _valid_number(phonenumbers: Any, text: str, region: str | None) -> bool:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(number)) and len(text) <= 40


# -- masking ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """One value found: where, which entity, and its text."""

    start: int
    end: int
    entity: str
    value: str


@dataclass
class Masking:
    """How one entity's values are replaced."""

    style: Style = "placeholder"
    #: keep_last: characters (letters and digits) left visible at the end.
    keep_last: int = 4
    #: mask: the fixed text put instead of the value.
    mask_text: str = "****"
    placeholder: str = ""

    def apply(self, value: str, key: bytes | None) -> str:
        if self.style == "placeholder":
            return f"<{self.placeholder}>"
        if self.style == "mask":
            return self.mask_text
        if self.style == "keep_last":
            keep, out = self.keep_last, []
            for ch in reversed(value):
                if ch.isalnum():
                    out.append(ch if keep > 0 else "*")
                    keep -= 1
                else:
                    out.append(ch)
            return "".join(reversed(out))
        if key is None:  # config checks this; a library caller gets a plain error
            raise ValueError("style 'hash' needs a key")
        digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
        return f"<{self.placeholder}:{digest}>"


@dataclass
class Detector:
    entity: str
    patterns: Sequence[Any]  # re.Pattern or an re2 pattern: both have finditer
    validate: Callable[[str], int]
    #: Worth running only when the text holds one of these characters ("" = always).
    needs: str = ""
    #: Longest value (custom patterns: what a stream must hold back).
    max_length: int = 0


@dataclass
class Custom:
    """A user's pattern (RE2 syntax): every match is a value of entity `name`."""

    name: str
    regex: str
    max_length: int = 64
    placeholder: str = ""


@dataclass
class PiiMasker:
    """Find and mask the configured entities in text (thread-safe, no state per call)."""

    entities: Sequence[str] = ENTITIES
    regions: Sequence[str] = DEFAULT_REGIONS
    masking: dict[str, Masking] = field(default_factory=dict)
    default: Masking = field(default_factory=Masking)
    key: bytes | None = None
    custom: Sequence[Custom] = ()
    detectors: list[Detector] = field(init=False)

    def __post_init__(self) -> None:
        unknown = [e for e in self.entities if e not in ENTITIES]
        if unknown:
            raise ValueError(f"unknown entity {unknown[0]!r} (known: {', '.join(ENTITIES)})")
        validators: dict[str, Callable[[str], int]] = {
            "secret": _secret, "email": _email, "cn_id": _cn_id, "iban": _iban, "card": _card,
            "mac": _mac, "ipv6": _ipv6, "ipv4": _ipv4, "phone": _Phone(tuple(self.regions)),
        }  # fmt: skip
        needs = {"email": "@", "ipv6": ":", "mac": ":-.", "ipv4": "."}
        self.detectors = []
        for c in self.custom:
            import re2

            self.detectors.append(Detector(c.name, [re2.compile(c.regex)], len, "", c.max_length))
        for entity in ENTITIES:
            if entity in self.entities:
                self.detectors.append(
                    Detector(entity, _compiled(entity), validators[entity], needs.get(entity, ""))
                )
        for d in self.detectors:
            m = self.masking.setdefault(d.entity, Masking(**vars(self.default)))
            if not m.placeholder:
                custom = next((c.placeholder for c in self.custom if c.name == d.entity), "")
                m.placeholder = custom or PLACEHOLDERS.get(d.entity, d.entity.upper())
            if m.style == "hash" and self.key is None:
                raise ValueError(f"{d.entity}: style 'hash' needs a key")

    @property
    def custom_span(self) -> int:
        """What a stream holds back for the custom patterns (they may hold any character)."""
        return max((d.max_length for d in self.detectors if d.max_length), default=0)

    def find(self, text: str, start: int = 0) -> list[Found]:
        """The values in `text` (those starting before `start` are context only), in order,
        without overlaps: where two detectors claim a span the earlier detector wins."""
        taken: list[Found] = []
        starts: list[int] = []  # taken's starts, sorted
        has_digit = _DIGITS.search(text, start) is not None
        for d in self.detectors:
            if d.needs and not any(c in text for c in d.needs):
                continue
            if d.entity in _DIGIT_ENTITIES and not has_digit:
                continue
            for s, candidate in _candidates(d, text, start):
                i = bisect.bisect_right(starts, s)
                if i and taken[i - 1].end > s:
                    continue  # starts inside another value
                if i < len(taken) and taken[i].start < s + len(candidate):
                    # runs into the next value: only the part before it may be one
                    candidate = candidate[: taken[i].start - s].rstrip(" .-(")
                    if not candidate:
                        continue
                length = d.validate(candidate)
                if not length:
                    continue
                e = s + length
                i = bisect.bisect_left(starts, s)
                if (i < len(taken) and taken[i].start < e) or (i and taken[i - 1].end > s):
                    continue
                starts.insert(i, s)
                taken.insert(i, Found(s, e, d.entity, text[s:e]))
        return taken

    def replace(self, text: str, found: Iterable[Found], lo: int = 0, hi: int | None = None) -> str:
        """text[lo:hi] with each value in `found` (all inside it) replaced."""
        hi = len(text) if hi is None else hi
        out, pos = [], lo
        for f in found:
            out.append(text[pos : f.start])
            out.append(self.masking[f.entity].apply(f.value, self.key))
            pos = f.end
        out.append(text[pos:hi])
        return "".join(out)

    def mask(self, text: str) -> tuple[str, list[Found]]:
        found = self.find(text)
        return (self.replace(text, found) if found else text), found


def _candidates(d: Detector, text: str, start: int) -> Iterator[tuple[int, str]]:
    anchor = _ANCHOR_RES.get(d.entity) if d.entity in _PATTERNS else None
    if anchor is None:
        for pattern in d.patterns:
            for m in pattern.finditer(text, start):
                yield m.start(), m.group()
        return
    chars, reach = _ANCHORS[d.entity][1:]
    (pattern,) = d.patterns
    pos, tried = start, -1
    while True:
        a = anchor.search(text, pos)
        if a is None:
            return
        s = a.start()
        floor = max(start, s - reach)
        while s > floor and text[s - 1] in chars:
            s -= 1
        pos = a.end()
        if s == tried:
            continue
        tried = s
        m = pattern.match(text, s)
        if m is not None and m.end() > a.start():
            yield s, m.group()
            pos = max(pos, m.end())


_DIGIT_ENTITIES = frozenset({"cn_id", "iban", "card", "ipv4", "phone"})
_COMPILED: dict[str, list[re.Pattern[str]]] = {}
_ANCHOR_RES = {entity: re.compile(a[0]) for entity, a in _ANCHORS.items()}


def _compiled(entity: str) -> list[re.Pattern[str]]:
    patterns = _COMPILED.get(entity)
    if patterns is None:
        patterns = _COMPILED[entity] = [re.compile(p) for p in _PATTERNS[entity]]
    return patterns
