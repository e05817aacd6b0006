"""The reverse proxy: relays every request to the engine, meters what comes back.

A thin shell around the sans-IO metering core: it moves bytes between the client and the engine,
feeds the engine's bytes to a meter, and hands usage records to the ledger. Invariants:

* bytes are relayed as they arrive (never buffered), except a non-stream JSON answer of a metered
  route, which is read whole so its ``usage`` can be recorded before the client gets it;
* a response's usage record is committed before its last byte (``[DONE]`` or the end of the JSON
  body) is sent; a running stream persists its progress every 64 tokens or every second;
* when the client goes away, the engine request is closed (so the engine stops generating) and
  the tokens relayed until then are recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import Settings

if TYPE_CHECKING:
    from sidecar.chain.service import ChainService
from sidecar.engines import engine_profile
from sidecar.errors import error_response
from sidecar.ledger import Ledger, RecordState, UsageRecord
from sidecar.metering import Endpoint, Source, Usage, estimate
from sidecar.metering.jobs import InvalidJobId
from sidecar.metering.requests import (
    InvalidRequestBody,
    PreparedRequest,
    cap_max_tokens,
    prepare_request,
)
from sidecar.metering.usage import StreamMeter, usage_from_body
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.proxy")

METERED_ROUTES: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
}

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
JOB_HEADERS = ("X-Job-Id", "X-Session-Id")
REQUEST_ID_HEADER = "X-Sidecar-Request-Id"
# Set when the request's max_tokens was lowered to what the job's deposit still covers.
MAX_TOKENS_HEADER = "X-Sidecar-Max-Tokens"

PROGRESS_EVERY_TOKENS = 64
PROGRESS_EVERY_SECONDS = 1.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def forwardable_headers(
    headers: CIMultiDict[str] | object, drop: frozenset[str]
) -> CIMultiDict[str]:
    """Copy headers minus hop-by-hop ones, those named in Connection, and ``drop``."""
    out: CIMultiDict[str] = CIMultiDict()
    named = set()
    for value in headers.getall("Connection", ()):  # type: ignore[attr-defined]
        named.update(token.strip().lower() for token in value.split(","))
    for name, value in headers.items():  # type: ignore[attr-defined]
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower in drop:
            continue
        out.add(name, value)
    return out


_REQUEST_DROP = frozenset({"host", "content-length", "x-job-id", "x-session-id"})
# Metered answers must come back uncompressed so the meter can read them.
_METERED_REQUEST_DROP = _REQUEST_DROP | {"accept-encoding"}
_RESPONSE_DROP = frozenset({"content-length"})


class UpstreamBroke(Exception):
    """The engine's response ended abnormally after it began."""


@dataclass(slots=True)
class _Exchange:
    """What is known about one metered request while it is being served."""

    key: str
    endpoint: Endpoint
    job_id: int | None
    model: str | None
    started_ms: int
    extra_headers: dict[str, str]


