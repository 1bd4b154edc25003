"""What every front must answer to a broken request: never a 5xx, and a 400 that names the
field whenever the published schema says the body is wrong."""

from __future__ import annotations

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
