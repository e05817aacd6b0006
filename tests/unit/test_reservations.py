"""Reservations (sidecar/reservations.py): whatever the order of grants and releases, the
requests in flight never hold more than the deposit covers, and every release gives back
exactly its grant."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.reservations import Reservations


@given(
    left=st.integers(min_value=0, max_value=500),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("grant"), st.integers(min_value=0, max_value=200)),
            st.tuples(st.just("release"), st.integers(min_value=0, max_value=30)),
        ),
        max_size=60,
    ),
)
def test_held_never_exceeds_what_the_deposit_covers(left: int, steps: list) -> None:
    reservations = Reservations()
    holds = []
    for action, n in steps:
        if action == "grant":
            hold = reservations.grant(7, left, n)
            assert 0 <= hold.tokens <= n
            holds.append(hold)
        elif holds:
            hold = holds.pop(n % len(holds))
            hold.release()
            hold.release()  # a second release does nothing
        assert reservations.held(7) == sum(h.tokens for h in holds) <= left
    for hold in holds:
        hold.release()
    assert reservations.held(7) == 0


def test_jobs_are_apart_and_overdrawing_is_a_bug() -> None:
    reservations = Reservations()
    a = reservations.grant(1, 100, 80)
    b = reservations.grant(2, 100, 80)
    assert (a.tokens, b.tokens) == (80, 80)
    assert reservations.grant(1, 100, 80).tokens == 20
    with pytest.raises(ValueError):
        reservations.release(2, 81)
    with pytest.raises(ValueError):
        reservations.grant(1, 100, -1)
