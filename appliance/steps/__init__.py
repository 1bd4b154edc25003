"""Steps by `type`, imported lazily: a device loads only the steps its models declare.

Built-in steps live one per module here. Installed packages add steps through the
`appliance.steps` entry-point group (`type = "module:Class"`, a `Step` subclass); a built-in
type cannot be taken over. A declaration naming an unknown type, or a plugin that does not
import, is a ModelError naming the type: at `models add` it refuses the model, at load only
the models using it are not ready.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..errors import ModelError
from ..plugins import entries
from .base import PLUGIN_OF, Step, StepContext

#: type -> "module:Class"
_STEPS: dict[str, str] = {
    # today's processing, as steps
    "image": "appliance.steps.image:ImageStep",
    "classification": "appliance.steps.classify:ClassifyStep",
    "text": "appliance.steps.text:TextStep",
    "embedding": "appliance.steps.text:EmbeddingStep",
    # built-ins for detectors, classifiers and text outputs
    "letterbox": "appliance.steps.letterbox:LetterboxStep",
    "resize": "appliance.steps.letterbox:ResizeStep",
    "crop": "appliance.steps.crop:CropStep",
    "nms": "appliance.steps.nms:NmsStep",
    "threshold": "appliance.steps.select:ThresholdStep",
    "top_k": "appliance.steps.select:TopKStep",
    "argmax_label": "appliance.steps.label:ArgmaxLabelStep",
    "cast": "appliance.steps.tensor:CastStep",
    "reshape": "appliance.steps.tensor:ReshapeStep",
    "json_field": "appliance.steps.json_field:JsonFieldStep",
    # guardrails (appliance/guards/)
    "input_rules": "appliance.steps.guards:InputRulesStep",
    "pii_mask": "appliance.steps.guards:PiiMaskStep",
    "validate": "appliance.steps.guards:ValidateStep",
}

#: The entry-point group plugins register steps in.
ENTRY_POINT_GROUP = "appliance.steps"


def plugins() -> dict[str, tuple[str, str]]:
    """Steps installed packages add: type -> ("module:Class", distribution name)."""
    return entries(ENTRY_POINT_GROUP, _STEPS)


def types() -> list[str]:
    return sorted({*_STEPS, *plugins()})


def get_step(type_: str) -> type[Step]:
    """The step class for `type_`; a plugin that does not import names itself and the error."""
    target = _STEPS.get(type_)
    dist = None
    if target is None:
        found = plugins().get(type_)
        if found is None:
            raise ModelError(f"unknown step type {type_!r} (known: {', '.join(types())})")
        target, dist = found
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a plugin may fail in any way while importing
        origin = f"plugin {dist!r}" if dist else "built-in"
        raise ModelError(
            f"step type {type_!r} ({origin}) is not available: {type(exc).__name__}: {exc}"
        ) from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise ModelError(f"step type {type_!r}: {target} is not a Step class")
    if dist is not None:
        PLUGIN_OF[type_] = dist
    return cls


def parse_step(config: Any, ctx: StepContext) -> Step:
    """Build one step from its declaration, or say exactly what is wrong with it."""
    if not isinstance(config, Mapping):
        raise ModelError(f"{ctx.where}: a step is a JSON object with a 'type', got {config!r}")
    type_ = config.get("type")
    if not isinstance(type_, str):
        raise ModelError(f"{ctx.where}: type: a step needs a 'type' (one of {', '.join(types())})")
    return get_step(type_).parse(config, ctx)
