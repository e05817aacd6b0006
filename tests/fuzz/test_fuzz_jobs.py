"""Job-id parsing: any value is a uint256 job its canonical forms name, or InvalidJobId."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from tests.fuzz.common import fuzz_settings, json_values

pytestmark = pytest.mark.fuzz

digits = st.text("0123456789", min_size=0, max_size=90)
job_values = st.one_of(
    digits,
    digits.map(lambda d: d + "n"),
    st.sampled_from(
        ["n", "nn", "1nn", "-1", "+1", " 1", "1 ", "0x10", "1_000", "١٢", "²", "\U0001d7cf"]
    ),
    st.sampled_from(["9" * 78, "9" * 79, "0" * 80 + "1", "1" * 4301, str(2**256), str(2**256 - 1)]),
    st.integers(-(2**300), 2**300),
    st.sampled_from([2**256, 2**256 - 1, -1, 0, 10**4400]),
    st.floats(),
    st.text(max_size=10),
    json_values,
)


@fuzz_settings()
@given(
    st.one_of(
        st.tuples(st.just("one"), job_values),
        st.tuples(
            st.just("many"),
            st.lists(st.tuples(st.sampled_from(["a", "b", "header"]), job_values), max_size=4),
        ),
    )
)
def test_any_job_id(case: tuple[str, Any]) -> None:
    kind, value = case
    if kind == "one":
        oracles.check_job_id(value)
    else:
        oracles.check_resolve(value)
