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
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import Settings

if TYPE_CHECKING:
    from sidecar.chain.service import ChainService
from sidecar.engines import engine_profile
from sidecar.errors import error_response
from sidecar.ledger import Ledger, RecordState, UsageRecord
from sidecar.metering import DONE, Endpoint, Source, SSEDecoder, Usage, estimate
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

    def _upstream_failure(self, exc: BaseException) -> tuple[int, str, str]:
        """Status, code and message for an engine that could not be reached (counted, logged)."""
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
        return status, f"upstream_{kind}", f"the engine at {self.upstream_base} {detail}"

    def _upstream_error(self, exc: BaseException) -> web.Response:
        status, code, message = self._upstream_failure(exc)
        return error_response(status, message, type="upstream_error", code=code)

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
        from sidecar.chain.service import JobRefused

        try:
            body, extra_headers = await self._admit(endpoint, prepared.job_id, prepared.body)
        except JobRefused as exc:
            return error_response(exc.status, str(exc), code=exc.code, param="job_id")
        exchange = self._exchange(endpoint, prepared.job_id, prepared.model, extra_headers)
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

    # -- the metering core shared by every shell (OpenAI routes, the host node API) ---------

    async def _admit(
        self, endpoint: Endpoint, job_id: int | None, body: bytes
    ) -> tuple[bytes, dict[str, str]]:
        """Ask the chain whether the job may be served; lower ``max_tokens`` to its budget.

        Returns the body to send and the headers that tell the client so. Raises
        :class:`~sidecar.chain.service.JobRefused` (counted in the metrics)."""
        extra_headers: dict[str, str] = {}
        if self.chain is None or job_id is None:
            return body, extra_headers
        from sidecar.chain.service import JobRefused

        try:
            budget = await self.chain.admit(job_id)
        except JobRefused as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise
        if endpoint is not Endpoint.EMBEDDINGS:
            body, lowered = cap_max_tokens(body, budget)
            if lowered:
                # The deposit covers fewer tokens than asked: say so rather than work for free.
                extra_headers[MAX_TOKENS_HEADER] = str(budget)
        return body, extra_headers

    def _exchange(
        self,
        endpoint: Endpoint,
        job_id: int | None,
        model: str | None,
        extra_headers: dict[str, str],
    ) -> _Exchange:
        return _Exchange(
            key=next(self._keys),
            endpoint=endpoint,
            job_id=job_id,
            model=model,
            started_ms=_now_ms(),
            extra_headers=extra_headers,
        )

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

    async def _meter_body(
        self, upstream: aiohttp.ClientResponse, ex: _Exchange, path: str
    ) -> tuple[bytes, Usage]:
        """Read a whole (non-stream) answer, extract its usage, commit its record.

        Raises :class:`UpstreamBroke` if the engine broke off, and the ledger's error if the
        record could not be committed: the caller must then not deliver the answer."""
        try:
            payload = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.metrics.upstream_errors.labels("broken_response").inc()
            log.warning("engine response broke before its end (job %s): %s", ex.job_id, exc)
            raise UpstreamBroke(str(exc) or type(exc).__name__) from exc
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
                    path,
                    ex.job_id,
                    ex.key,
                    "; ".join(anomalies[:5]),
                )
        if usage is None:
            # An error answer, or a body nothing can be read from: zero tokens, and never
            # marked as reported by the engine.
            usage = Usage(prompt_tokens=None, completion_tokens=0, source=Source.ESTIMATED)
        await self._commit(self._record(ex, usage, RecordState.FINAL, upstream.status))
        return payload, usage

    async def _metered_body(
        self, request: web.Request, upstream: aiohttp.ClientResponse, ex: _Exchange
    ) -> web.StreamResponse:
        try:
            payload, _ = await self._meter_body(upstream, ex, request.path)
        except UpstreamBroke:
            return self._broken_answer()
        except Exception:
            return _ledger_unavailable()
        headers = forwardable_headers(upstream.headers, _RESPONSE_DROP)
        headers[REQUEST_ID_HEADER] = ex.key
        headers.update(ex.extra_headers)
        return web.Response(
            status=upstream.status, reason=upstream.reason, body=payload, headers=headers
        )

    def _broken_answer(self) -> web.Response:
        return error_response(
            502,
            f"the engine at {self.upstream_base} broke off its response",
            type="upstream_error",
            code="upstream_broken_response",
        )

    async def _metered_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        ex: _Exchange,
        prepared: PreparedRequest,
    ) -> web.StreamResponse:
        pump = _StreamPump(
            self,
            upstream,
            ex,
            StreamMeter(ex.endpoint, strip_usage_chunk=prepared.strip_usage_chunk),
        )
        headers = forwardable_headers(upstream.headers, _RESPONSE_DROP)
        headers[REQUEST_ID_HEADER] = ex.key
        headers.update(ex.extra_headers)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        self.metrics.streams_in_flight.inc()
        try:
            await response.prepare(request)
            async with contextlib.aclosing(pump.chunks()) as chunks:
                async for out in chunks:
                    await response.write(out)
            await response.write_eof()
            return response
        except UpstreamBroke as exc:
            await pump.broke(exc)
            _abort_client(request)
            return response
        except (asyncio.CancelledError, ConnectionError) as exc:
            # The client went away: stop the engine and keep what was relayed.
            pump.abandon()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        except Exception:
            pump.abandon(close_upstream=False, count=False)
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

    # -- the metered call, for shells that speak another API (sidecar/fabstir_api.py) -------

    async def metered_call(
        self, endpoint: Endpoint, body: dict[str, Any], job_id: int | None
    ) -> MeteredAnswer:
        """Send one non-stream OpenAI request to the engine, metered like the OpenAI routes.

        The job is admitted by the chain (``JobRefused``) and ``max_tokens`` lowered to its
        budget; the answer's record is committed before this returns (the chain service is
        notified). Engine and ledger failures raise :class:`MeteredCallError`."""
        ex, upstream = await self._start_call(endpoint, body, job_id, stream=False)
        async with upstream:
            try:
                payload, usage = await self._meter_body(upstream, ex, _ENDPOINT_PATHS[endpoint])
            except UpstreamBroke as exc:
                raise MeteredCallError(
                    502,
                    "upstream_broken_response",
                    f"the engine at {self.upstream_base} broke off its response",
                ) from exc
            except Exception as exc:
                raise MeteredCallError(
                    503,
                    "ledger_unavailable",
                    "the sidecar could not record this response's usage durably; retry later",
                ) from exc
        return MeteredAnswer(
            key=ex.key,
            status=upstream.status,
            body=payload,
            usage=usage,
            max_tokens=_lowered(ex),
        )

    async def metered_stream(
        self, endpoint: Endpoint, body: dict[str, Any], job_id: int | None
    ) -> MeteredStream:
        """Start one streamed OpenAI request to the engine, metered like the OpenAI routes.

        Iterate the returned :class:`MeteredStream` for the engine's JSON chunks; the record is
        committed before the iteration ends. Closing it early (``aclose``, or the consuming task
        cancelled) closes the engine request and records the tokens relayed so far."""
        ex, upstream = await self._start_call(endpoint, body, job_id, stream=True)
        content_type = upstream.headers.get("Content-Type", "")
        if upstream.status >= 300 or not content_type.startswith("text/event-stream"):
            async with upstream:
                try:
                    payload, _ = await self._meter_body(upstream, ex, _ENDPOINT_PATHS[endpoint])
                except Exception:
                    payload = b""
            raise MeteredCallError(
                502 if upstream.status < 400 else upstream.status,
                "upstream_error",
                f"the engine answered {upstream.status}: {_engine_message(payload)}",
            )
        meter = StreamMeter(endpoint)
        return MeteredStream(_StreamPump(self, upstream, ex, meter), upstream.status, _lowered(ex))

    async def _start_call(
        self, endpoint: Endpoint, body: dict[str, Any], job_id: int | None, *, stream: bool
    ) -> tuple[_Exchange, aiohttp.ClientResponse]:
        payload = dict(body, stream=stream)
        if stream and self.inject_include_usage and endpoint is not Endpoint.EMBEDDINGS:
            payload["stream_options"] = {"include_usage": True}
        raw, extra = await self._admit(endpoint, job_id, json.dumps(payload).encode())
        model = body.get("model")
        ex = self._exchange(endpoint, job_id, model if type(model) is str else None, extra)
        sent_at = time.perf_counter()
        try:
            upstream = await self.session.post(
                self.upstream_base + _ENDPOINT_PATHS[endpoint],
                data=raw,
                headers={"Content-Type": "application/json"},
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise MeteredCallError(*self._upstream_failure(exc)) from exc
        self.metrics.observe_upstream(endpoint.value, time.perf_counter() - sent_at)
        return ex, upstream


_ENDPOINT_PATHS = {endpoint: path for path, endpoint in METERED_ROUTES.items()}


class MeteredCallError(Exception):
    """A metered call that could not be served: ``status`` and ``code`` shape the error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class MeteredAnswer:
    """A non-stream answer of the engine, already recorded in the ledger."""

    key: str  # the record's idempotency key
    status: int
    body: bytes  # the engine's JSON answer
    usage: Usage
    max_tokens: int | None  # set when max_tokens was lowered to the job's budget


class _StreamPump:
    """Moves one engine stream through a StreamMeter: the one streaming loop of every shell.

    ``chunks()`` yields the bytes to relay. It persists progress while the stream runs, and
    commits the FINAL record before it yields the chunk that holds ``data: [DONE]`` (or, at an
    end without it, before it returns). ``broke`` and ``abandon`` record what was relayed when
    the engine or the client breaks off."""

    def __init__(
        self, proxy: Proxy, upstream: aiohttp.ClientResponse, ex: _Exchange, meter: StreamMeter
    ) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.ex = ex
        self.meter = meter
        self.committed = False

    def _record(self, state: RecordState) -> UsageRecord:
        return self.proxy._record(self.ex, self.meter.usage(), state, self.upstream.status)

    async def chunks(self) -> AsyncIterator[bytes]:
        proxy, meter = self.proxy, self.meter
        loop = asyncio.get_running_loop()
        persisted_tokens = 0
        persisted_at = loop.time()
        try:
            async for chunk in self.upstream.content.iter_any():
                out = meter.feed(chunk)
                if meter.done:
                    if not self.committed:
                        # [DONE] is in this chunk: the record goes first, then the bytes.
                        await proxy._commit(self._record(RecordState.FINAL))
                        self.committed = True
                elif meter.completion_tokens - persisted_tokens >= PROGRESS_EVERY_TOKENS or (
                    loop.time() - persisted_at >= PROGRESS_EVERY_SECONDS
                    and meter.completion_tokens != persisted_tokens
                ):
                    persisted_tokens = meter.completion_tokens
                    persisted_at = loop.time()
                    proxy.ledger.submit(self._record(RecordState.OPEN))
                if out:
                    yield out
        except (
            TimeoutError,
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
        ) as exc:
            raise UpstreamBroke(str(exc) or type(exc).__name__) from exc
        tail = meter.finish()
        proxy._log_anomalies(meter, self.ex)
        if not self.committed:
            await proxy._commit(self._record(RecordState.FINAL))
            self.committed = True
        if tail:
            yield tail

    async def broke(self, exc: UpstreamBroke) -> None:
        """The engine's stream broke: commit what was relayed as ABORTED."""
        with contextlib.suppress(RuntimeError):  # finish() already ran
            self.meter.finish()
        self.proxy.metrics.upstream_errors.labels("broken_stream").inc()
        log.warning(
            "engine stream broke (job %s, request %s) after %d tokens: %s",
            self.ex.job_id,
            self.ex.key,
            self.meter.completion_tokens,
            exc,
        )
        if not self.committed:
            await self.proxy._commit(self._record(RecordState.ABORTED))
            self.committed = True

    def abandon(self, *, close_upstream: bool = True, count: bool = True) -> None:
        """The consumer left (client gone, generation cancelled): stop the engine, keep what
        was relayed. Does not await: safe in a task that is being cancelled."""
        if close_upstream:
            self.upstream.close()
        if not self.committed:
            record = self._record(RecordState.ABORTED)
            # Not awaited: the write happens even though this task is being cancelled.
            self.proxy.ledger.submit(record).add_done_callback(_log_failed_write)
            if count:
                self.proxy._count(record)
                if self.proxy.chain is not None and record.job_id is not None:
                    self.proxy.chain.note_usage(record.job_id)
            self.committed = True
        if close_upstream:
            log.info(
                "client left stream of job %s after %d tokens; engine request closed",
                self.ex.job_id,
                self.meter.completion_tokens,
            )


class MeteredStream:
    """A metered engine stream: :meth:`events` yields the engine's parsed JSON chunks
    (``[DONE]`` excluded).

    The FINAL record is committed before the iteration ends. ``usage`` is the metered usage
    so far (final once the iteration ended); ``aclose`` stops the engine and records the
    tokens so far as ABORTED."""

    def __init__(self, pump: _StreamPump, status: int, max_tokens: int | None) -> None:
        self._pump = pump
        self.status = status
        self.key = pump.ex.key
        self.max_tokens = max_tokens
        self._decoder = SSEDecoder()
        self._closed = False

    @property
    def usage(self) -> Usage:
        return self._pump.meter.usage()

    @property
    def completion_tokens(self) -> int:
        return self._pump.meter.completion_tokens

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """The engine's chunks; use as ``async with contextlib.aclosing(stream.events())``."""
        proxy = self._pump.proxy
        proxy.metrics.streams_in_flight.inc()
        try:
            async with contextlib.aclosing(self._pump.chunks()) as chunks:
                async for out in chunks:
                    for event in self._decoder.feed(out):
                        chunk = _json_chunk(event.data)
                        if chunk is not None:
                            yield chunk
        except UpstreamBroke as exc:
            await self._pump.broke(exc)
            raise MeteredCallError(
                502, "upstream_broken_response", "the engine's stream broke off"
            ) from exc
        except BaseException:
            self._abandon()
            raise
        finally:
            proxy.metrics.streams_in_flight.dec()
            self._release()

    async def aclose(self) -> None:
        self._abandon()
        self._release()

    def _abandon(self) -> None:
        if not self._pump.committed:
            self._pump.abandon()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._pump.upstream.release()


def _json_chunk(data: str) -> dict[str, Any] | None:
    if data == DONE:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if type(value) is dict else None


def _lowered(ex: _Exchange) -> int | None:
    value = ex.extra_headers.get(MAX_TOKENS_HEADER)
    return None if value is None else int(value)


def _engine_message(payload: bytes) -> str:
    try:
        error = json.loads(payload)["error"]
        return str(error["message"] if isinstance(error, dict) else error)[:300]
    except (ValueError, KeyError, TypeError):
        return payload[:300].decode("utf-8", "replace") or "(empty)"


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
