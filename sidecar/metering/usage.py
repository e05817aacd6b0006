"""Token usage of an OpenAI-style response: from a whole JSON body, or from an SSE stream.

Rules, in order of trust (see ``Source``):

1. REPORTED: the engine's ``usage`` object. In a stream the last one seen wins (some engines
   send cumulative usage in every chunk: summing would overcount). An explicit ``0`` is a real
   zero; a missing field is not a zero.
2. COUNTED (streams only): one token per content-bearing choice per chunk. llama-cpp-python
   sends no usage in streams, and its content chunk count equals the non-stream
   ``completion_tokens`` where re-tokenizing the text does not. The count is a lower bound:
   tokens that print nothing (a stop sequence held back, a multi-byte character spread over
   several tokens and sent as one chunk) add no chunk.
3. ESTIMATED (whole bodies only): a tokenizer estimate of the response text (estimate.py).

Nothing here raises on bad engine output: problems are returned as data (``anomalies``, or
``None`` from :func:`usage_from_body` for a body that is not a JSON object).
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from sidecar.metering import estimate, safejson
from sidecar.metering.sse import DEFAULT_MAX_EVENT_BYTES, DONE, SSEDecoder, SSEEvent
from sidecar.metering.types import Endpoint, Source, Usage

__all__ = [
    "MAX_ANOMALIES",
    "StreamMeter",
    "UsageFields",
    "read_usage",
    "response_text",
    "response_text_tokens",
    "usage_from_body",
]

MAX_ANOMALIES = 20  # a broken engine must not grow a meter without bound

_CHAT_CONTENT_KEYS = ("content", "reasoning_content", "reasoning", "refusal")

# Exactly the JSON string literals json.loads accepts (strict: no raw control characters),
# written as runs of plain characters between escapes: one class run in the common case.
_JSON_STRING = re.compile(
    r'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
)
# Where the text of a content chunk starts, in both the spaced (Python json.dumps) and the
# compact (most other engines) serialisations.
_TEXT_NEEDLES = {
    Endpoint.CHAT: ('"content": "', '"content":"'),
    Endpoint.COMPLETIONS: ('"text": "', '"text":"'),
    Endpoint.EMBEDDINGS: (),
    Endpoint.RESPONSES: ('"delta": "', '"delta":"'),
}
# A Responses API stream has no [DONE]: it ends with one of these events, which carry the
# final ``response`` (and its ``usage``).
RESPONSE_TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.failed", "response.incomplete"}
)
# Its generated-text deltas: one per token on the engines that stream it (the chunk count).
_RESPONSE_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
    }
)
_MAX_TEMPLATE_MISSES = 16  # a stream whose chunks never repeat a shape stops trying


class UsageFields(NamedTuple):
    """What a ``usage`` object says. ``None``: absent or not a usable count."""

    prompt_tokens: int | None
    completion_tokens: int | None
    problem: str | None  # why a field could not be used, for the anomaly log
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens


def _count(usage: dict[str, Any], key: str) -> tuple[int | None, str | None]:
    """A token count field: a non-negative int. bool and float are refused (not counts)."""
    if key not in usage or usage[key] is None:
        return None, None
    value = usage[key]
    if type(value) is int and value >= 0:
        return value, None
    return None, f"usage.{key} is {_show(value)}, not a non-negative integer"


def read_usage(endpoint: Endpoint, value: object) -> UsageFields | None:
    """Read a ``usage`` value. ``None`` when it is not an object (``null`` in a stream is normal).

    ``completion_tokens`` is derived as ``total_tokens - prompt_tokens`` when only those two
    are given. Embeddings have no completion: it is 0 when the input length is known.
    """
    if type(value) is not dict:
        return None
    # The Responses API names them input and output tokens.
    prompt_key, completion_key = (
        ("input_tokens", "output_tokens")
        if endpoint is Endpoint.RESPONSES
        else ("prompt_tokens", "completion_tokens")
    )
    prompt, problem = _count(value, prompt_key)
    completion, problem2 = _count(value, completion_key)
    detail = "input" if endpoint is Endpoint.RESPONSES else "prompt"
    cached = _detail(value, f"{detail}_tokens_details", "cached_tokens")
    detail = "output" if endpoint is Endpoint.RESPONSES else "completion"
    reasoning = _detail(value, f"{detail}_tokens_details", "reasoning_tokens")
    problem = problem or problem2
    total, problem3 = _count(value, "total_tokens")
    if endpoint is Endpoint.EMBEDDINGS:
        # Embeddings bill the input only: usable when it says how long the input was.
        if prompt is None and total is not None:
            prompt = total
        if prompt is None:
            return UsageFields(None, None, problem or problem3 or "usage has no prompt_tokens")
        return UsageFields(prompt, 0, problem or problem3, cached)
    if completion is None and problem is None:
        if total is not None and prompt is not None and total >= prompt:
            completion = total - prompt
        else:
            problem = f"usage has no {completion_key}"
    return UsageFields(prompt, completion, problem, cached, reasoning)


def _detail(usage: dict[str, Any], group: str, key: str) -> int | None:
    """A count inside a ``*_tokens_details`` object; None unless a non-negative int."""
    details = usage.get(group)
    value = details.get(key) if type(details) is dict else None
    return value if type(value) is int and value >= 0 else None


def usage_from_body(
    endpoint: Endpoint, body: bytes, anomalies: list[str] | None = None
) -> Usage | None:
    """The usage of a whole (non-stream) JSON response body.

    The engine's ``usage`` when it gives a completion count (REPORTED), else an estimate over
    the response text (ESTIMATED; prompt_tokens from ``usage`` if only that was given, else
    ``None``: the prompt is not in the response).

    Returns ``None`` when the body is unusable: not valid JSON, not UTF-8, or not a JSON
    object. Nothing can be read or estimated from it; the caller records what it decides
    (zero tokens, ESTIMATED, is the honest record) and logs it. The reason, and any problem
    that did not stop the reading (a malformed ``usage``), is appended to ``anomalies`` when
    a list is given.
    """
    try:
        obj = safejson.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        if anomalies is not None:
            anomalies.append(f"response body is not valid JSON ({exc})")
        return None
    if type(obj) is not dict:
        if anomalies is not None:
            anomalies.append(f"response body is a JSON {_json_type(obj)}, not an object")
        return None
    usage = obj.get("usage")
    fields = read_usage(endpoint, usage)
    if anomalies is not None:
        if fields is not None and fields.problem is not None:
            anomalies.append(fields.problem)
        elif fields is None and usage is not None:
            anomalies.append(f"usage is {_show(usage)}, not an object")
    if fields is not None and fields.completion_tokens is not None:
        return Usage(
            fields.prompt_tokens,
            fields.completion_tokens,
            Source.REPORTED,
            fields.cached_tokens,
            fields.reasoning_tokens,
        )
    prompt = fields.prompt_tokens if fields is not None else None
    return Usage(prompt, response_text_tokens(endpoint, obj), Source.ESTIMATED)


def response_text_tokens(endpoint: Endpoint, response: dict[str, Any]) -> int:
    """Estimated completion tokens of a whole response, from the text of its choices (or, for
    the Responses API, of its ``output`` items)."""
    if endpoint is Endpoint.RESPONSES:
        return _output_tokens(response.get("output"))
    choices = response.get("choices")
    if endpoint is Endpoint.EMBEDDINGS or type(choices) is not list:
        return 0
    total = 0
    for choice in choices:
        if type(choice) is not dict:
            continue
        if endpoint is Endpoint.COMPLETIONS:
            total += _tokens(choice.get("text"))
            continue
        message = choice.get("message")
        if type(message) is not dict:
            continue
        for key in _CHAT_CONTENT_KEYS:
            total += _tokens(message.get(key))
        calls = message.get("tool_calls")
        if type(calls) is list:
            for call in calls:
                if type(call) is dict:
                    total += _function_tokens(call.get("function"))
        total += _function_tokens(message.get("function_call"))
    return total


def response_text(endpoint: Endpoint, response: dict[str, Any]) -> str:
    """The generated text of a whole response (what the engine's tokenizer counts when the
    answer has no usage): choices' text and message fields, or a Responses ``output``."""
    parts: list[str] = []
    if endpoint is Endpoint.RESPONSES:
        output = response.get("output")
        for item in output if type(output) is list else ():
            if type(item) is dict:
                for key in ("content", "summary", "arguments"):
                    parts.extend(_texts(item.get(key)))
        return "".join(parts)
    choices = response.get("choices")
    for choice in choices if type(choices) is list else ():
        if type(choice) is not dict:
            continue
        if endpoint is Endpoint.COMPLETIONS:
            parts.extend(_texts(choice.get("text")))
            continue
        message = choice.get("message")
        if type(message) is dict:
            for key in _CHAT_CONTENT_KEYS:
                parts.extend(_texts(message.get(key)))
    return "".join(parts)


