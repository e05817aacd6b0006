"""The host node's messages (fabstir-llm-node), parsed and built: pure, no I/O.

Marketplace clients speak this API to a host: ``POST /v1/inference`` (``node_http``) and a
session protocol over the WebSocket ``/v1/ws`` (``node_ws``). This module checks what they send
(:func:`parse_inference`, :func:`job_of`), turns a prompt into the OpenAI request the engine
answers (:func:`to_openai`), and builds the replies (:func:`chunk_text`, :func:`usage_json`,
:class:`TokenLimitExceeded`), so both shells share one reading of the protocol.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.errors import BadRequest
from sidecar.metering import Endpoint, Usage
from sidecar.metering.jobs import InvalidJobId, parse_job_id, resolve_job_id

DEFAULT_TEMPERATURE = 0.7

# -- the request, parsed and checked -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferenceParams:
    prompt: str
    max_tokens: int
    temperature: float
    stream: bool
    model: str | None = None
    request_id: str | None = None
    chain_id: int | None = None
    context: tuple[tuple[str, str], ...] = ()  # (role, content) of earlier turns


def parse_inference(obj: object, *, default_stream: bool = False) -> InferenceParams:
    """Check a node-API inference request (``/v1/inference`` body, or a WS ``request``)."""
    if type(obj) is not dict:
        raise BadRequest("the request must be a JSON object", param="request")
    prompt = obj.get("prompt")
    if type(prompt) is not str or not prompt:
        raise BadRequest("prompt is required: a non-empty string", param="prompt")
    max_tokens = obj.get("max_tokens")
    if type(max_tokens) is not int or max_tokens <= 0:
        raise BadRequest(
            f"max_tokens must be an integer above 0, got {show(max_tokens)}", param="max_tokens"
        )
    temperature = obj.get("temperature", DEFAULT_TEMPERATURE)
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    if type(temperature) not in (int, float) or not 0 <= temperature <= 2:
        raise BadRequest(
            f"temperature must be a number from 0 to 2, got {show(temperature)}",
            param="temperature",
        )
    stream = obj.get("stream", default_stream)
    if type(stream) is not bool:
        raise BadRequest(f"stream must be true or false, got {show(stream)}", param="stream")
    model = obj.get("model")
    if model is not None and (type(model) is not str or not model):
        raise BadRequest(f"model must be a model name, got {show(model)}", param="model")
    request_id = obj.get("request_id")
    if request_id is not None and type(request_id) not in (str, int):
        raise BadRequest("request_id must be a string", param="request_id")
    return InferenceParams(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=float(temperature),
        stream=stream,
        model=model,
        request_id=None if request_id is None else str(request_id),
        chain_id=chain_id_of(obj),
        context=_context(obj.get("conversation_context")),
    )


def chain_id_of(obj: dict[str, Any]) -> int | None:
    value = obj.get("chain_id", obj.get("chainId"))
    if value is None:
        return None
    # A uint256 has at most 78 digits (and int() refuses over 4300: a ValueError, not ours).
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 78:
        return int(value)
    if type(value) is not int or value < 0:
        raise BadRequest(f"chain_id must be an integer, got {show(value)}", param="chain_id")
    return value


def _context(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if type(value) is not list:
        raise BadRequest("conversation_context must be a list", param="conversation_context")
    turns = []
    for item in value:
        if type(item) is str:
            turns.append(("user", item))
        elif (
            type(item) is dict
            and type(item.get("role")) is str
            and type(item.get("content")) is str
        ):
            turns.append((item["role"], item["content"]))
        else:
            raise BadRequest(
                "conversation_context items must be {role, content} objects",
                param="conversation_context",
            )
    return tuple(turns)


def check_chain(params: InferenceParams, *, chain_id: int | None) -> None:
    """The request's chain must be this host's (when both name one)."""
    if params.chain_id is not None and chain_id is not None and params.chain_id != chain_id:
        raise BadRequest(
            f"chain_id {params.chain_id} is not this host's chain ({chain_id})",
            param="chain_id",
            code="wrong_chain",
        )


def to_openai(params: InferenceParams) -> tuple[Endpoint, dict[str, Any]]:
    """The OpenAI request for a node-API inference: a completion, or a chat with context."""
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature}
    if params.model is not None:
        body["model"] = params.model
    if not params.context:
        return Endpoint.COMPLETIONS, {**body, "prompt": params.prompt}
    messages = [{"role": role, "content": content} for role, content in params.context]
    messages.append({"role": "user", "content": params.prompt})
    return Endpoint.CHAT, {**body, "messages": messages}


def chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """The text and finish reason of one OpenAI stream chunk (completion or chat)."""
    choices = chunk.get("choices")
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        return "", None
    choice = choices[0]
    text = choice.get("text")
    if text is None and type(choice.get("delta")) is dict:
        text = choice["delta"].get("content")
    if text is None and type(choice.get("message")) is dict:
        text = choice["message"].get("content")
    reason = choice.get("finish_reason")
    return (text if type(text) is str else ""), (reason if type(reason) is str else None)


def job_of(named: list[tuple[str, object]], lenient: list[tuple[str, object]]) -> int | None:
    """The one job named by ``named`` (strict) and by ``lenient`` fields that look like ids.

    On the WebSocket a ``session_id`` may be an opaque label ("sess-1") as well as a job id
    ("164n"): it names the job only when it parses as one."""
    pairs = list(named)
    for where, value in lenient:
        with contextlib.suppress(InvalidJobId):
            parse_job_id(value, where=where)
            pairs.append((where, value))
    return resolve_job_id(pairs)


class PromptMeasure(Protocol):
    @property
    def prompt_tokens(self) -> int | None: ...

    @property
    def context_window(self) -> int | None: ...


def answer_fields(
    reply: dict[str, Any], usage: Usage, request_id: str, measured: PromptMeasure
) -> dict[str, Any]:
    """What a node answer to one prompt says, over HTTP and on the socket alike. The engine's
    own usage first; the prompt's measure where the answer lacks it."""
    content, reason = chunk_text(reply)
    prompt_tokens = usage.prompt_tokens if usage.prompt_tokens else measured.prompt_tokens
    return {
        "content": content,
        "tokens_used": usage.completion_tokens,
        "finish_reason": reason or "stop",
        "request_id": request_id,
        "usage": usage_json(prompt_tokens, usage.completion_tokens, measured.context_window),
    }


