"""Turning raw client data (images, text) into input tensors and outputs into answers.

A manifest's `preprocess` / `postprocess` objects name a `type`; one module here per type.
"""

from typing import Any

from ..errors import ModelError
from ..tensors import TensorSpec


def declared_tensor(
    obj: dict[str, Any],
    section: str,
    known: frozenset[str],
    key: str,
    tensors: tuple[TensorSpec, ...],
    what: str,
) -> TensorSpec:
    """Refuse unknown keys in a `preprocess`/`postprocess` declaration, and find the model
    tensor its `key` names (the model's only one when it names none)."""
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ModelError(
            f"{what}: {section} has unknown keys {', '.join(unknown)} (known: "
            f"{', '.join(sorted(known))})"
        )
    name = obj.get(key)
    if name is None:
        if len(tensors) != 1:
            raise ModelError(
                f"{what}: {section}.{key} = None: needed: the model has several {key}s"
            )
        return tensors[0]
    by_name = {t.name: t for t in tensors}
    spec = by_name.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ModelError(
            f"{what}: {section}.{key} = {name!r}: no such model {key} ({', '.join(by_name)})"
        )
    return spec