def _texts(value: object) -> list[str]:
    if type(value) is str:
        return [value]
    if type(value) is list:
        return [p["text"] for p in value if type(p) is dict and type(p.get("text")) is str]
    return []


def _output_tokens(output: object) -> int:
    """A Responses API ``output``: message items' ``content`` parts, reasoning summaries,
    function calls' arguments."""
    if type(output) is not list:
        return 0
    total = 0
    for item in output:
        if type(item) is not dict:
            continue
        total += _tokens(item.get("content")) + _tokens(item.get("summary"))
        total += _tokens(item.get("arguments"))
    return total


def _function_tokens(function: object) -> int:
    if type(function) is not dict:
        return 0
    return _tokens(function.get("name")) + _tokens(function.get("arguments"))


def _tokens(value: object) -> int:
    """Tokens of a text field: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if type(value) is str:
        return estimate.count_tokens(value)
    if type(value) is list:
        return sum(
            estimate.count_tokens(part["text"])
            for part in value
            if type(part) is dict and type(part.get("text")) is str
        )
    return 0


def _count_chat(choices: list[Any]) -> int:
    n = 0
    for choice in choices:
        if type(choice) is dict:
            delta = choice.get("delta")
            if type(delta) is dict and (
                delta.get("content")
                or delta.get("reasoning_content")
                or delta.get("reasoning")
                or delta.get("refusal")
                or delta.get("tool_calls")
                or delta.get("function_call")
            ):
                n += 1
    return n


def _chunk_texts(choices: list[Any]) -> list[str]:
    """The text a stream chunk adds: completions' ``text``, chat deltas' content fields."""
    texts: list[str] = []
    for choice in choices:
        if type(choice) is not dict:
            continue
        if type(choice.get("text")) is str:
            texts.append(choice["text"])
        delta = choice.get("delta")
        if type(delta) is dict:
            texts.extend(v for k in _CHAT_CONTENT_KEYS if type(v := delta.get(k)) is str)
    return texts


def _count_completions(choices: list[Any]) -> int:
    n = 0
    for choice in choices:
        if type(choice) is dict and choice.get("text"):
            n += 1
    return n


def _count_nothing(choices: list[Any]) -> int:
    return 0


class StreamMeter:
    """Meters one SSE response stream: feed it the raw bytes, it returns the bytes to relay.

    ``completion_tokens`` is the best count so far (the last reported one, else the chunk
    count) and is a plain attribute, cheap to read after every feed. It can move down once,
    when a final reported usage replaces a chunk count.

    With ``strip_usage_chunk`` (the client did not ask for usage but the sidecar injected
    ``stream_options.include_usage``), the usage-only chunk (``"choices": []`` with a
    ``usage`` object) is cut out of the relayed bytes: bytes are then released only at block
    boundaries (after a blank line), and the block of that event is dropped exactly, comments
    inside it included; every other byte is relayed unchanged. Without it ``feed`` returns its
    argument itself, at once.
    """

    __slots__ = (
        "_after_done",
        "_count",
        "_decoder",
        "_drop_lf_at",
        "_drops",
        "_finished",
        "_fwd",
        "_held",
        "_needles",
        "_responses",
        "_suppressed",
        "_template",
        "_template_misses",
        "_texts",
        "anomalies",
        "collect_text",
        "completion_tokens",
        "counted_tokens",
        "endpoint",
        "events",
        "max_event_bytes",
        "prompt_tokens",
        "reported",
        "strip_usage_chunk",
        "stripped",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        strip_usage_chunk: bool = False,
        collect_text: bool = False,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.endpoint = endpoint
        self.strip_usage_chunk = strip_usage_chunk
        # Keep the generated text (for the engine's tokenizer, where a chunk is not a token and
        # the engine may report no usage); the fast path, which never reads the text, is off.
        self.collect_text = collect_text
        self._texts: list[str] = []
        self.completion_tokens = 0
        self.counted_tokens = 0  # content-bearing choices seen
        self.prompt_tokens: int | None = None  # from the last usage object that had it
        self.reported: Usage | None = None  # the last usable usage object
        self.events = 0  # events dispatched, [DONE] included
        self.stripped = 0  # usage-only events cut out (strip mode)
        self.anomalies: list[str] = []
        self.max_event_bytes = max_event_bytes
        self._decoder = SSEDecoder(max_event_bytes, self._on_oversized)
        self._count = (
            _count_chat
            if endpoint is Endpoint.CHAT
            else _count_completions
            if endpoint is Endpoint.COMPLETIONS
            else _count_nothing
        )
        self._responses = endpoint is Endpoint.RESPONSES
        self._after_done = False
        self._suppressed = 0
        # The last content chunk, cut around its text: (before, after, its count).
        self._template: tuple[str, str, int] | None = None
        self._template_misses = 0  # templates made since the last hit
        self._needles = _TEXT_NEEDLES[endpoint]
        self._finished = False
        # Strip mode: bytes from absolute offset _fwd on are not yet relayed (or dropped);
        # _held are those bytes, _drops the (start, end) ranges to cut from them.
        self._fwd = 0
        self._held: list[bytes] = []
        self._drops: list[tuple[int, int]] = []
        self._drop_lf_at = -1  # a dropped block ended with a CR at this offset

    @property
    def done(self) -> bool:
        """True once ``data: [DONE]`` was seen."""
        return self._after_done

    def usage(self) -> Usage:
        """The usage so far (final after :meth:`finish`)."""
        if self.reported is not None:
            return self.reported
        return Usage(self.prompt_tokens, self.counted_tokens, Source.COUNTED)

    def feed(self, data: bytes) -> bytes:
        """Meter the next bytes from upstream; return the bytes to relay to the client now."""
        if self._finished:
            raise RuntimeError("StreamMeter.feed() called after finish()")
        for event in self._decoder.feed(data):
            self._on_event(event)
        if not self.strip_usage_chunk:
            return data
        decoder = self._decoder
        # An oversized block is relayed as it comes (it is no usage chunk): hold nothing of it.
        return self._release(data, decoder.fed if decoder.skipping else decoder.block_start)

    def finish(self) -> bytes:
        """Upstream ended. Records the final anomalies; returns any bytes still held."""
        if self._finished:
            raise RuntimeError("StreamMeter.finish() called twice")
        self._finished = True
        truncated = self._decoder.close()
        if truncated is not None:
            if truncated.event is not None:
                self._note(
                    f"stream ended inside an event (not counted): "
                    f"data {_show(truncated.event.data)}"
                )
            else:
                self._note(f"stream ended with {truncated.raw_bytes} bytes after the last event")
        if not self._after_done:
            self._note("stream ended without data: [DONE]")
        if self._suppressed:
            self.anomalies.append(f"... and {self._suppressed} more anomalies")
        if not self.strip_usage_chunk:
            return b""
        return self._release(b"", self._decoder.fed)

    def _note(self, anomaly: str) -> None:
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(anomaly)
        else:
            self._suppressed += 1

    def _on_oversized(self, size: int) -> None:
        self._note(
            f"an event longer than {self.max_event_bytes} bytes was relayed but not metered "
            f"(at {size} bytes)"
        )

    def _on_event(self, event: SSEEvent) -> None:
        self.events += 1
        text = event.data
        if self._after_done:
            if not (self._responses and text == DONE):  # some engines add one after the end
                self._note(f"event after [DONE] (ignored): {_show(text)}")
            return
        if text == DONE:
            self._after_done = True
            return
        template = None if self.collect_text else self._template
        if template is not None:
            # A chunk that differs from an already parsed one only in the text string
            # parses to the same structure with another string: same count, no usage, no
            # error. Proving that (same bytes around, a valid non-empty JSON string between)
            # costs a fraction of json.loads.
            prefix, suffix, n = template
            if text.startswith(prefix) and text.endswith(suffix):
                end = len(text) - len(suffix)
                if end - len(prefix) > 2 and _JSON_STRING.fullmatch(text, len(prefix), end):
                    self._template_misses = 0
                    self._add(n)
                    return
        try:
            obj = safejson.loads(text)
        except (ValueError, RecursionError):
            self._note(f"event data is not valid JSON (skipped): {_show(text)}")
            return
        if type(obj) is not dict:
            self._note(f"event data is a JSON {_json_type(obj)}, not an object (skipped)")
            return
        if self._responses:
            self._on_response_event(obj, text)
            return
        n = 0
        choices = obj.get("choices")
        if type(choices) is list:
            if choices:
                n = self._count(choices)
                if n:
                    self._add(n)
                    if self.collect_text:
                        self._texts.extend(_chunk_texts(choices))
        elif choices is not None:
            self._note(f"event choices is {_show(choices)}, not a list (skipped)")
        usage = obj.get("usage")
        if usage is not None:
            self._on_usage(usage)
            if self.strip_usage_chunk and choices == [] and type(usage) is dict:
                self._drops.append((event.raw_start, event.raw_end))
                self.stripped += 1
        if "error" in obj:
            self._note(f"error event in stream: {_show(obj['error'])}")
        elif n and usage is None and self._template_misses < _MAX_TEMPLATE_MISSES:
            self._template_misses += 1
            self._template = self._make_template(text, n)

    def _on_response_event(self, obj: dict[str, Any], text: str) -> None:
        """One event of a Responses API stream: a text delta counts, a terminal event carries
        the usage and ends the stream (what ``[DONE]`` is for the other routes)."""
        kind = obj.get("type")
        if kind in _RESPONSE_DELTAS:
            delta = obj.get("delta")
            if delta:
                if self.collect_text and type(delta) is str:
                    self._texts.append(delta)
                self._add(1)
                if self._template_misses < _MAX_TEMPLATE_MISSES:
                    self._template_misses += 1
                    self._template = self._make_template(text, 1)
            return
        if kind in RESPONSE_TERMINAL_EVENTS:
            response = obj.get("response")
            usage = response.get("usage") if type(response) is dict else None
            if usage is not None:
                self._on_usage(usage)
            if kind != "response.completed":
                self._note(f"the response ended as {kind}")
            self._after_done = True
        elif kind == "error":
            self._note(f"error event in stream: {_show(obj.get('message') or obj)}")

    def text(self) -> str:
        """The generated text seen (with ``collect_text``; empty otherwise)."""
        return "".join(self._texts)

    def _add(self, n: int) -> None:
        self.counted_tokens += n
        if self.reported is None:
            self.completion_tokens = self.counted_tokens

    def _make_template(self, text: str, n: int) -> tuple[str, str, int] | None:
        """Cut the first text string (the content) out of a parsed chunk with count ``n``.

        The needle ends in ``: "`` after a key name, so in valid JSON its last quote opens
        a string value. An empty string is not cut: the count depends on emptiness.
        """
        for needle in self._needles:
            i = text.find(needle)
            if i >= 0:
                start = i + len(needle) - 1
                match = _JSON_STRING.match(text, start)
                if match is None or match.end() - start <= 2:
                    return None
                return text[:start], text[match.end() :], n
        return None

    def _on_usage(self, value: object) -> None:
        fields = read_usage(self.endpoint, value)
        if fields is None:
            if value is not None:
                self._note(f"usage is {_show(value)}, not an object (ignored)")
            return
        if fields.problem is not None:
            self._note(fields.problem)
        if fields.prompt_tokens is not None:
            self.prompt_tokens = fields.prompt_tokens
        if fields.completion_tokens is not None:
            self.reported = Usage(
                fields.prompt_tokens,
                fields.completion_tokens,
                Source.REPORTED,
                fields.cached_tokens,
                fields.reasoning_tokens,
            )
            self.completion_tokens = fields.completion_tokens

    def _release(self, data: bytes, end: int) -> bytes:
        """Strip mode: return the held bytes and ``data`` up to absolute offset ``end``,
        less the dropped blocks; keep the rest."""
        fwd = self._fwd
        if end == fwd:
            if data:
                self._held.append(data)
            return b""
        held = self._held
        if not held and not self._drops and self._drop_lf_at < 0 and end == fwd + len(data):
            self._fwd = end
            return data  # whole blocks, nothing dropped: relay as is
        if held:
            held.append(data)
            buf = b"".join(held)
            held.clear()
        else:
            buf = data
        pos = fwd
        if self._drop_lf_at == fwd and buf[:1] == b"\n":
            pos += 1  # the LF of a CRLF that ended a dropped block
        self._drop_lf_at = -1
        out: list[bytes] = []
        for start, stop in self._drops:
            if start > pos:
                out.append(buf[pos - fwd : start - fwd])
            pos = stop
        if self._drops:
            self._drops.clear()
            if pos == self._decoder.fed and self._decoder.pending_cr:
                # The dropped block ended with a CR that ended the input so far: a LF
                # arriving next is the rest of its CRLF and must go too.
                self._drop_lf_at = pos
        if pos < end:
            out.append(buf[pos - fwd : end - fwd])
        rest = buf[max(end, pos) - fwd :]
        if rest:
            held.append(rest)
        self._fwd = max(end, pos)
        return out[0] if len(out) == 1 else b"".join(out)


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "number"


def _show(value: object, limit: int = 80) -> str:
    """A short, safe rendering of a value for a message (repr escapes control characters)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = type(value).__name__
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)
