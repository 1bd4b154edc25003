"""What every front must answer to a broken request: never a 5xx, and a 400 that names the
field whenever the published schema says the body is wrong."""

from __future__ import annotations

from typing import Any

from hypothesis import event

from .mutate import Mutation
from .schemas import Document


def judge(
    mutation: Mutation,
    status: int,
    message: str,
    doc: Document,
    schema: str,
    allowed: tuple[int, ...] = (400,),
) -> None:
    """Check one answer (`message`: the error text, and for OpenAI its `param` too).

    - a body the server's JSON parser must refuse whole (NaN token, nesting past its limit):
      400 saying the JSON is malformed;
    - a body the schema refuses: 400 naming the field that changed;
    - a body the schema allows: anything but a 5xx (the model may still not take it); a null
      where an optional field may be left out counts as leaving it out.
    """
    event(f"status {status}")
    where = f"{mutation.path} {mutation.what}: {status} {message[:300]!r}"
    if own_deadline(mutation.as_parsed(), status, message):
        return
    assert status < 500, f"5xx for {where}"
    if mutation.unparsable:
        assert status == 400 and "JSON" in message, f"expected a JSON syntax 400 for {where}"
        return
    errors = doc.errors(schema, mutation.as_parsed())
    if not errors or (mutation.null and not doc.errors(schema, mutation.without())):
        return  # null for an optional field counts as absent (as KServe's and OpenAI's do)
    assert status in allowed, f"schema says {errors[:2]}, but {where}"
    if mutation.field is not None:
        assert mutation.field in message, f"the error does not name {mutation.field!r}: {where}"


def own_deadline(body: Any, status: int, message: str) -> bool:
    """A 504 that the request asked for: its `parameters.timeout` (microseconds, a positive
    number) is shorter than the model's measured run time (not queued) or ran out while it
    waited: the same 504 as for an X-Request-Timeout-Ms that short (test_timeout_header)."""
    if status != 504 or not isinstance(body, dict):
        return False
    params = body.get("parameters")
    timeout = params.get("timeout") if isinstance(params, dict) else None
    return (
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and timeout > 0
        and "time" in message  # "timeout of ..." (not queued), "timed out after ..." (queued)
    )
