"""Reading and adjusting a client's request body before it goes upstream.

The job fields are the sidecar's business, not the engine's: they are removed from the body
(an engine with strict validation would reject them). When the engine only reports usage in
streams with ``stream_options.include_usage`` and the client did not ask for it, it is added
and the relay must strip the usage-only chunk the client did not ask for (StreamMeter's
``strip_usage_chunk``). Otherwise the client's bytes go upstream untouched, the same object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.metering import safejson
from sidecar.metering.jobs import JOB_BODY_FIELDS, resolve_job_id
from sidecar.metering.types import Endpoint

__all__ = ["InvalidRequestBody", "PreparedRequest", "prepare_request"]


class InvalidRequestBody(ValueError):
    """The request body cannot be metered: not JSON, not an object, or not re-encodable."""


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    job_id: int | None  # None: the request names no job
    body: bytes  # what to send upstream: the client's own bytes object unless modified
    modified: bool  # body differs from the client's (job fields removed, usage injected)
    stream: bool  # the client asked for a stream (``"stream": true``)
    model: str | None
    client_wants_usage: bool  # the client set ``stream_options.include_usage: true``
    strip_usage_chunk: bool  # include_usage was injected: strip the usage chunk on relay
    # A stream's prompt text (completions: the prompt; chat: the messages' text; responses:
    # the input), for counting its prompt where the engine's stream says nothing of it.
    prompt_text: str | None = None


def prepare_request(
    endpoint: Endpoint,
    raw: bytes,
    header_job_ids: Sequence[str | tuple[str, str]] = (),
    *,
    inject_include_usage: bool,
    engine_model: Callable[[str], str] | None = None,
) -> PreparedRequest:
    """Parse a request body, take the job id out of it, and decide what to send upstream.

    ``header_job_ids`` are the values of the ``X-Job-Id``/``X-Session-Id`` headers, either
    plain values or ``(header name, value)`` pairs (the name goes in error messages). Raises
    :class:`InvalidRequestBody` for a body that is not a JSON object, and
    :class:`~sidecar.metering.jobs.InvalidJobId` for a bad or contradictory job id.
    ``engine_model`` maps the requested model name to the engine's (``--model``).
    """
    body = _parse_object(raw)
    named: list[tuple[str, object]] = [
        (f"header {item[0]}", item[1]) if isinstance(item, tuple) else ("a job id header", item)
        for item in header_job_ids
    ]
    removed = False
    for key in JOB_BODY_FIELDS:
        if key in body:
            named.append((f"body field {key!r}", body.pop(key)))
            removed = True
    if removed and _has_duplicate_keys(raw):
        # json.loads keeps the last of duplicate keys; the others must agree with it.
        named.extend(_duplicate_job_fields(raw))
    job_id = resolve_job_id(named)

    stream = body.get("stream") is True
    model = body.get("model")
    renamed = False
    if engine_model is not None and type(model) is str:
        served_by = engine_model(model)  # raises for a name this host does not serve
        if served_by != model:
            body["model"] = served_by
            renamed = True
    options = body.get("stream_options")
    wants_usage = type(options) is dict and options.get("include_usage") is True
    strip = False
    chat_like = endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS)  # stream_options exists there
    if inject_include_usage and stream and not wants_usage and chat_like:
        merged = dict(options) if type(options) is dict else {}
        merged["include_usage"] = True
        body["stream_options"] = merged
        strip = True
    modified = removed or strip or renamed
    return PreparedRequest(
        job_id=job_id,
        body=_encode(body) if modified else raw,
        modified=modified,
        stream=stream,
        model=model if type(model) is str else None,
        client_wants_usage=wants_usage,
        strip_usage_chunk=strip,
        prompt_text=_prompt_text(endpoint, body) if stream else None,
    )


def _prompt_text(endpoint: Endpoint, body: dict[str, Any]) -> str | None:
    """The text a request's prompt is made of (chat: its messages' contents, without the
    template's own tokens, which only the engine knows)."""
    if endpoint is Endpoint.COMPLETIONS:
        prompt = body.get("prompt")
        if type(prompt) is list and all(type(p) is str for p in prompt):
            return "".join(prompt)
        return prompt if type(prompt) is str else None
    value = body.get("input" if endpoint is Endpoint.RESPONSES else "messages")
    if type(value) is str:
        return value  # a Responses API input may be plain text
    messages: list[Any] = value if type(value) is list else []
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if type(message) is dict else None
        if type(content) is str:
            parts.append(content)
        elif type(content) is list:
            parts.extend(
                c["text"] for c in content if type(c) is dict and type(c.get("text")) is str
            )
    return "\n".join(parts) if parts else None


LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
RESPONSES_LIMIT_FIELDS = ("max_output_tokens",)  # the Responses API's name for the limit


def cap_max_tokens(
    body: bytes, cap: int, *, default: int | None = None, fields: tuple[str, ...] = LIMIT_FIELDS
) -> tuple[bytes, int, bool]:
    """Bound the request's ``max_tokens`` (and ``max_completion_tokens``) by ``cap``.

    A limit above ``cap`` (or not a positive integer) becomes ``cap``; a request that names no
    ``max_tokens`` gets ``min(default, cap)`` (``cap`` without a default): absent means the
    engine's own, possibly unbounded, default. ``max_completion_tokens`` is bounded only when the
    client sent it. Returns the body to send, the limit in force, and whether the body changed;
    an unchanged body is the same bytes object.
    """
    obj = _parse_object(body)
    changed = False
    limits = []
    for key in fields:
        value = obj.get(key)
        if type(value) is int and 0 < value <= cap:
            limits.append(value)
        elif value is not None or key == fields[0]:
            obj[key] = cap if value is not None or default is None else min(default, cap)
            limits.append(obj[key])
            changed = True
    return (_encode(obj) if changed else body), min(limits), changed


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = safejson.loads(raw)
    except RecursionError:
        raise InvalidRequestBody("request body is nested too deeply to parse") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestBody(f"request body is not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestBody(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError:
        # The one other ValueError json raises: int() refuses a number of over 4300 digits.
        raise InvalidRequestBody("request body has a number too long to parse") from None
    if type(body) is not dict:
        raise InvalidRequestBody(f"request body must be a JSON object, got {_kind(body)}")
    return body


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


# An escaped ASCII letter or "_" in a string ("job\u005fid" is "job_id"): a key written so
# is not found by its plain bytes.
_ESCAPED_ASCII = re.compile(rb"\\u00[4-7]")


def _has_duplicate_keys(raw: bytes) -> bool:
    """Cheap test: might a job field appear twice? (Only then is a slower parse needed.) Also
    true when a key may be written with escapes, or the body is UTF-16 or UTF-32, which
    json.loads reads too (their NUL bytes tell them apart: UTF-8 JSON has none)."""
    return (
        any(raw.count(b'"' + key.encode() + b'"') > 1 for key in JOB_BODY_FIELDS)
        or b"\x00" in raw
        or _ESCAPED_ASCII.search(raw) is not None
    )


def _duplicate_job_fields(raw: bytes) -> list[tuple[str, object]]:
    """Every job field of the top-level object, duplicates included."""
    top: list[list[tuple[str, Any]]] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        top.append(pairs)  # objects close inner-first: the top-level object comes last
        return dict(pairs)

    safejson.loads(raw, object_pairs_hook=keep_pairs)
    return [(f"body field {key!r}", value) for key, value in top[-1] if key in JOB_BODY_FIELDS]


def _encode(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Refuses NaN/Infinity (a number too large for a float) as
    invalid JSON rather than forward it; escapes lone surrogates, which UTF-8 cannot carry."""
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise InvalidRequestBody(
            "request body has a number out of range (NaN, Infinity or too large for a float)"
        ) from None
    except RecursionError:
        raise InvalidRequestBody("request body is nested too deeply to re-encode") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":")).encode("ascii")