class Proxy:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        chain: ChainService | None = None,
    ) -> None:
        self.settings = settings
        self.chain = chain
        self.ledger = ledger
        self.metrics = metrics
        self.upstream_base = settings.upstream.rstrip("/")
        self.inject_include_usage = engine_profile(settings.engine).inject_include_usage
        self.bill_total = settings.bill == "total"
        self._session: aiohttp.ClientSession | None = None
        # Idempotency keys: a random 64-bit prefix per process and a counter (uuid4 would cost
        # a system call per request); unique across restarts and replicas.
        prefix = os.urandom(8).hex()
        self._keys = (f"{prefix}-{n:x}" for n in itertools.count(1))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # relay the engine's bytes exactly as sent
            timeout=aiohttp.ClientTimeout(
                total=None, sock_read=None, connect=self.settings.upstream_connect_timeout
            ),
            # Send only the client's own headers: no User-Agent, Accept or compression of ours.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Proxy.start() was not called"
        return self._session

    # -- the handler -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejected.labels("body_too_large").inc()
            return error_response(
                413,
                f"request body exceeds the limit of {self.settings.max_body_bytes} bytes",
                code="request_too_large",
            )
        endpoint = METERED_ROUTES.get(request.path) if request.method == "POST" else None
        if endpoint is None:
            return await self._relay(request, body)
        return await self._metered(request, endpoint, body)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        if not request.body_exists:
            return b""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _upstream_url(self, request: web.Request) -> str:
        return self.upstream_base + request.raw_path

    async def _open_upstream(
        self, request: web.Request, body: bytes, drop: frozenset[str]
    ) -> aiohttp.ClientResponse:
        headers = forwardable_headers(request.headers, drop)
        return await self.session.request(
            request.method,
            self._upstream_url(request),
            data=body or None,
            headers=headers,
            allow_redirects=False,
        )

    def _upstream_error(self, exc: BaseException) -> web.Response:
        if isinstance(exc, asyncio.TimeoutError):
            kind, status, detail = "timeout", 504, "did not answer in time"
        else:
            kind, status, detail = (
                "unreachable",
                502,
                f"is unreachable ({type(exc).__name__}: {exc})",
            )
        self.metrics.upstream_errors.labels(kind).inc()
        log.warning("upstream %s %s", self.upstream_base, detail)
        return error_response(
            status,
            f"the engine at {self.upstream_base} {detail}",
            type="upstream_error",
            code=f"upstream_{kind}",
        )

    # -- plain relay (unmetered routes) ----------------------------------------------------

    async def _relay(self, request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            upstream = await self._open_upstream(request, body, _REQUEST_DROP)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self._upstream_error(exc)
        async with upstream:
            headers = forwardable_headers(upstream.headers, frozenset())
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                self.metrics.upstream_errors.labels("broken_response").inc()
                log.warning("engine response broke during relay of %s: %s", request.path, exc)
                _abort_client(request)
                return response
            await response.write_eof()
            return response

    # -- metered routes --------------------------------------------------------------------

    async def _metered(
        self, request: web.Request, endpoint: Endpoint, body: bytes
    ) -> web.StreamResponse:
        header_jobs = [(name, v) for name in JOB_HEADERS for v in request.headers.getall(name, ())]
        try:
            prepared = prepare_request(
                endpoint, body, header_jobs, inject_include_usage=self.inject_include_usage
            )
        except InvalidJobId as exc:
            self.metrics.rejected.labels("invalid_job_id").inc()
            return error_response(400, str(exc), code="invalid_job_id", param="job_id")
        except InvalidRequestBody as exc:
            self.metrics.rejected.labels("invalid_body").inc()
            return error_response(400, str(exc), code="invalid_request_body")
        if prepared.job_id is None and self.settings.require_job:
            self.metrics.rejected.labels("no_job").inc()
            return error_response(
                402,
                "this host serves marketplace jobs only: name the job with job_id or session_id "
                "in the body, or an X-Job-Id header",
                code="job_required",
                param="job_id",
            )
        body = prepared.body
        extra_headers: dict[str, str] = {}
        if self.chain is not None and prepared.job_id is not None:
            from sidecar.chain.service import JobRefused

            try:
                budget = await self.chain.admit(prepared.job_id)
            except JobRefused as exc:
                self.metrics.rejected.labels(exc.code).inc()
                return error_response(exc.status, str(exc), code=exc.code, param="job_id")
            if endpoint is not Endpoint.EMBEDDINGS:
                body, lowered = cap_max_tokens(body, budget)
                if lowered:
                    # The deposit covers fewer tokens than asked: say so rather than work for free.
                    extra_headers[MAX_TOKENS_HEADER] = str(budget)
        exchange = _Exchange(
            key=next(self._keys),
            endpoint=endpoint,
            job_id=prepared.job_id,
            model=prepared.model,
            started_ms=_now_ms(),
            extra_headers=extra_headers,
        )
        sent_at = time.perf_counter()
        try:
            upstream = await self._open_upstream(request, body, _METERED_REQUEST_DROP)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self._upstream_error(exc)
        self.metrics.observe_upstream(endpoint.value, time.perf_counter() - sent_at)
        async with upstream:
            content_type = upstream.headers.get("Content-Type", "")
            if upstream.status < 300 and content_type.startswith("text/event-stream"):
                return await self._metered_stream(request, upstream, exchange, prepared)
            return await self._metered_body(request, upstream, exchange)

    def _record(self, ex: _Exchange, usage: Usage, state: RecordState, status: int) -> UsageRecord:
        if ex.endpoint is Endpoint.EMBEDDINGS:
            # Embeddings generate nothing: the work billed is the input.
            billable = usage.prompt_tokens or 0
        elif self.bill_total:
            billable = usage.total_tokens
        else:
            billable = usage.completion_tokens
        return UsageRecord(
            key=ex.key,
            job_id=ex.job_id,
            endpoint=ex.endpoint.value,
            model=ex.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            billable_tokens=billable,
            source=usage.source,
            state=state,
            status=status,
            started_ms=ex.started_ms,
            updated_ms=_now_ms(),
        )

    async def _commit(self, record: UsageRecord) -> None:
        """Make a response's final record durable; the caller sends the last byte after this."""
        started = time.perf_counter()
        try:
            await self.ledger.submit(record)
        except Exception:
            self.metrics.ledger_errors.inc()
            log.exception(
                "could not commit the usage of request %s (job %s)", record.key, record.job_id
            )
            raise
        self.metrics.ledger_write_latency.observe(time.perf_counter() - started)
        self._count(record)
        if self.chain is not None and record.job_id is not None:
            self.chain.note_usage(record.job_id)

    def _count(self, record: UsageRecord) -> None:
        self.metrics.count_response(
            record.endpoint,
            record.status,
            record.job_id,
            record.source.value,
            record.prompt_tokens,
            record.completion_tokens,
            record.billable_tokens,
        )

    async def _metered_body(
        self, request: web.Request, upstream: aiohttp.ClientResponse, ex: _Exchange
    ) -> web.StreamResponse:
        try:
            payload = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.metrics.upstream_errors.labels("broken_response").inc()
            log.warning("engine response broke before its end (job %s): %s", ex.job_id, exc)
            return error_response(
                502,
                f"the engine at {self.upstream_base} broke off its response",
                type="upstream_error",
                code="upstream_broken_response",
            )
        usage: Usage | None = None
        if upstream.status < 300:
            if not estimate.loaded() and b'"usage"' not in payload:
                # The last-resort tokenizer takes a fraction of a second to build: off the
                # event loop, and only for engines that ever answer without usage.
                await asyncio.to_thread(estimate.load)
            anomalies: list[str] = []
            usage = usage_from_body(ex.endpoint, payload, anomalies)
            if anomalies:
                self.metrics.stream_anomalies.inc(len(anomalies))
                log.warning(
                    "engine answer to %s (job %s, request %s) was malformed: %s",
                    request.path,
                    ex.job_id,
                    ex.key,
                    "; ".join(anomalies[:5]),
                )
        if usage is None:
            # An error answer, or a body nothing can be read from: zero tokens, and never
            # marked as reported by the engine.
            usage = Usage(prompt_tokens=None, completion_tokens=0, source=Source.ESTIMATED)
        record = self._record(ex, usage, RecordState.FINAL, upstream.status)
        try:
            await self._commit(record)
        except Exception:
            return _ledger_unavailable()
        headers = forwardable_headers(upstream.headers, _RESPONSE_DROP)
        headers[REQUEST_ID_HEADER] = ex.key
        headers.update(ex.extra_headers)
        return web.Response(
            status=upstream.status, reason=upstream.reason, body=payload, headers=headers
        )

    async def _metered_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        ex: _Exchange,
        prepared: PreparedRequest,
    ) -> web.StreamResponse:
        meter = StreamMeter(ex.endpoint, strip_usage_chunk=prepared.strip_usage_chunk)
        headers = forwardable_headers(upstream.headers, _RESPONSE_DROP)
        headers[REQUEST_ID_HEADER] = ex.key
        headers.update(ex.extra_headers)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        loop = asyncio.get_running_loop()
        self.metrics.streams_in_flight.inc()
        committed = False
        persisted_tokens = 0
        persisted_at = loop.time()
        try:
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    out = meter.feed(chunk)
                    if meter.done:
                        if not committed:
                            # [DONE] is in this chunk: the record goes first, then the bytes.
                            await self._commit(
                                self._record(ex, meter.usage(), RecordState.FINAL, upstream.status)
                            )
                            committed = True
                    elif meter.completion_tokens - persisted_tokens >= PROGRESS_EVERY_TOKENS or (
                        loop.time() - persisted_at >= PROGRESS_EVERY_SECONDS
                        and meter.completion_tokens != persisted_tokens
                    ):
                        persisted_tokens = meter.completion_tokens
                        persisted_at = loop.time()
                        self.ledger.submit(
                            self._record(ex, meter.usage(), RecordState.OPEN, upstream.status)
                        )
                    if out:
                        await response.write(out)
            except (
                TimeoutError,
                aiohttp.ClientPayloadError,
                aiohttp.ServerDisconnectedError,
            ) as exc:
                raise UpstreamBroke(str(exc) or type(exc).__name__) from exc
            tail = meter.finish()
            self._log_anomalies(meter, ex)
            if not committed:
                await self._commit(
                    self._record(ex, meter.usage(), RecordState.FINAL, upstream.status)
                )
                committed = True
            if tail:
                await response.write(tail)
            await response.write_eof()
            return response
        except UpstreamBroke as exc:
            meter.finish()
            self.metrics.upstream_errors.labels("broken_stream").inc()
            log.warning(
                "engine stream broke (job %s, request %s) after %d tokens: %s",
                ex.job_id,
                ex.key,
                meter.completion_tokens,
                exc,
            )
            if not committed:
                await self._commit(
                    self._record(ex, meter.usage(), RecordState.ABORTED, upstream.status)
                )
                committed = True
            _abort_client(request)
            return response
        except (asyncio.CancelledError, ConnectionError) as exc:
            # The client went away: stop the engine and keep what was relayed.
            upstream.close()
            if not committed:
                record = self._record(ex, meter.usage(), RecordState.ABORTED, upstream.status)
                # Not awaited: the write happens even though this task is being cancelled.
                self.ledger.submit(record).add_done_callback(_log_failed_write)
                self._count(record)
                committed = True
            log.info(
                "client left stream of job %s after %d tokens; engine request closed",
                ex.job_id,
                meter.completion_tokens,
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        except Exception:
            if not committed:
                self.ledger.submit(
                    self._record(ex, meter.usage(), RecordState.ABORTED, upstream.status)
                ).add_done_callback(_log_failed_write)
            _abort_client(request)
            raise
        finally:
            self.metrics.streams_in_flight.dec()

    def _log_anomalies(self, meter: StreamMeter, ex: _Exchange) -> None:
        if meter.anomalies:
            self.metrics.stream_anomalies.inc(len(meter.anomalies))
            log.warning(
                "engine stream of job %s (request %s) was malformed: %s",
                ex.job_id,
                ex.key,
                "; ".join(meter.anomalies[:5]),
            )


def _abort_client(request: web.Request) -> None:
    """Cut the client's connection so it sees a broken response, not a clean end."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _log_failed_write(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not commit a usage record: %s", future.exception())


def _ledger_unavailable() -> web.Response:
    return error_response(
        503,
        "the sidecar could not record this response's usage durably, so it was not "
        "delivered; retry later",
        type="server_error",
        code="ledger_unavailable",
    )
