"""Hypothesis settings for the fuzz tests: a short run by default, a long one on demand.

APPLIANCE_FUZZ_EXAMPLES sets the examples per test (default 200); for a long run, e.g.
`APPLIANCE_FUZZ_EXAMPLES=5000 pytest -q tests/fuzz`. Hypothesis keeps the examples that failed
in .hypothesis/ and replays them first next time.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "appliance-fuzz",
    max_examples=int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "200")),
    # Real servers answer these: a slow example on a busy machine is not a failure.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("appliance-fuzz")
