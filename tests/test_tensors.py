"""The value checks of the hot path agree with numpy on small and large tensors alike."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance.tensors import SMALL, all_finite, max_abs

_FLOATS = st.sampled_from([np.float16, np.float32, np.float64])
_SIZES = st.sampled_from([0, 1, 4, SMALL, SMALL + 1, 200])


@given(_FLOATS.flatmap(lambda dt: _SIZES.flatmap(lambda n: hnp.arrays(dt, (n,)))))
def test_all_finite_is_numpys(array: np.ndarray[Any, Any]) -> None:
    assert all_finite(array) == bool(np.isfinite(array).all())


@given(
    _FLOATS.flatmap(
        lambda dt: _SIZES.filter(bool).flatmap(
            lambda n: hnp.arrays(dt, (n,), elements={"allow_nan": False})
        )
    )
)
def test_max_abs_is_numpys(array: np.ndarray[Any, Any]) -> None:
    assert max_abs(array) == float(np.abs(array).max())
