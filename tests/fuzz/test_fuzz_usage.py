"""Usage extraction: whole answers, usage objects and metered streams, never an exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from sidecar.metering import Endpoint
from tests.fuzz.common import HOSTILE_JSON, cuts, fuzz_settings, json_bytes, json_text, json_values

pytestmark = pytest.mark.fuzz

endpoints = st.sampled_from(oracles.ENDPOINTS)
counts: st.SearchStrategy[object] = st.one_of(
    st.integers(-2, 2**64),
    st.sampled_from([None, True, 1.0, "3", [], {}, -0.0, 2**256]),
)
usage_objects = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            key: counts
            for key in (
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "input_tokens",
                "output_tokens",
            )
        }
        | {
            "prompt_tokens_details": st.dictionaries(st.just("cached_tokens"), counts),
            "completion_tokens_details": st.dictionaries(st.just("reasoning_tokens"), counts),
        },
    ),
    json_values,
)
texts = st.text(max_size=12) | st.sampled_from(["", "\ud800", "<|endoftext|>", " "])
deltas = st.fixed_dictionaries(
    {},
    optional={
        "content": texts | st.none(),
        "reasoning_content": texts,
        "tool_calls": st.just([{"function": {"name": "f", "arguments": "{}"}}]),
        "role": st.just("assistant"),
    },
)
choices = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "delta": deltas | json_values,
            "text": texts | json_values,
            "message": deltas,
            "index": st.integers(0, 3),
            "finish_reason": st.sampled_from([None, "stop", "length"]),
        },
    )
    | json_values,
    max_size=3,
)
chunks = st.fixed_dictionaries(
    {},
    optional={
        "choices": choices | json_values,
        "usage": usage_objects | st.none(),
        "error": json_values,
        "type": st.sampled_from(
            [
                "response.output_text.delta",
                "response.completed",
                "response.failed",
                "error",
                "x",
            ]
        ),
        "delta": texts,
        "response": st.fixed_dictionaries({}, optional={"usage": usage_objects}),
        "output": json_values,
    },
)


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    """SSE streams of engine-like chunks: each data line a chunk's JSON (or JSON-ish text),
    templates repeated with new text as real engines send them, [DONE] somewhere."""
    events = []
    template: dict[str, Any] | None = None
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind <= 3:
            chunk = draw(chunks)
            template = chunk
            data = json.dumps(chunk, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
        elif kind <= 5 and template is not None:
            # The same chunk, only its text changed: the meter's fast path.
            again = json.loads(json.dumps(template))
            listed = again.get("choices")
            for choice in listed if type(listed) is list else []:
                if type(choice) is dict and type(choice.get("delta")) is dict:
                    choice["delta"]["content"] = draw(texts)
            data = json.dumps(again)
        elif kind == 6:
            data = "[DONE]"
        elif kind == 7:
            data = draw(json_text())
        else:
            data = draw(st.sampled_from(HOSTILE_JSON))
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        comment = draw(st.sampled_from(["", ": keep-alive" + eol]))
        events.append(f"{comment}data: {data}{eol}{eol}")
    raw = "".join(events).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]  # the engine broke off
    return raw


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(json_bytes())
    body = {
        "choices": draw(choices),
        "output": draw(json_values),
        "usage": draw(usage_objects | st.none()),
    }
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@fuzz_settings()
@given(
    endpoints,
    st.one_of(
        st.tuples(st.just("body"), bodies()),
        st.tuples(st.just("usage"), usage_objects),
        st.tuples(st.just("stream"), event_streams()),
    ),
    cuts,
    st.booleans(),
    st.booleans(),
)
def test_usage_of_any_answer(
    endpoint: Endpoint, case: tuple[str, Any], points: list[int], strip: bool, collect: bool
) -> None:
    kind, value = case
    if kind == "body":
        oracles.check_usage_body(endpoint, value)
    elif kind == "usage":
        oracles.check_read_usage(endpoint, value)
    else:
        oracles.check_stream(endpoint, value, points, strip=strip, collect=collect)
