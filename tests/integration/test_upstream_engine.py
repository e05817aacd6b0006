"""Pin the facts about the real llama-cpp-python server that the metering relies on.

If an upgrade of the engine changes any of these, metering that counts stream chunks (because the
engine reports no usage in streams) would silently miscount: these tests fail first.
Every request runs on the tiny model (upstream/make_tiny_model.py), which never stops early, so
``max_tokens`` is the exact number of generated tokens.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any

import pytest

from tests.support.llama import LlamaServer, llama_cpp_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python[server] not installed"),
]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPTS = ["Hello there, how are you?", "The quick brown fox", "héllo wörld 日本語 🙂 </s> <s>"]
TEMPERATURES: list[float | None] = [0.0, 0.7, None]  # None: the engine's default


@pytest.fixture
def engine(llama_server: LlamaServer) -> LlamaServer:
    """The session's real server (tests/conftest.py), under a short name."""
    return llama_server


# -- helpers ---------------------------------------------------------------------------------


def _body(path: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, **extra}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return {key: value for key, value in body.items() if value is not None}


def _post_raw(engine: LlamaServer, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """Status, content type and the body exactly as the engine sent it (no client decoding)."""
    connection = http.client.HTTPConnection(engine.host, engine.port, timeout=120)
    try:
        connection.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def _sse_events(raw: bytes) -> list[bytes]:
    """Split a stream into event payloads, checking the exact framing on the way."""
    assert b"\r" not in raw, "llama-cpp-python frames with LF only"
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    payloads = []
    for event in events[:-1]:
        assert event.startswith(b"data: "), event
        assert b"\n" not in event, "one data line per event"
        payloads.append(event[len(b"data: ") :])
    assert payloads[-1] == b"[DONE]"
    assert b"[DONE]" not in payloads[:-1]
    return payloads


def _stream(engine: LlamaServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    status, content_type, raw = _post_raw(engine, path, {**body, "stream": True})
    assert status == 200, raw
    assert content_type.startswith("text/event-stream")
    return [json.loads(payload) for payload in _sse_events(raw)[:-1]]


def _content(path: str, chunk: dict[str, Any]) -> str | None:
    choice = chunk["choices"][0]
    text = choice["delta"].get("content") if path == CHAT else choice["text"]
    return None if text is None else str(text)


def _json(engine: LlamaServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, content_type, raw = _post_raw(engine, path, body)
    assert status == 200, raw
    assert content_type.startswith("application/json")
    result: dict[str, Any] = json.loads(raw)
    return result


# -- non-stream: usage is reported and exact -------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("max_tokens", [1, 7, 64])
def test_non_stream_usage_counts_exactly_max_tokens(
    engine: LlamaServer, path: str, temperature: float | None, max_tokens: int
) -> None:
    for prompt in PROMPTS:
        response = _json(engine, path, _body(path, prompt, max_tokens, temperature=temperature))
        usage = response["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert response["choices"][0]["finish_reason"] == "length"


# -- streams: no usage; one content chunk per token -------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream_options", [None, {"include_usage": True}])
def test_streams_carry_no_usage_even_when_asked(
    engine: LlamaServer, path: str, stream_options: dict[str, bool] | None
) -> None:
    chunks = _stream(engine, path, _body(path, PROMPTS[0], 9, stream_options=stream_options))
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("max_tokens", [1, 5, 33, 200])
def test_stream_content_chunks_equal_max_tokens(
    engine: LlamaServer, path: str, temperature: float | None, max_tokens: int
) -> None:
    for prompt in PROMPTS:
        chunks = _stream(engine, path, _body(path, prompt, max_tokens, temperature=temperature))
        contents = [_content(path, chunk) for chunk in chunks]
        assert sum(1 for text in contents if text) == max_tokens
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_greedy_stream_text_equals_non_stream_text(engine: LlamaServer, path: str) -> None:
    body = _body(path, PROMPTS[1], 40, temperature=0.0)
    chunks = _stream(engine, path, body)
    streamed = "".join(_content(path, chunk) or "" for chunk in chunks)
    choice = _json(engine, path, body)["choices"][0]
    assert streamed == (choice["message"]["content"] if path == CHAT else choice["text"])


# -- stream shapes -----------------------------------------------------------------------------


def test_chat_stream_shape(engine: LlamaServer) -> None:
    chunks = _stream(engine, CHAT, _body(CHAT, PROMPTS[0], 4))
    assert len(chunks) == 1 + 4 + 1
    first, *middle, last = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert first["choices"][0]["finish_reason"] is None
    for chunk in middle:
        assert set(chunk["choices"][0]["delta"]) == {"content"}
        assert chunk["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length"
    assert {chunk["id"] for chunk in chunks} == {first["id"]}
    assert first["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(len(chunk["choices"]) == 1 for chunk in chunks)


def test_completions_stream_shape(engine: LlamaServer) -> None:
    chunks = _stream(engine, COMPLETIONS, _body(COMPLETIONS, PROMPTS[0], 4))
    assert len(chunks) == 4 + 1
    *tokens, last = chunks
    assert all(chunk["choices"][0]["text"] for chunk in tokens)
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in tokens)
    assert last["choices"][0] == {
        "text": "",
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all(chunk["object"] == "text_completion" for chunk in chunks)


def test_empty_prompt_counts_bos_as_first_completion_token(engine: LlamaServer) -> None:
    # llama-cpp-python starts an empty-prompt completion from BOS and counts it: usage says
    # max_tokens, the stream sends max_tokens token chunks of which the first has empty text.
    # Metering that counts only non-empty chunks would be one short here.
    usage = _json(engine, COMPLETIONS, _body(COMPLETIONS, "", 6))["usage"]
    assert usage == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}
    chunks = _stream(engine, COMPLETIONS, _body(COMPLETIONS, "", 6))
    token_chunks = [c for c in chunks if c["choices"][0]["finish_reason"] is None]
    assert len(token_chunks) == 6
    assert token_chunks[0]["choices"][0]["text"] == ""
    assert all(c["choices"][0]["text"] for c in token_chunks[1:])


def test_max_tokens_is_shortened_to_fit_the_context(engine: LlamaServer) -> None:
    # prompt + completion must stay below n_ctx: the engine silently generates fewer tokens.
    prompt = " ".join(["the water of the world"] * 400)
    usage = _json(engine, COMPLETIONS, _body(COMPLETIONS, prompt, 500))["usage"]
    expected = engine.n_ctx - usage["prompt_tokens"]
    assert 0 < expected < 500
    assert usage["completion_tokens"] == expected
    chunks = _stream(engine, COMPLETIONS, _body(COMPLETIONS, prompt, 500))
    assert sum(1 for chunk in chunks if chunk["choices"][0]["text"]) == expected


def test_a_second_request_does_not_abort_a_running_stream(engine: LlamaServer) -> None:
    # Needs --interrupt_requests False (upstream/serve.py always passes it).
    # Long enough (about a second here) that the second request arrives while it runs.
    max_tokens = 1500
    connection = http.client.HTTPConnection(engine.host, engine.port, timeout=120)
    try:
        connection.request(
            "POST",
            CHAT,
            body=json.dumps(_body(CHAT, PROMPTS[0], max_tokens, stream=True)),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        first = response.readline()  # the stream is running
        assert first.startswith(b"data: ")
        second: dict[str, Any] = {}

        def other_request() -> None:
            second.update(_json(engine, COMPLETIONS, _body(COMPLETIONS, "hi", 3)))

        thread = threading.Thread(target=other_request)
        thread.start()
        raw = first + response.read()
        thread.join(timeout=120)
    finally:
        connection.close()
    chunks = [json.loads(payload) for payload in _sse_events(raw)[:-1]]
    assert sum(1 for chunk in chunks if _content(CHAT, chunk)) == max_tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert second["usage"]["completion_tokens"] == 3


def test_model_names(engine: LlamaServer) -> None:
    connection = http.client.HTTPConnection(engine.host, engine.port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        models = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    assert [model["id"] for model in models["data"]] == [engine.model_id]
    # Responses echo whatever model name the request gives, and the file path when none.
    named = _json(engine, COMPLETIONS, _body(COMPLETIONS, "hi", 1, model="any-name"))
    assert named["model"] == "any-name"
    unnamed = _json(engine, COMPLETIONS, _body(COMPLETIONS, "hi", 1))
    assert unnamed["model"] == str(engine.model)
