"""The one rule for the names of models, tasks and versions (and, shorter, device ids).

A name becomes a directory in the model store (models/<name>/<version>/), a TUF target path on
the hub (<name>/<version>/model.onnx), a URL path segment and an MQTT topic level. So it is
1-128 ASCII letters, digits, '_', '-' or '.', starting with a letter or digit: no '/', no
leading '.', no '..' anywhere, and not "ACTIVE" (the store's file beside the versions). The
device, its config, the hub and every protocol front check names with this module only, so a
name one of them accepts is accepted by all the others.

Device ids and group names follow the same rule with at most 64 characters: a device id defaults
to the host name, and Linux host names have at most 64 (HOST_NAME_MAX).
"""

from __future__ import annotations

import typing
from typing import Any

from .errors import ApplianceError, InvalidInput

#: Longest model name, task name or version.
MAX_LENGTH = 128
#: Longest device id or group name (HOST_NAME_MAX on Linux).
DEVICE_ID_MAX_LENGTH = 64
#: The model store's file beside a model's versions (models/<name>/ACTIVE, see registry.py).
ACTIVE_FILE = "ACTIVE"
#: Names the store uses for its own files.
RESERVED = frozenset({ACTIVE_FILE})
_FIRST = "A-Za-z0-9"
_REST = "A-Za-z0-9_.-"
_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def name_pattern(max_length: int = MAX_LENGTH) -> str:
    """The rule as a regex fragment without anchors or groups, for embedding in a larger regex.

    What follows the fragment there must not be a name character (a '/', the end), as in a URL
    path: the lookaheads look at the whole run of name characters."""
    reserved = "|".join(sorted(RESERVED))
    return (
        rf"(?!(?:{reserved})(?![{_REST}]))"  # not a reserved name
        rf"(?![{_REST}]*\.\.)"  # no '..'
        rf"[{_FIRST}][{_REST}]{{0,{max_length - 1}}}"
    )


#: Model names, task names and versions as an unanchored regex fragment (no capturing group):
#: the HTTP fast path and the aiohttp route table embed it, e.g.
#: rf"/v2/models/({NAME_PATTERN})(?:/versions/({NAME_PATTERN}))?/infer" or "{name:" + ... + "}".
NAME_PATTERN = name_pattern()


def rule(max_length: int = MAX_LENGTH) -> str:
    """The rule in words, for error messages."""
    return (
        f"use 1-{max_length} letters, digits, '_', '-' or '.', starting with a letter or digit, "
        "with no '..'"
    )


def name_problem(value: object, max_length: int = MAX_LENGTH) -> str | None:
    """What is wrong with `value` as a name, in a few words; None when it is a valid name."""
    if not isinstance(value, str):
        return "not a string"
    if not value:
        return "it is empty"
    if len(value) > max_length:
        return f"it has {len(value)} characters"
    bad = next((c for c in value if c not in _ALLOWED), None)
    if bad is not None:
        return f"{bad!r} is not allowed"
    if not value[0].isalnum():
        return f"it starts with {value[0]!r}"
    if ".." in value:
        return "it contains '..'"
    if value in RESERVED:
        return f"{value!r} is reserved for the model store's own files"
    return None


def is_name(value: object, max_length: int = MAX_LENGTH) -> bool:
    return name_problem(value, max_length) is None


def check_name(
    value: Any,
    what: str,
    error: type[ApplianceError] = InvalidInput,
    max_length: int = MAX_LENGTH,
) -> str:
    """`value` if it is a valid name, else `error` naming `what`, the value and the problem
    ("invalid model name 'a/b': use 1-128 letters, ... ('/' is not allowed)")."""
    problem = name_problem(value, max_length)
    if problem is not None:
        raise error(f"invalid {what} {value!r}: {rule(max_length)} ({problem})")
    return typing.cast(str, value)
