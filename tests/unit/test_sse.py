"""The SSE decoder, rule by rule, and against a literal reading of the WHATWG spec."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.metering.sse import DONE, SSEDecoder, SSEEvent, Truncated

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
STREAMS = sorted([*FIXTURES.glob("streams/*.sse"), *FIXTURES.glob("recorded/*.sse")])


def decode(*reads: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for read in reads:
        events += decoder.feed(read)
    return events


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def reference(raw: bytes) -> tuple[list[tuple[str, str, str]], int | None, bool]:
    """The spec's algorithm, written as literally as possible over the whole decoded text."""
    text = raw.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)[:-1]  # the last piece has no line end: discarded
    events: list[tuple[str, str, str]] = []
    data, event_type, last_id, retry = "", "", "", None
    for line in lines:
        if line == "":
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append((data, event_type or "message", last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry":
            if value and all(c in "0123456789" for c in value):
                retry = int(value)
    done = any(e[0] == DONE for e in events)
    return events, retry, done


def as_tuples(events: list[SSEEvent]) -> list[tuple[str, str, str]]:
    return [(e.data, e.event, e.id) for e in events]


# -- one rule at a time ----------------------------------------------------------------------


def test_one_event() -> None:
    (event,) = decode(b'data: {"a": 1}\n\n')
    assert event == SSEEvent('{"a": 1}', "message", "")
    assert (event.raw_start, event.raw_end) == (0, 16)


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_line_ends(eol: bytes) -> None:
    raw = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert as_tuples(decode(raw)) == [("a\nb", "message", ""), ("c", "message", "")]


def test_mixed_line_ends() -> None:
    assert [e.data for e in decode(b"data: a\r\ndata: b\rdata: c\n\r\n")] == ["a\nb\nc"]


def test_crlf_split_across_reads_is_one_line_end() -> None:
    # Were the LF a line end of its own, it would be a blank line dispatching "a" alone.
    assert [e.data for e in decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")] == ["a\nb"]


def test_cr_at_end_of_read_dispatches_at_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [SSEEvent("a")]
    assert decoder.pending_cr
    assert decoder.feed(b"\ndata: b\n\n") == [SSEEvent("b")]


def test_lone_lf_after_cr_line_is_a_blank_line_only_if_not_crlf() -> None:
    # CR then a LF in the next read is CRLF; CR, CR is a blank line.
    assert decode(b"data: a\r", b"\r") == [SSEEvent("a")]
    assert decode(b"data: a\r", b"\n") == []


def test_leading_bom_is_skipped() -> None:
    assert decode(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent("x")]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_bom_split_across_reads(cut: int) -> None:
    raw = b"\xef\xbb\xbfdata: x\n\n"
    assert decode(raw[:cut], raw[cut:]) == [SSEEvent("x")]
    assert decode(*[raw[i : i + 1] for i in range(len(raw))]) == [SSEEvent("x")]


def test_only_one_bom_is_skipped() -> None:
    # A second BOM makes the field name "\ufeffdata", an unknown field.
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []


def test_bom_later_in_the_stream_is_data() -> None:
    assert decode(b"data: \xef\xbb\xbfx\n\n") == [SSEEvent("\ufeffx")]


def test_partial_bom_then_other_bytes() -> None:
    # "\xef" then "data": not a BOM, the first line's name is invalid UTF-8, ignored.
    assert decode(b"\xef", b"data: x\n\ndata: y\n\n") == [SSEEvent("y")]


def test_comments_are_ignored() -> None:
    raw = b": ping - 2026-11-28 11:47:15+00:00\n\n:\ndata: a\n: inside\ndata: b\n\n"
    assert decode(raw) == [SSEEvent("a\nb")]


def test_one_space_after_colon_is_dropped() -> None:
    assert [e.data for e in decode(b"data:a\n\ndata:  b\n\ndata: \n\n")] == ["a", " b", ""]


def test_field_without_colon_has_empty_value() -> None:
    assert decode(b"data\n\n") == [SSEEvent("")]
    assert decode(b"data\ndata\n\n") == [SSEEvent("\n")]


def test_empty_data_line_still_dispatches() -> None:
    assert decode(b"data:\n\n") == [SSEEvent("")]


def test_block_without_data_dispatches_nothing_and_resets_event_type() -> None:
    assert decode(b"event: x\n\ndata: y\n\n") == [SSEEvent("y", "message")]
    assert decode(b"\n\n\n") == []


def test_event_type() -> None:
    events = decode(b"event: delta\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\n")
    assert [(e.event, e.data) for e in events] == [
        ("delta", "1"),
        ("message", "2"),
        ("message", "3"),
    ]


def test_id_persists_and_nul_ids_are_ignored() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 7\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["7", "7", "7", ""]
    assert decoder.last_event_id == ""


def test_retry_digits_only() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\n\n")
    assert decoder.retry == 1500
    for bad in (b"retry: 15a\n", b"retry:\n", b"retry: -1\n", "retry: ١٢\n".encode(), b"retry\n"):
        decoder.feed(bad)
        assert decoder.retry == 1500, bad
    decoder.feed(b"retry:20\n")
    assert decoder.retry == 20
    decoder.feed(b"retry: " + b"9" * 5000 + b"\n")  # int() would refuse it: ignored
    assert decoder.retry == 20


def test_unknown_fields_are_ignored() -> None:
    assert decode(b"foo: bar\nDATA: x\ndata : y\ndata: z\n\n") == [SSEEvent("z")]


def test_utf8_split_inside_a_character() -> None:
    raw = "data: café 世界 🎉\n\n".encode()
    expected = [SSEEvent("café 世界 🎉")]
    for cut in range(len(raw) + 1):
        assert decode(raw[:cut], raw[cut:]) == expected
    assert decode(*[raw[i : i + 1] for i in range(len(raw))]) == expected


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert decode(b"data: a\xffb\xe4\xb8\n\n") == [SSEEvent("a\ufffdb\ufffd")]


def test_done() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: {}\n\n")
    assert not decoder.done
    decoder.feed(b"data: [DONE] \n\n")  # not the sentinel
    assert not decoder.done
    assert decoder.feed(b"data: [DONE]\n\n") == [SSEEvent(DONE)]
    assert decoder.done


def test_done_split_across_reads() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: [DO")
    assert not decoder.done
    decoder.feed(b"NE]\n")
    assert not decoder.done  # no blank line yet
    decoder.feed(b"\n")
    assert decoder.done


def test_several_events_per_read_and_partial_lines() -> None:
    raw = b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert [e.data for e in decode(raw[:12], raw[12:20], raw[20:])] == ["1", "2", "3"]


def test_empty_reads_are_harmless() -> None:
    assert decode(b"", b"data: a\n", b"", b"\n", b"") == [SSEEvent("a")]


# -- end of input ----------------------------------------------------------------------------


def test_close_after_clean_end() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\ndata: [DONE]\n\n")
    assert decoder.close() is None


def test_close_on_empty_stream() -> None:
    assert SSEDecoder().close() is None


def test_close_reports_unterminated_event() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\ndata: b\ndata: c")
    truncated = decoder.close()
    assert truncated == Truncated(9, 15, SSEEvent("b\nc"))


def test_close_reports_unterminated_done_without_setting_done() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: [DONE]\n")
    truncated = decoder.close()
    assert truncated is not None and truncated.event == SSEEvent(DONE)
    assert not decoder.done


def test_close_reports_bytes_without_an_event() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n: ping")
    assert decoder.close() == Truncated(9, 6, None)
    decoder = SSEDecoder()
    decoder.feed(b"\xef\xbb")  # half a BOM
    assert decoder.close() == Truncated(0, 2, None)


def test_feed_after_close_and_double_close_raise() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n")  # leaves the decoder on its fastest path
    decoder.close()
    with pytest.raises(RuntimeError):
        decoder.feed(b"data: b\n\n")
    with pytest.raises(RuntimeError):
        decoder.close()


# -- raw spans -------------------------------------------------------------------------------


def test_raw_spans_cover_blocks_with_their_comments() -> None:
    raw = b"\xef\xbb\xbfdata: a\n\n: ping\n\n: c\ndata: b\r\n\r\n\n"
    decoder = SSEDecoder()
    events = decoder.feed(raw)
    assert [raw[e.raw_start : e.raw_end] for e in events] == [
        b"\xef\xbb\xbfdata: a\n\n",
        b": c\ndata: b\r\n\r\n",
    ]
    assert decoder.block_start == len(raw)


def test_raw_end_stops_at_cr_when_crlf_is_split() -> None:
    decoder = SSEDecoder()
    (event,) = decoder.feed(b"data: a\r\n\r")
    assert event.raw_end == 10
    assert decoder.feed(b"\ndata: b\r\n\r\n")[0].raw_start == 11
    assert decoder.block_start == 22


# -- properties ------------------------------------------------------------------------------

_TEXT = st.text(
    st.sampled_from("ab :é世🎉\x00[]{}\"'\\\t\ufeff") | st.characters(codec="utf-8"),
    max_size=12,
).map(lambda s: s.replace("\r", "").replace("\n", ""))
_NAME = st.sampled_from(["data", "event", "id", "retry", "dat", "", "DATA", "data ", "x"]) | _TEXT
_VALUE = _TEXT | st.sampled_from(["", "[DONE]", "123", " 5", "0"])
_LINE = st.one_of(
    st.tuples(_NAME, st.sampled_from([":", ": ", ":  ", ""]), _VALUE).map("".join),
    _TEXT.map(lambda s: ":" + s),  # a comment
    st.just(""),  # a blank line
    st.just("data: [DONE]"),
)
_EOL = st.sampled_from(["\n", "\r", "\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_LINE, _EOL), max_size=30))
    text = "".join(line + eol for line, eol in lines)
    if draw(st.booleans()):
        text = "\ufeff" + text
    if draw(st.booleans()):
        text += draw(_LINE)  # an unterminated last line
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):  # some invalid UTF-8
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xe4\xb8", b"\xc3", b"\x80"])) + raw[at:]
    return raw


def check_against_reference(raw: bytes, cuts: list[int]) -> None:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for read in split(raw, cuts):
        events += decoder.feed(read)
    expected, retry, done = reference(raw)
    assert as_tuples(events) == expected
    assert decoder.retry == retry
    assert decoder.done == done
    decoder.close()


@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_matches_the_spec_for_any_split(raw: bytes, cuts: list[int]) -> None:
    check_against_reference(raw, cuts)


@given(st.binary(max_size=300), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_bytes_match_the_spec(raw: bytes, cuts: list[int]) -> None:
    check_against_reference(raw, cuts)


@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_raw_spans_do_not_depend_on_the_split(raw: bytes, cuts: list[int]) -> None:
    whole = decode(raw)
    decoder = SSEDecoder()
    parts = []
    for read in split(raw, cuts):
        parts += decoder.feed(read)
    assert parts == whole
    for a, b in zip(parts, whole, strict=True):
        assert a.raw_start == b.raw_start
        # Only a CRLF cut between CR and LF may end a span after the CR.
        assert a.raw_end == b.raw_end or (a.raw_end + 1 == b.raw_end and raw[a.raw_end] == 0x0A)
    assert decoder.block_start == _last_boundary(raw)


def _last_boundary(raw: bytes) -> int:
    decoder = SSEDecoder()
    decoder.feed(raw)
    return decoder.block_start


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
def test_fixture_streams_split_anywhere(path: Path) -> None:
    raw = path.read_bytes()
    whole = decode(raw)
    assert whole, "a fixture stream with no events"
    expected, _, _ = reference(raw)
    assert as_tuples(whole) == expected
    assert decode(*[raw[i : i + 1] for i in range(len(raw))]) == whole
    for variant in (raw.replace(b"\n", b"\r\n"), raw.replace(b"\n", b"\r")):
        assert decode(variant) == whole
        assert decode(*[variant[i : i + 7] for i in range(0, len(variant), 7)]) == whole


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
@settings(deadline=None, max_examples=40)  # recorded streams are up to ~100 kB
@given(cuts=st.lists(st.integers(0, 100_000), max_size=20))
def test_fixture_streams_any_split(path: Path, cuts: list[int]) -> None:
    raw = path.read_bytes()
    assert decode(*split(raw, cuts)) == decode(raw)


def test_a_block_started_by_a_stateless_line_keeps_its_start() -> None:
    """Found by hypothesis: an unknown field line read alone, then a whole data event in the
    next read; the event's block starts at the unknown line, not at the second read."""
    raw = b"\xffdata: \ndata: [DONE]\n\n"
    [whole] = decode(raw)
    [split_event] = decode(raw[:8], raw[8:])
    assert (
        (split_event.raw_start, split_event.raw_end)
        == (whole.raw_start, whole.raw_end)
        == (
            0,
            len(raw),
        )
    )


# -- the bound on one event ------------------------------------------------------------------


def _content_size(raw: bytes, event: SSEEvent) -> int:
    """The bytes of an event's block before its blank line (as decoded from one read)."""
    blank = 2 if raw[event.raw_end - 2 : event.raw_end] == b"\r\n" else 1
    return event.raw_end - event.raw_start - blank


@given(
    streams(),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.integers(1, 80),
)
def test_oversized_events_are_skipped_alike_for_any_split(
    raw: bytes, cuts: list[int], bound: int
) -> None:
    unbounded = SSEDecoder(1 << 40)
    whole = unbounded.feed(raw)
    expected = [(e.data, e.event) for e in whole if _content_size(raw, e) <= bound]
    decoder = SSEDecoder(bound)
    events: list[SSEEvent] = []
    for read in split(raw, cuts):
        events += decoder.feed(read)
    decoder.close()
    assert [(e.data, e.event) for e in events] == expected
    assert decoder.oversized >= len(whole) - len(expected)


def test_an_endless_line_holds_bounded_memory() -> None:
    import tracemalloc

    seen: list[int] = []
    decoder = SSEDecoder(1024 * 1024, seen.append)
    piece = b"x" * 65536
    tracemalloc.start()
    try:
        decoder.feed(b"data: ")
        for _ in range(1024):  # 64 MiB of one line
            decoder.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * 1024 * 1024
    assert decoder.skipping and decoder.oversized == 1 and len(seen) == 1
    # The line ends, its block ends: what follows is decoded as usual.
    assert decoder.feed(b"\n\ndata: after\n\n") == [SSEEvent("after")]
    assert not decoder.skipping and decoder.oversized == 1


def test_an_oversized_event_within_one_read_is_skipped() -> None:
    decoder = SSEDecoder(10)
    events = decoder.feed(b"data: 0123456789\n\ndata: ok\n\n")
    assert events == [SSEEvent("ok")]
    assert decoder.oversized == 1
    # Exactly at the bound is metered: "data: 1234" is 10 bytes, its LF the 11th.
    assert SSEDecoder(11).feed(b"data: 1234\n\n") == [SSEEvent("1234")]
    assert SSEDecoder(10).feed(b"data: 1234\n\n") == []


def test_an_oversized_block_reports_no_event_at_close() -> None:
    decoder = SSEDecoder(8)
    decoder.feed(b"data: a very long unterminated line")
    truncated = decoder.close()
    assert truncated is not None and truncated.event is None


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(0)
