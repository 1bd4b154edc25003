"""appliance/httphead.py's Date header: written out so the device imports no email package at
idle (issue 22), it must read exactly as the standard library's formatter writes it."""

from __future__ import annotations

import random
import time
from email.utils import formatdate

from appliance.httphead import DateHeader, http_date


def test_http_date_is_what_email_utils_writes() -> None:
    draw = random.Random(22)
    seconds = [0, 59, 86_399, 951_782_400, 2_147_483_647, 4_102_444_800, 253_402_300_799]
    seconds += [draw.randrange(0, 253_402_300_800) for _ in range(20_000)]
    for s in seconds:
        assert http_date(s) == formatdate(s, usegmt=True), s


def test_the_date_header_holds_the_current_second() -> None:
    header = DateHeader()
    before = int(time.time())
    value = header.get().decode()
    after = int(time.time())
    assert value in {http_date(s) for s in range(before, after + 1)}
