"""Guardrails: rules on what clients send, PII masking and validation of what models answer.

A library with no protocol knowledge: `rules` (input limits, hygiene, deny/allow patterns,
prompt injection), `pii` (detectors with validation, masking styles), `stream` (masking text
that arrives in pieces), `validate` (checks on outputs), `config` (the [guards] section) and
`policy` (one model's or task's guards built from its config, with their counters). The
request path applies them to every front; steps (appliance/steps/guards.py) apply them to
tensors inside a model's or pipeline's steps.
"""

# appliance.config first: its [guards] section is defined in .config, which uses its helpers.
from .. import config as _config  # noqa: F401
