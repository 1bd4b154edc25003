"""The `[guards]` section: the server-wide default; `[models.NAME.guards]` and
`[tasks.NAME.guards]` tables override it key by key for one model or task.

    [guards.input]
    injection = "reject"                 # the built-in prompt-injection rules
    control_chars = "strip"
    max_chars = 20000
    [[guards.input.rules]]
    name = "no_passwords"
    regex = "password\\s*[:=]"
    action = "redact"

    [guards.pii]
    entities = ["all"]   # or some of: email phone card iban cn_id ipv4 ipv6 mac secret
    style = "placeholder"                # <EMAIL>; mask, keep_last, hash (HMAC: hash_key_file)

    [guards.output]
    must_parse = "json"
    action = "fallback"                  # reject (502) | fallback (the task's fallback) | flag

Everything is off by default: a server answers what its models say until told otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ..config import Invalid, _build, at_least, between, matches
from .patterns import INJECTION, valid_pattern

T = TypeVar("T")
_RULE_NAME = matches(
    r"[a-z][a-z0-9_]{0,63}", "must be a rule name: a lowercase letter, then up to 63 of a-z 0-9 _"
)


@dataclass
class GuardRuleConfig:
    """One deny rule ([[guards.input.rules]]): a literal phrase or an RE2 pattern."""

    name: str = field(default="", metadata=_RULE_NAME)
    literal: str = ""
    regex: str = ""
    action: Literal["reject", "redact", "flag"] = "reject"

    def check(self) -> None:
        if not self.name:
            raise Invalid("name", "a rule needs a name (it is what a refusal names)")
        if bool(self.literal) == bool(self.regex):
            raise Invalid("regex", "give exactly one of literal and regex")
        if self.regex:
            try:
                valid_pattern(self.regex)
            except ValueError as exc:
                raise Invalid("regex", str(exc)) from None


@dataclass
class InputGuardsConfig:
    """Rules on the text a client sends (guards/rules.py); 0 = no limit."""

    max_chars: int = 0
    max_bytes: int = 0
    #: Counted with the model's tokenizer where one is known.
    max_tokens: int = 0
    #: Messages of a chat.
    max_messages: int = 0
    #: Unicode Cc/Cf/Co characters (zero-width, bidi controls; newline and tab kept).
    control_chars: Literal["keep", "strip", "reject"] = "keep"
    #: Match on the NFKC form (full-width letters read as letters).
    normalize: bool = True
    #: Allowed scripts (RE2 names: Latin, Han, Cyrillic...); empty = any.
    scripts: list[str] = field(default_factory=list)
    #: The built-in prompt-injection rules (English and Chinese): their action, or off.
    injection: Literal["off", "reject", "redact", "flag"] = "off"
    #: Built-in rules turned off by name.
    injection_off: list[str] = field(default_factory=list)
    rules: list[GuardRuleConfig] = field(default_factory=list)
    #: RE2 patterns whose matches no deny rule sees (a known-good phrase).
    allow: list[str] = field(default_factory=list)

    def check(self) -> None:
        for i, name in enumerate(self.injection_off):
            if name not in INJECTION:
                raise Invalid(
                    f"injection_off[{i}]", f"no such built-in rule (known: {', '.join(INJECTION)})",
                    name,
                )  # fmt: skip
        for i, script in enumerate(self.scripts):
            try:
                valid_pattern(rf"\p{{{script}}}")
            except ValueError:
                raise Invalid(
                    f"scripts[{i}]", "not a Unicode script name RE2 knows", script
                ) from None
        for i, pattern in enumerate(self.allow):
            try:
                valid_pattern(pattern)
            except ValueError as exc:
                raise Invalid(f"allow[{i}]", str(exc), pattern) from None
        names = [r.name for r in self.rules]
        for i, name in enumerate(names):
            if name in names[:i] or name in INJECTION:
                raise Invalid(f"rules[{i}].name", "another rule has this name", name)


Style = Literal["placeholder", "mask", "keep_last", "hash"]


@dataclass
class PiiStyleConfig:
    """How one entity is masked when not like the rest ([[guards.pii.styles]])."""

    entity: str = ""
    style: Style = "placeholder"
    keep_last: int = 4


@dataclass
class CustomPiiConfig:
    """A pattern of your own ([[guards.pii.custom]]), masked like a built-in entity."""

    name: str = field(default="", metadata=_RULE_NAME)
    regex: str = ""
    #: Longest value: what a stream holds back while a value may be in progress.
    max_length: int = field(default=64, metadata=between(1, 4096))
    placeholder: str = ""

    def check(self) -> None:
        if not self.name:
            raise Invalid("name", "a custom entity needs a name")
        try:
            valid_pattern(self.regex or "(")
        except ValueError as exc:
            raise Invalid("regex", str(exc)) from None


@dataclass
class PiiGuardsConfig:
    """Personal data and secrets masked in outputs (guards/pii.py)."""

    #: Entities to find: "all", or names from email, phone, card, iban, cn_id, ipv4, ipv6,
    #: mac, secret. Empty: no masking.
    entities: list[str] = field(default_factory=list)
    style: Style = "placeholder"
    keep_last: int = 4
    mask_text: str = "****"
    styles: list[PiiStyleConfig] = field(default_factory=list)
    #: The HMAC key of style "hash" (the same value, the same token: logs stay joinable).
    hash_key_file: str = ""
    #: Regions a number without "+" is read in (ISO 3166 codes).
    phone_regions: list[str] = field(default_factory=lambda: ["CN", "US"])
    custom: list[CustomPiiConfig] = field(default_factory=list)
    #: Also mask the client's text before the model sees it.
    inputs: bool = False
    #: Most characters a stream holds back while a value may be in progress.
    max_hold_chars: int = field(default=8192, metadata=at_least(256))

    def check(self) -> None:
        if self.entities or self.styles:
            from .pii import ENTITIES  # only a section naming entities needs pii.py (~1 MiB)

            known = {*ENTITIES, "all", *(c.name for c in self.custom)}
            for i, entity in enumerate(self.entities):
                if entity not in known:
                    raise Invalid(
                        f"entities[{i}]", f"must be one of {', '.join(sorted(known))}", entity
                    )
            for i, s in enumerate(self.styles):
                if s.entity not in known - {"all"}:
                    raise Invalid(f"styles[{i}].entity", "not a known entity", s.entity)
        hashed = self.style == "hash" or any(s.style == "hash" for s in self.styles)
        if hashed and not self.hash_key_file:
            raise Invalid("hash_key_file", "style 'hash' needs a key file")
        for i, region in enumerate(self.phone_regions):
            if not (len(region) == 2 and region.isalpha() and region.isupper()):
                raise Invalid(f"phone_regions[{i}]", "must be an ISO 3166 code like CN", region)


@dataclass
class OutputGuardsConfig:
    """Checks on text outputs (guards/validate.py)."""

    #: A JSON Schema, as JSON text.
    json_schema: str = ""
    #: Or a file holding one.
    json_schema_file: str = ""
    #: RE2 pattern the whole output must match.
    regex: str = ""
    must_parse: Literal["", "json", "xml"] = ""
    action: Literal["reject", "fallback", "flag"] = "reject"
    #: Share of violations written to the log (masked); all are counted.
    log_sample: float = field(default=0.1, metadata=between(0, 1))

    def check(self) -> None:
        if self.json_schema and self.json_schema_file:
            raise Invalid("json_schema_file", "give json_schema or json_schema_file, not both")
        if self.json_schema:
            import jsonschema

            try:
                schema = json.loads(self.json_schema)
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except (ValueError, jsonschema.SchemaError) as exc:
                raise Invalid("json_schema", f"not a valid JSON Schema: {exc}") from None
        if self.regex:
            try:
                valid_pattern(self.regex)
            except ValueError as exc:
                raise Invalid("regex", str(exc)) from None


@dataclass
class GuardsConfig:
    input: InputGuardsConfig = field(default_factory=InputGuardsConfig)
    pii: PiiGuardsConfig = field(default_factory=PiiGuardsConfig)
    output: OutputGuardsConfig = field(default_factory=OutputGuardsConfig)


def build_section(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """One of these sections from a plain mapping (a step's declaration), checked like the
    config file: ConfigError naming the key."""
    return _build(cls, values, where)
