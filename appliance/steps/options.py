"""Reading a step's declaration and a request's parameters: one checker per kind of value.

Every built-in step parses its config with these, so a wrong declaration is refused the same
way everywhere (`ctx.bad` naming the key and saying what it must be) and a wrong request
parameter is an InvalidInput naming the parameter. The tensor names a step reads and writes
are roles (`boxes`, `scores`, `image`, ...) with the role as default name; a declaration
renames them with `inputs` / `outputs` objects (role -> tensor name), so one step works around
a model (the model's tensor names) and inside a pipeline (the roles themselves).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..tensors import DATATYPES, FLOAT_TYPES, INT_TYPES, TensorSpec
from .base import Array, StepContext

NUMERIC_TYPES = FLOAT_TYPES | INT_TYPES | {"BOOL"}
LAYOUTS = ("NCHW", "NHWC")
#: The keys every step that reads or writes named tensors takes.
NAME_KEYS = frozenset({"inputs", "outputs"})


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Names:
    """Role -> tensor name for what a step reads (present roles only) and writes."""

    inputs: dict[str, str]
    outputs: dict[str, str]
    #: the optional roles among `inputs`
    maybe: frozenset[str] = frozenset()

    @property
    def optional(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for r, n in self.inputs.items() if r in self.maybe))

    @property
    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.inputs.values()))

    @property
    def writes(self) -> tuple[str, ...]:
        return tuple(self.outputs.values())

    def describe(self) -> dict[str, Any]:
        return {"inputs": dict(self.inputs), "outputs": dict(self.outputs)}


def names(
    config: Mapping[str, Any],
    ctx: StepContext,
    reads: Sequence[str],
    writes: Sequence[str],
    optional: Sequence[str] = (),
    same_as: Mapping[str, str] | None = None,
) -> Names:
    """The tensor names of a step's roles, from its `inputs` / `outputs` renames.

    An optional input role is read when the declaration names it, when `ctx.available` holds
    its name, or when nothing is known yet; it is then in the step's `optional` too, and at run
    the step reads it only if present. A required name missing from `ctx.available` is not
    refused here: what the caller knows may be partial (a spec not known before a model loads),
    and the callers check what a step reads against what exists (the model chain against the
    model's outputs, a pipeline against the node's `inputs`), each with its own message.
    `same_as` maps an output role to an input role whose name it takes by default (a cast
    writes the tensor it reads)."""
    given_in = _renames(config, "inputs", (*reads, *optional), ctx)
    given_out = _renames(config, "outputs", writes, ctx)
    inputs: dict[str, str] = {}
    for role in (*reads, *optional):
        name = given_in.get(role, role)
        if (
            role in optional
            and role not in given_in
            and ctx.available
            and name not in ctx.available
        ):
            continue
        inputs[role] = name
    outputs: dict[str, str] = {}
    for role in writes:
        default = role
        if same_as and role in same_as and same_as[role] in inputs:
            default = inputs[same_as[role]]
        outputs[role] = given_out.get(role, default)
    if len(set(outputs.values())) != len(outputs):
        raise ctx.bad("outputs", f"two outputs would have the same name: {outputs}")
    return Names(inputs, outputs, frozenset(optional) & set(inputs))


def _renames(
    config: Mapping[str, Any], key: str, roles: Sequence[str], ctx: StepContext
) -> dict[str, str]:
    value = config.get(key, {})
    if not isinstance(value, Mapping):
        raise ctx.bad(key, f"must be an object mapping a role ({', '.join(roles)}) to a name")
    for role, name in value.items():
        if role not in roles:
            raise ctx.bad(f"{key}.{role}", f"unknown role (known: {', '.join(roles)})")
        if not isinstance(name, str) or not name:
            raise ctx.bad(f"{key}.{role}", f"must be a non-empty tensor name, got {name!r}")
    return dict(value)


def check_spec(
    ctx: StepContext,
    key: str,
    name: str,
    *,
    datatypes: frozenset[str] | None = None,
    ranks: Sequence[int] | None = None,
    last: int | None = None,
) -> TensorSpec | None:
    """Check what is known of a tensor the step reads; ModelError naming `key` if it cannot
    fit (an unknown dimension, -1, always fits)."""
    spec = ctx.available.get(name)
    if spec is None:
        return None
    if datatypes is not None and spec.datatype not in datatypes:
        allowed = "/".join(sorted(datatypes))
        raise ctx.bad(key, f"tensor {name!r} is {spec.datatype}, not {allowed}")
    if ranks is not None and len(spec.shape) not in ranks:
        wanted = " or ".join(str(r) for r in ranks)
        raise ctx.bad(key, f"tensor {name!r} has shape {list(spec.shape)}, not {wanted} dims")
    if last is not None and spec.shape and spec.shape[-1] not in (-1, last):
        raise ctx.bad(
            key, f"tensor {name!r} has shape {list(spec.shape)}: the last dim is not {last}"
        )
    return spec


# -- declaration values ---------------------------------------------------------------------


def number(
    config: Mapping[str, Any],
    key: str,
    ctx: StepContext,
    default: float | None,
    low: float | None = None,
    high: float | None = None,
) -> float:
    value = config.get(key, default)
    if not is_number(value) or not np.isfinite(value):
        raise ctx.bad(key, f"must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ctx.bad(key, f"must be from {low} to {high}, got {value!r}")
    return float(value)


def integer(
    config: Mapping[str, Any],
    key: str,
    ctx: StepContext,
    default: int | None,
    low: int | None = None,
    high: int | None = None,
) -> int:
    value = config.get(key, default)
    if not is_int(value):
        raise ctx.bad(key, f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ctx.bad(key, f"must be {span}, got {value!r}")
    return int(value)


def boolean(config: Mapping[str, Any], key: str, ctx: StepContext, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ctx.bad(key, f"must be true or false, got {value!r}")
    return value


def choice(
    config: Mapping[str, Any], key: str, ctx: StepContext, default: str, choices: Sequence[str]
) -> str:
    value = config.get(key, default)
    if value not in choices:
        raise ctx.bad(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


#: The largest side a step resizes or crops to.
MAX_SIDE = 1 << 14


def size(config: Mapping[str, Any], key: str, ctx: StepContext) -> tuple[int, int]:
    """[height, width], both positive (an integer n means [n, n])."""
    value = config.get(key)
    if is_int(value):
        value = [value, value]
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(is_int(d) and 0 < d <= MAX_SIDE for d in value)
    ):
        raise ctx.bad(key, f"must be [height, width] in pixels (1..{MAX_SIDE}), got {value!r}")
    return int(value[0]), int(value[1])


def datatype(
    config: Mapping[str, Any],
    key: str,
    ctx: StepContext,
    default: str | None,
    allowed: frozenset[str] = NUMERIC_TYPES,
) -> str:
    value = config.get(key, default)
    if value not in allowed:
        raise ctx.bad(key, f"must be one of {', '.join(sorted(allowed))}, got {value!r}")
    return str(value)


def strings(config: Mapping[str, Any], key: str, ctx: StepContext) -> tuple[str, ...]:
    value = config.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ctx.bad(key, f"must be a non-empty list of strings, got {value!r}")
    return tuple(value)


# -- request parameters ---------------------------------------------------------------------


def param_number(
    parameters: Mapping[str, Any], name: str, default: float, low: float, high: float
) -> float:
    """A request parameter that is a number from `low` to `high`; text transports (MQTT user
    properties, form fields) may send it as a decimal string."""
    if name not in parameters:
        return default
    value = parameters[name]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if not is_number(value) or not low <= value <= high or not np.isfinite(value):
        span = f" from {low} to {high}" if np.isfinite([low, high]).all() else ""
        raise InvalidInput(f"parameter {name} must be a number{span}, got {value!r}")
    return float(value)


_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")  # ASCII digits only ("²".isdigit() is true)


def param_int(parameters: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    """A request parameter that is an integer from `low` to `high` (or its decimal string)."""
    if name not in parameters:
        return default
    value = parameters[name]
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value.strip())
    if not is_int(value) or not low <= value <= high:
        raise InvalidInput(
            f"parameter {name} must be an integer from {low} to {high}, got {value!r}"
        )
    return int(value)


# -- tensors at run time ----------------------------------------------------------------------


def tensor(tensors: Mapping[str, Array], name: str, role: str) -> Array:
    """A tensor the step reads; a missing one is the caller's mistake, named."""
    try:
        return tensors[name]
    except KeyError:
        raise InvalidInput(f"no tensor {name!r} ({role}) was given") from None