def show(value: object) -> str:
    text = json.dumps(value) if type(value) in (int, float, str, bool, type(None)) else "an object"
    return text if len(text) <= 40 else text[:40] + "..."


def usage_json(
    prompt_tokens: int | None, completion_tokens: int, context_window: int | None = None
) -> dict[str, int]:
    """The node's ``usage``; ``context_window_size`` only where the window is known."""
    prompt = prompt_tokens or 0
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if context_window is not None:
        usage["context_window_size"] = context_window
    return usage


class TokenLimitExceeded(BadRequest):
    """A prompt longer than the context window: the node's ``TOKEN_LIMIT_EXCEEDED``, whose
    numbers the SDK turns into a ``ContextLimitError``."""

    code = "TOKEN_LIMIT_EXCEEDED"

    def __init__(self, prompt_tokens: int, context_window: int) -> None:
        super().__init__(
            f"Prompt ({prompt_tokens} tokens) exceeds context window ({context_window} tokens)",
            param="prompt",
        )
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window

    def socket_message(self) -> dict[str, Any]:
        return {
            **super().socket_message(),
            "prompt_tokens": self.prompt_tokens,
            "context_window_size": self.context_window,
        }


# Engines' words for a prompt over the window (in an error answer): OpenAI's, which
# llama-cpp-python and vLLM use, and llama.cpp's. Counts of at most 20 digits: int() refuses
# over 4300, and no window is longer.
_ENGINE_LIMIT = (
    re.compile(
        r"maximum context length is (?P<window>\d{1,20}) tokens.*?"
        r"\((?P<prompt>\d{1,20}) in (?:your prompt|the messages)"
    ),
    re.compile(
        r"Requested tokens \((?P<prompt>\d{1,20})\) exceed context window of "
        r"(?P<window>\d{1,20})(?!\d)"
    ),
    re.compile(
        r"\((?P<prompt>\d{1,20}) tokens\) exceeds the available context size "
        r"\((?P<window>\d{1,20}) tokens\)"
    ),
)


def token_limit_of(engine_message: str) -> TokenLimitExceeded | None:
    """The engine's own "prompt too long" error, as the node reports it; None for others."""
    for pattern in _ENGINE_LIMIT:
        match = pattern.search(engine_message)
        if match is not None:
            return TokenLimitExceeded(int(match["prompt"]), int(match["window"]))
    return None


def close_code(status: int) -> int:
    """The WebSocket close code for a refused job."""
    # 1008 (policy violation) for a job this host must not serve; 1011 when the chain is down.
    return 1011 if status >= 500 else 1008
