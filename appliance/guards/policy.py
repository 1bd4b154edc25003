"""One model's or task's guards, built once from its config, and what they counted.

`Guards` holds the compiled pieces (input rules, PII masker, output rules) and applies them
to plain text; `GuardBook` builds and caches them per name from the config and keeps the
counters behind `appliance_guard_hits_total{model,rule,action,direction}` and a sampled log
of output violations (masked). No protocol knowledge: the request path and the steps call it.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import ConfigError, OutputInvalid
from .config import GuardsConfig, InputGuardsConfig
from .outcomes import GuardRejected, Hit, Violation

if TYPE_CHECKING:
    from .pii import PiiMasker
    from .rules import InputRules
    from .stream import StreamMasker
    from .validate import TextRules

log = logging.getLogger("appliance.guards")

Key = tuple[str, str, str, str]


@dataclass
class Counters:
    """Hits by (model, rule, action, direction); bumped on the event loop thread only."""

    hits: dict[Key, int] = field(default_factory=dict)

    def add(self, model: str, rule: str, action: str, direction: str, n: int = 1) -> None:
        key = (model, rule, action, direction)
        self.hits[key] = self.hits.get(key, 0) + n

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "appliance_guard_hits",
            "Guard rules that matched, by model or task, rule, action and direction",
            labels=["model", "rule", "action", "direction"],
        )
        for key, n in sorted(self.hits.items()):
            family.add_metric(list(key), n)
        yield family


class Guards:
    """The guards of one model or task."""

    def __init__(self, name: str, cfg: GuardsConfig, counters: Counters) -> None:
        self.name = name
        self.counters = counters
        self.input = input_rules(cfg.input)
        self.pii = _masker(cfg, name)
        self.pii_inputs = cfg.pii.inputs and self.pii is not None
        self.max_hold = cfg.pii.max_hold_chars
        self.output = _text_rules(cfg)
        self.output_action = cfg.output.action
        self.log_sample = cfg.output.log_sample

    @property
    def active(self) -> bool:
        return self.input is not None or self.pii is not None or self.output is not None

    # -- inputs ----------------------------------------------------------------------------
    def check_texts(
        self, texts: list[str], count_tokens: Callable[[str], int] | None = None
    ) -> list[str]:
        """Each text as the model may see it, or GuardRejected (400 naming the rule)."""
        hits: list[Hit] = []
        out = []
        try:
            if self.input is not None:
                self.input.check_count(len(texts))
            for text in texts:
                if self.input is not None:
                    text = self.input.check(text, hits, count_tokens)
                if self.pii_inputs and self.pii is not None:
                    text, found = self.pii.mask(text)
                    for f in found:
                        hits.append(Hit(f"pii_{f.entity}", "redact"))
                out.append(text)
        except GuardRejected as exc:
            self.counters.add(self.name, exc.rule, "reject", "input")
            raise
        finally:
            for hit in hits:
                self.counters.add(self.name, hit.rule, hit.action, "input")
        return out

    # -- outputs ---------------------------------------------------------------------------
    def mask(self, text: str) -> str:
        if self.pii is None:
            return text
        masked, found = self.pii.mask(text)
        for f in found:
            self.counters.add(self.name, f"pii_{f.entity}", "redact", "output")
        return masked

    def stream(self) -> StreamMasker | None:
        if self.pii is None:
            return None
        from .stream import StreamMasker  # with the masker: pii.py is imported by then

        return StreamMasker(self.pii, self.max_hold)

    def count_stream(self, masker: StreamMasker) -> None:
        if masker.found:
            self.counters.add(self.name, "pii", "redact", "output", masker.found)

    def check_output(self, text: str, model: str) -> None:
        """Raise OutputInvalid (502; `fallback` set when the task's fallback should answer)
        for a text output that breaks a rule with action reject or fallback."""
        if self.output is None:
            return
        violation = self.output.check(text)
        if violation is not None:
            self.violated(violation, text, model)

    def violated(self, violation: Violation, text: str, model: str) -> None:
        action = self.output_action
        self.counters.add(self.name, violation.rule, action, "output")
        if random.random() < self.log_sample:  # noqa: S311 - sampling, not a secret
            log.warning(
                "%s: output of model %s breaks guard rule %s (%s): %s",
                self.name, model, violation.rule, violation.detail,
                json.dumps(self.mask(text)[:500], ensure_ascii=False),
            )  # fmt: skip
        if action == "flag":
            return
        raise OutputInvalid(
            f"the output of model {model!r} breaks guard rule {violation.rule!r}: "
            f"{violation.detail}",
            rule=violation.rule,
            fallback=action == "fallback",
        )


class GuardBook:
    """Guards by model or task name. Those the config names are built at start (a bad key
    file stops the server, not a request); any other name shares the default's pieces."""

    #: Names remembered beyond the configured ones (a client may send any name).
    MAX_NAMES = 4096

    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self._default = Guards("", config.guards, self.counters)
        self._by_name: dict[str, Guards | None] = {}
        for name in (*config.models, *config.tasks):
            self._by_name[name] = self._build(name, config.guards_for(name))

    def _build(self, name: str, cfg: GuardsConfig) -> Guards | None:
        guards = Guards(name, cfg, self.counters)
        return guards if guards.active else None

    def get(self, name: str) -> Guards | None:
        """The active guards of `name`, or None (the common case costs one dict lookup)."""
        try:
            return self._by_name[name]
        except KeyError:
            pass
        found = None
        if self._default.active:
            found = copy.copy(self._default)
            found.name = name
        if len(self._by_name) < self.MAX_NAMES:
            self._by_name[name] = found
        return found


def input_rules(cfg: InputGuardsConfig) -> InputRules | None:
    """The compiled input rules of a [guards.input] section, or None when it declares none."""
    c = cfg
    limits = c.max_chars or c.max_bytes or c.max_tokens or c.max_messages or c.scripts
    if not (limits or c.control_chars != "keep" or c.rules or c.injection != "off"):
        return None
    try:
        from .rules import InputRules, Rule, injection_rules
    except ImportError as exc:  # google-re2 comes with the extra
        raise ConfigError(
            f"guards.input needs the guards extra (pip install 'appliance[guards]'): {exc}"
        ) from None
    rules = [Rule(r.name, r.literal or r.regex, r.action, literal=bool(r.literal)) for r in c.rules]
    if c.injection != "off":
        rules = injection_rules(c.injection, c.injection_off, rules)
    made = InputRules(
        max_chars=c.max_chars, max_bytes=c.max_bytes, max_tokens=c.max_tokens,
        max_messages=c.max_messages, control_chars=c.control_chars, normalize=c.normalize,
        scripts=tuple(c.scripts), rules=rules, allow=tuple(c.allow),
    )  # fmt: skip
    return made if made.active else None


def _masker(cfg: GuardsConfig, name: str) -> PiiMasker | None:
    c = cfg.pii
    if not c.entities:
        return None
    # Here, not at the top: pii.py holds ~1 MiB a device that masks nothing needs not.
    from .pii import ENTITIES, Custom, Masking, PiiMasker

    custom = [Custom(x.name, x.regex, x.max_length, x.placeholder) for x in c.custom]
    wanted = set(c.entities)
    builtin = list(ENTITIES) if "all" in wanted else [e for e in ENTITIES if e in wanted]
    # Imported now, not by the first request (phonenumbers takes ~50 ms).
    needs = [("phonenumbers", "phone" in builtin), ("stdnum.iban", "iban" in builtin),
             ("re2", bool(custom))]  # fmt: skip
    for module, wanted_now in needs:
        if wanted_now:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(
                    f"guards.pii ({name or 'default'}) needs the guards extra "
                    f"(pip install 'appliance[guards]'): {exc}"
                ) from None
    key = None
    if c.hash_key_file:
        try:
            key = Path(c.hash_key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"guards.pii.hash_key_file = {c.hash_key_file!r} ({name}): cannot read: "
                f"{exc.strerror}"
            ) from None
        if len(key) < 16:
            raise ConfigError(f"guards.pii.hash_key_file ({name}): the key must be 16+ bytes")
    default = Masking(c.style, c.keep_last, c.mask_text)
    masking = {s.entity: Masking(s.style, s.keep_last, c.mask_text) for s in c.styles}
    return PiiMasker(
        entities=builtin, regions=tuple(c.phone_regions), masking=masking, default=default,
        key=key, custom=custom,
    )  # fmt: skip


def _text_rules(cfg: GuardsConfig) -> TextRules | None:
    c = cfg.output
    if not (c.json_schema or c.json_schema_file or c.regex or c.must_parse):
        return None
    from .validate import TextRules

    schema = None
    if c.json_schema:
        schema = json.loads(c.json_schema)
    elif c.json_schema_file:
        try:
            schema = json.loads(Path(c.json_schema_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"guards.output.json_schema_file = {c.json_schema_file!r}: {exc}"
            ) from None
    rules = TextRules(json_schema=schema, regex=c.regex, must_parse=c.must_parse)
    return rules if rules.active else None


__all__ = ["GuardBook", "GuardRejected", "Guards", "OutputInvalid"]