def numeric(array: Array, name: str) -> Array:
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"tensor {name!r} must be numeric, got {array.dtype}")
    return array


def cast_to(array: Array, datatype: str, name: str) -> Array:
    """`array` as KServe `datatype`: integers rounded and clamped, NaN refused for them (no
    integer holds it), anything to BOOL as non-zero; the same array when nothing changes."""
    dtype = DATATYPES[datatype]
    if array.dtype == dtype:
        return array
    numeric(array, name)
    if datatype == "BOOL":
        return np.asarray(array != 0)
    if datatype not in INT_TYPES:
        return array.astype(dtype)
    info = np.iinfo(dtype)
    if array.dtype.kind == "b":
        return array.astype(dtype)
    if array.dtype.kind in "iu":
        src = np.iinfo(array.dtype)
        if src.min >= info.min and src.max <= info.max:
            return array.astype(dtype)
        # bounds inside both ranges, so numpy never converts one that the source cannot hold
        return np.clip(array, max(src.min, info.min), min(src.max, info.max)).astype(dtype)
    if np.isnan(array).any():
        raise InvalidInput(f"tensor {name!r} holds NaN, which {datatype} cannot hold")
    # float32 holds every 8- and 16-bit integer exactly: no need to widen for those
    work = np.float32 if info.bits <= 16 and array.dtype.itemsize <= 4 else np.float64
    wide = np.asarray(np.rint(array.astype(work)))  # rint of a 0-d array is a scalar
    high = float(info.max)  # 2**63 or 2**64 for 64-bit types: one past what they hold
    safe = np.nextafter(high, 0.0) if info.bits == 64 else high
    over = wide >= high if info.bits == 64 else None
    out = np.clip(wide, float(info.min), safe, out=wide).astype(dtype)
    if over is not None:
        out[over] = info.max
    return out
