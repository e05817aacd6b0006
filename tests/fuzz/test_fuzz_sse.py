"""The SSE decoder: any split of any bytes gives the events of the whole read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from tests.fuzz.common import HOSTILE_BYTES, cuts, fuzz_settings

pytestmark = pytest.mark.fuzz

_NAME = st.sampled_from(
    [b"data", b"event", b"id", b"retry", b"", b"dat", b"DATA", b"\xef\xbb\xbfdata"]
)
_VALUE = st.sampled_from(
    [b"", b"[DONE]", b"{}", b"123", b" 5", b"a\x00b", b"\xff", b"\xe4\xb8", b"\xe4\xb8\x96"]
) | st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_LINE = st.one_of(
    st.tuples(_NAME, st.sampled_from([b":", b": ", b":  ", b""]), _VALUE).map(b"".join),
    _VALUE.map(lambda v: b":" + v),  # a comment
    st.just(b""),  # a blank line: dispatch
    st.just(b"data: [DONE]"),
)
_EOL = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    lines = draw(st.lists(st.tuples(_LINE, _EOL), max_size=16))
    raw = b"".join(line + eol for line, eol in lines)
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf"[: draw(st.integers(1, 3))] + raw
    if draw(st.booleans()):
        raw += draw(_LINE)  # an unterminated last line
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(HOSTILE_BYTES)) + raw[at:]
    return raw


@fuzz_settings()
@given(streams(), cuts)
def test_any_split_of_any_bytes(raw: bytes, points: list[int]) -> None:
    oracles.check_sse(raw, points)
