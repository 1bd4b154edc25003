"""A KServe v2 answer as CSV (RFC 4180, with a header row), for tabular answers.

Every output must be 1-D or 2-D, all with the same first dimension N: the answer has N rows
and one column per 1-D output (named like the output) or per column of a 2-D output
(`name[0]`, `name[1]`, ...), in the order of the outputs. Anything else is refused (406)
saying which output does not fit; a request may ask for only the outputs it wants
(`outputs`). Values are written as in JSON answers (appliance/formats/values.py).
"""

from __future__ import annotations

import csv
import io

import numpy as np

from ..codec import InferResponse
from ..errors import NotAcceptable
from .values import as_text


def encode_csv(response: InferResponse) -> bytes:
    header: list[str] = []
    columns = []
    rows: int | None = None
    first = ""
    for name, array in response.outputs.items():
        if array.ndim not in (1, 2):
            raise NotAcceptable(
                f"output {name!r} has shape {list(array.shape)}: CSV answers take 1-D or 2-D "
                "outputs only (ask for the others with json or xml, or name the outputs you "
                "want in 'outputs')"
            )
        if rows is None:
            rows, first = array.shape[0], name
        elif array.shape[0] != rows:
            raise NotAcceptable(
                f"outputs {first!r} ({rows} rows) and {name!r} ({array.shape[0]} rows) differ "
                "in their first dimension: a CSV answer is one table (name the outputs you "
                "want in 'outputs', or ask for json or xml)"
            )
        text = as_text(array, f"output {name!r}", "csv")
        if array.ndim == 1:
            header.append(name)
            columns.append(text.reshape(-1, 1))
        else:
            header.extend(f"{name}[{j}]" for j in range(array.shape[1]))
            columns.append(text)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(header)
    if columns and rows:
        writer.writerows(np.concatenate(columns, axis=1).tolist())
    return buf.getvalue().encode("utf-8")
