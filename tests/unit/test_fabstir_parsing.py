"""The host node API's message parsing: pure functions, checked on any input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.metering import Endpoint
from sidecar.metering.jobs import InvalidJobId
from sidecar.shells.node_protocol import (
    BadRequest,
    InferenceParams,
    chunk_text,
    job_of,
    parse_inference,
    to_openai,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
request_keys = st.sampled_from(
    [
        "prompt",
        "max_tokens",
        "temperature",
        "stream",
        "model",
        "request_id",
        "conversation_context",
        "chain_id",
        "chainId",
    ]
)


@given(st.dictionaries(request_keys, json_values, max_size=9) | json_values)
def test_parse_inference_accepts_or_names_a_field(value) -> None:
    try:
        params = parse_inference(value)
    except BadRequest as exc:
        assert str(exc)
        return
    assert params.prompt and params.max_tokens > 0 and 0 <= params.temperature <= 2
    endpoint, body = to_openai(params)
    assert body["max_tokens"] == params.max_tokens
    assert ("messages" in body) is (endpoint is Endpoint.CHAT)


def test_defaults_and_fields() -> None:
    params = parse_inference({"prompt": "hi", "max_tokens": 5})
    assert params == InferenceParams(prompt="hi", max_tokens=5, temperature=0.7, stream=False)
    assert parse_inference({"prompt": "hi", "max_tokens": 5}, default_stream=True).stream
    for body, param in (
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 5, "temperature": 3}, "temperature"),
        ({"prompt": "hi", "max_tokens": 5, "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "max_tokens": 5, "stream": "yes"}, "stream"),
        ({"prompt": "hi", "max_tokens": 5, "conversation_context": [1]}, "conversation_context"),
    ):
        with pytest.raises(BadRequest) as caught:
            parse_inference(body)
        assert caught.value.param == param and param in str(caught.value)


def test_context_becomes_a_chat() -> None:
    params = parse_inference(
        {
            "prompt": "and now?",
            "max_tokens": 3,
            "conversation_context": [{"role": "user", "content": "hi"}, "plain"],
        }
    )
    endpoint, body = to_openai(params)
    assert endpoint is Endpoint.CHAT
    assert body["messages"][-1] == {"role": "user", "content": "and now?"}
    assert len(body["messages"]) == 3


def test_chunk_text_reads_both_dialects() -> None:
    assert chunk_text({"choices": [{"text": "a", "finish_reason": None}]}) == ("a", None)
    assert chunk_text({"choices": [{"delta": {"content": "b"}}]}) == ("b", None)
    assert chunk_text({"choices": [{"delta": {}, "finish_reason": "stop"}]}) == ("", "stop")
    assert chunk_text({"choices": []}) == ("", None)
    assert chunk_text({"usage": {}}) == ("", None)


def test_session_id_names_a_job_only_when_it_is_one() -> None:
    assert job_of([("jobId", "164")], [("session_id", "sess-1")]) == 164
    assert job_of([], [("session_id", "164n")]) == 164
    assert job_of([], [("session_id", "sess-1")]) is None
    with pytest.raises(InvalidJobId):
        job_of([("jobId", "164")], [("session_id", "165n")])
    with pytest.raises(InvalidJobId):
        job_of([("jobId", "x")], [])


@pytest.mark.parametrize(
    "engine_message",
    [
        # llama-cpp-python and vLLM (OpenAI's wording)
        "the engine answered 400: This model's maximum context length is 2048 tokens, however "
        "you requested 2706 tokens (2702 in your prompt; 4 for the completion).",
        "This model's maximum context length is 2048 tokens. However, you requested 2706 tokens "
        "(2702 in the messages, 4 in the completion).",
        "Requested tokens (2702) exceed context window of 2048",
        "the request (2702 tokens) exceeds the available context size (2048 tokens), try "
        "increasing it",
    ],
)
def test_engines_prompt_too_long_errors_become_token_limit_exceeded(engine_message) -> None:
    from sidecar.shells.node_protocol import token_limit_of

    error = token_limit_of(engine_message)
    assert error is not None and error.code == "TOKEN_LIMIT_EXCEEDED"
    assert error.socket_message() == {
        "type": "error",
        "code": "TOKEN_LIMIT_EXCEEDED",
        "message": "Prompt (2702 tokens) exceeds context window (2048 tokens)",
        "prompt_tokens": 2702,
        "context_window_size": 2048,
    }
    assert token_limit_of("the engine answered 500: out of memory") is None
