"""The host node's plaintext messages: any frame is a request the engine can be sent, or the
node's error (BadRequest, InvalidJobId); any engine error text is read without a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import oracles
from sidecar.metering import safejson
from tests.fuzz.common import HOSTILE_JSON, fuzz_settings, json_text, json_values

pytestmark = pytest.mark.fuzz

hostile = st.sampled_from(HOSTILE_JSON).map(lambda text: _loads(text))
field_values = st.one_of(
    json_values,
    st.sampled_from(["1" * 4301, "9" * 80, "164n", "²", "١٢", "0", "sess-1", "", " "]),
    st.sampled_from([0, 1, 2, 2.0000001, -1e-9, 2**256, float("nan"), float("inf"), True]),
    hostile,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        key: field_values
        for key in (
            "prompt",
            "max_tokens",
            "temperature",
            "stream",
            "model",
            "request_id",
            "chain_id",
            "chainId",
            "jobId",
            "job_id",
            "session_id",
            "choices",
        )
    }
    | {
        "conversation_context": st.lists(
            st.fixed_dictionaries({"role": st.text(max_size=4), "content": st.text(max_size=4)})
            | field_values,
            max_size=3,
        )
        | field_values
    },
)
messages = st.one_of(
    requests,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["prompt", "inference", "session_init"])},
        optional={"request": requests | field_values, "prompt": field_values, "id": field_values},
    ),
    field_values,
)
valid = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=8), "max_tokens": st.integers(1, 2**64)},
    optional={"temperature": st.floats(0, 2), "chain_id": st.integers(0, 2**64)},
)
engine_errors = st.one_of(
    st.text(max_size=40),
    st.tuples(
        st.sampled_from(
            [
                "This model's maximum context length is {w} tokens. However, you requested x "
                "tokens ({p} in the messages",
                "Requested tokens ({p}) exceed context window of {w}",
                "the request ({p} tokens) exceeds the available context size ({w} tokens)",
            ]
        ),
        st.sampled_from(["1", "0", "١٢", "1" * 4301, "99999999999999999999"]),
        st.sampled_from(["2", "٣", "1" * 5000]),
    ).map(lambda t: t[0].format(p=t[1], w=t[2])),
)


def _loads(text: str) -> Any:
    try:
        return safejson.loads(text)
    except (ValueError, RecursionError):
        return text


@fuzz_settings()
@given(
    st.one_of(
        st.tuples(st.just("object"), messages | valid),
        st.tuples(st.just("frame"), json_text(messages)),
        st.tuples(st.just("engine"), engine_errors),
    )
)
def test_any_node_message(case: tuple[str, Any]) -> None:
    kind, value = case
    if kind == "object":
        oracles.check_node_message(value)
    elif kind == "frame":
        # As node_ws reads a text frame: JSON (refused as invalid_json) whose object it parses.
        oracles.check_node_message(_loads(value))
    else:
        oracles.check_engine_error(value)
        oracles.check_node_message({"prompt": value, "max_tokens": 1, "request_id": value})
        json.dumps(value)
