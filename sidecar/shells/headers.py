"""Which headers cross the proxy (RFC 9110's hop-by-hop rules), and the sidecar's own names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, MultiMapping

# RFC 9110 §7.6.1: connection-specific headers are never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)

# Headers a client may name its job with (the body's job_id / session_id are the other way).
JOB_HEADERS = ("X-Job-Id", "X-Session-Id")
# The record's idempotency key, on every metered answer.
REQUEST_ID_HEADER = "X-Sidecar-Request-Id"
# Set when admission bounded the request's max_tokens: lowered to what the job's deposit still
# covers, or written in (--default-max-tokens) for a request that named none.
MAX_TOKENS_HEADER = "X-Sidecar-Max-Tokens"

# A client's request for a stream's receipt (an SSE comment before [DONE]); never forwarded.
RECEIPT_REQUEST_HEADER = "X-Sidecar-Receipt"

REQUEST_DROP = frozenset(
    {"host", "content-length", "x-job-id", "x-session-id", "x-sidecar-receipt"}
)
# Metered answers must come back uncompressed so the meter can read them.
METERED_REQUEST_DROP = REQUEST_DROP | {"accept-encoding"}
RESPONSE_DROP = frozenset({"content-length"})


JOB_TOKEN_BEARER = "bearer sjt1."  # sidecar.auth.tokens.TOKEN_PREFIX after "Bearer "


def without_job_token(drop: frozenset[str], headers: MultiMapping[str]) -> frozenset[str]:
    """``drop`` plus Authorization when it holds a job token: the token is the sidecar's, and
    the engine would take it for a wrong API key."""
    value = headers.get("Authorization")
    if value is not None and value[: len(JOB_TOKEN_BEARER)].lower() == JOB_TOKEN_BEARER:
        return drop | {"authorization"}
    return drop


def forwardable_headers(headers: MultiMapping[str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """Copy headers minus hop-by-hop ones, those named in Connection, and ``drop``."""
    out: CIMultiDict[str] = CIMultiDict()
    named = {*drop}
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(","))
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        out.add(name, value)
    return out


def call_headers(key: str, max_tokens: int | None) -> Mapping[str, str]:
    """The sidecar's headers on every metered answer: its record's key, and ``max_tokens`` when
    admission bounded it (the receipt, :meth:`sidecar.exchange.Exchange.receipt`, comes on top)."""
    if max_tokens is None:
        return {REQUEST_ID_HEADER: key}
    return {REQUEST_ID_HEADER: key, MAX_TOKENS_HEADER: str(max_tokens)}
