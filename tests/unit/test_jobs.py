"""Job ids: what is accepted, what is refused, and how the refusal reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.metering.jobs import MAX_JOB_ID, InvalidJobId, parse_job_id, resolve_job_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (164, 164),
        (MAX_JOB_ID, MAX_JOB_ID),
        ("164", 164),
        ("0", 0),
        ("007", 7),
        ("164n", 164),
        ("0n", 0),
        (str(MAX_JOB_ID), MAX_JOB_ID),
        (f"{MAX_JOB_ID}n", MAX_JOB_ID),
    ],
)
def test_accepted(value: object, expected: int) -> None:
    assert parse_job_id(value) == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (True, "boolean"),
        (False, "boolean"),
        (-1, "negative"),
        (MAX_JOB_ID + 1, "does not fit uint256"),
        pytest.param(-(10**5000), "negative (an integer of", id="huge-negative"),
        pytest.param(10**5000, "does not fit uint256", id="huge"),
        (1.0, "floating-point"),
        (float("nan"), "floating-point"),
        ("", "no digits"),
        ("n", "no digits"),
        ("-5", "not a number"),
        ("+5", "not a number"),
        (" 5", "not a number"),
        ("5 ", "not a number"),
        ("0x10", "not a number"),
        ("1e3", "not a number"),
        ("12.0", "not a number"),
        ("164nn", "not a number"),
        ("١٢", "not a number"),  # Arabic-Indic digits: str.isdigit would take them
        ("²", "not a number"),
        (str(MAX_JOB_ID + 1), "does not fit uint256"),
        ("9" * 81, "81 digits"),
        ("9" * 5000, "5000 digits"),
        (None, "null"),
        ([1], "JSON array"),
        ({"id": 1}, "JSON object"),
        (b"1", "bytes"),
    ],
)
def test_refused_with_a_clear_message(value: object, says: str) -> None:
    with pytest.raises(InvalidJobId) as caught:
        parse_job_id(value)
    message = str(caught.value)
    assert says in message
    assert "JavaScript BigInt" in message  # every refusal says what is accepted
    assert len(message) < 400


def test_invalid_job_id_is_a_value_error() -> None:
    assert issubclass(InvalidJobId, ValueError)


def test_message_quotes_hostile_strings_safely() -> None:
    with pytest.raises(InvalidJobId) as caught:
        parse_job_id("12\n\x1b[31mred" + "x" * 1000)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert "(1011 characters)" in message
    assert len(message) < 400


def test_where_names_the_source() -> None:
    with pytest.raises(InvalidJobId, match=r"^header X-Job-Id is 'abc'"):
        parse_job_id("abc", where="header X-Job-Id")


@given(st.integers(0, MAX_JOB_ID))
def test_every_uint256_round_trips(n: int) -> None:
    assert parse_job_id(n) == parse_job_id(str(n)) == parse_job_id(f"{n}n") == n


@given(st.text(max_size=20))
def test_strings_parse_or_raise_invalid_job_id(text: str) -> None:
    try:
        parsed = parse_job_id(text)
    except InvalidJobId:
        return
    assert 0 <= parsed <= MAX_JOB_ID
    assert text.rstrip("n").isascii()


def test_resolve_none_when_nothing_names_a_job() -> None:
    assert resolve_job_id([]) is None
    assert resolve_job_id([("body field 'job_id'", None)]) is None


def test_resolve_agreeing_sources() -> None:
    named = [("body field 'job_id'", 5), ("header X-Job-Id", "5"), ("header X-Session-Id", "5n")]
    assert resolve_job_id(named) == 5


def test_resolve_conflict_names_both_sources() -> None:
    with pytest.raises(InvalidJobId) as caught:
        resolve_job_id([("body field 'job_id'", 5), ("header X-Job-Id", "6")])
    message = str(caught.value)
    assert "conflicting job ids" in message
    assert "body field 'job_id' says 5" in message and "header X-Job-Id says 6" in message


def test_resolve_reports_the_bad_source() -> None:
    with pytest.raises(InvalidJobId, match=r"^header X-Job-Id is 'abc'"):
        resolve_job_id([("body field 'job_id'", 5), ("header X-Job-Id", "abc")])
