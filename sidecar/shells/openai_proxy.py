"""The OpenAI routes: a reverse proxy that relays every request to the engine and meters answers.

``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and ``/v1/responses``
(and the engines' aliases of them) are metered through :mod:`sidecar.exchange`; the engines' own
generation routes are refused; every other path is relayed as is
(:mod:`sidecar.shells.route_policy`). Invariants:

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
import logging
import time

from aiohttp import web

from sidecar.calls import Call
from sidecar.engine import EngineClient, EngineResponse
from sidecar.errors import BadRequest, RequestTooLarge, SidecarError, UpstreamBroke, to_response
from sidecar.exchange import Exchange
from sidecar.metering import Endpoint, InvalidJobId, InvalidRequestBody, prepare_request
from sidecar.metering.requests import PreparedRequest
from sidecar.models import ModelNames
from sidecar.shells.headers import (
    JOB_HEADERS,
    METERED_REQUEST_DROP,
    RECEIPT_REQUEST_HEADER,
    REQUEST_DROP,
    RESPONSE_DROP,
    call_headers,
    forwardable_headers,
    without_job_token,
)
from sidecar.shells.http import abort_client, read_body
from sidecar.shells.route_policy import is_native_generation, metered_endpoint

log = logging.getLogger("sidecar.proxy")

JOB_HINT = "name the job with job_id or session_id in the body, or an X-Job-Id header"


class OpenAIProxy:
    def __init__(
        self,
        exchange: Exchange,
        engine: EngineClient,
        max_body_bytes: int,
        model_names: ModelNames,
        *,
        relay_native_generation: bool = False,
    ) -> None:
        self.exchange = exchange
        self.relay_native_generation = relay_native_generation
        # With --model, a request's model name is mapped to the engine's (and an unknown one
        # refused); without, the engine judges the names it is sent.
        self.engine_model = model_names.engine_model if model_names.configured else None
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every route the sidecar does not answer itself."""
        try:
            body = await read_body(request, self.max_body_bytes)
            endpoint = metered_endpoint(request.path) if request.method == "POST" else None
            if endpoint is None:
                if not self.relay_native_generation and is_native_generation(request.path):
                    raise BadRequest(
                        f"{request.path} is the engine's own generation route, which this "
                        "host does not meter and so does not serve; use the OpenAI routes "
                        "(/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses)",
                        code="unmetered_route",
                        status=403,
                        param=None,
                    )
                return await self._relay(request, body)
            return await self._metered(request, endpoint, body)
        except (BadRequest, RequestTooLarge) as exc:
            self.exchange.metrics.rejected.labels(exc.code).inc()
            return to_response(exc)
        except SidecarError as exc:  # refused jobs (counted by the exchange), engine, ledger
            return to_response(exc)

    # -- plain relay (unmetered routes) ----------------------------------------------------

    async def _relay(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = forwardable_headers(
            request.headers, without_job_token(REQUEST_DROP, request.headers)
        )
        upstream = await self.engine.request(request.method, request.raw_path, body, headers)
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=forwardable_headers(upstream.headers),
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.chunks():
                    await response.write(chunk)
            except UpstreamBroke as exc:
                self.exchange.metrics.upstream_errors.labels("broken_response").inc()
                log.warning("engine response broke during relay of %s: %s", request.path, exc)
                abort_client(request)
                return response
            await response.write_eof()
            return response

    # -- metered routes --------------------------------------------------------------------

    def _prepare(self, endpoint: Endpoint, body: bytes, request: web.Request) -> PreparedRequest:
        header_jobs = [(name, v) for name in JOB_HEADERS for v in request.headers.getall(name, ())]
        inject = self.exchange.inject_include_usage
        try:
            return prepare_request(
                endpoint,
                body,
                header_jobs,
                inject_include_usage=inject,
                engine_model=self.engine_model,
            )
        except InvalidJobId as exc:
            raise BadRequest(str(exc), code="invalid_job_id", param="job_id") from None
        except InvalidRequestBody as exc:
            raise BadRequest(str(exc), code="invalid_request_body") from None

    async def _metered(
        self, request: web.Request, endpoint: Endpoint, body: bytes
    ) -> web.StreamResponse:
        exchange = self.exchange
        prepared = self._prepare(endpoint, body, request)
        exchange.check_job_named(prepared.job_id, JOB_HINT)
        requester = None
        if prepared.job_id is not None:
            authorization = request.headers.get("Authorization")
            requester = exchange.requester_from_bearer(authorization, prepared.job_id)
        admission = await exchange.admit(
            endpoint, prepared.job_id, prepared.body, requester, stream=prepared.stream
        )
        call = exchange.start(endpoint, prepared.job_id, prepared.model, admission)
        sent_at = time.perf_counter()
        drop = without_job_token(METERED_REQUEST_DROP, request.headers)
        headers = forwardable_headers(request.headers, drop)
        try:
            upstream = await self.engine.request(
                request.method, request.raw_path, admission.body, headers
            )
        except BaseException:
            call.hold.release()  # nothing was served
            raise
        exchange.metrics.observe_upstream(endpoint.value, time.perf_counter() - sent_at)
        async with upstream:
            if upstream.is_event_stream:
                return await self._stream(request, upstream, call, prepared)
            return await self._answer(request, upstream, call)

    async def _answer(
        self, request: web.Request, upstream: EngineResponse, call: Call
    ) -> web.Response:
        answer = await self.exchange.answer(call, upstream)
        headers = forwardable_headers(upstream.headers, RESPONSE_DROP)
        headers.update(call_headers(call.key, call.max_tokens))
        headers.update(await self.exchange.receipt(call, answer.usage))
        return web.Response(
            status=upstream.status, reason=upstream.reason, body=answer.body, headers=headers
        )

    async def _stream(
        self,
        request: web.Request,
        upstream: EngineResponse,
        call: Call,
        prepared: PreparedRequest,
    ) -> web.StreamResponse:
        stream = self.exchange.stream(
            call,
            upstream,
            strip_usage_chunk=prepared.strip_usage_chunk,
            with_receipt=request.headers.get(RECEIPT_REQUEST_HEADER) == "1",
            prompt_text=prepared.prompt_text,
        )
        headers = forwardable_headers(upstream.headers, RESPONSE_DROP)
        headers.update(call_headers(call.key, call.max_tokens))
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        try:
            await response.prepare(request)
            async with contextlib.aclosing(stream.chunks()) as chunks:
                async for out in chunks:
                    await response.write(out)
            await response.write_eof()
        except (SidecarError, ConnectionError):
            # The engine broke off, or the ledger refused the final record: the client sees a
            # broken response, never a clean end. A client that left is recorded by the stream.
            abort_client(request)
        except asyncio.CancelledError:
            raise  # the client left: the stream closed the engine request and recorded it
        except Exception:
            abort_client(request)
            raise
        finally:
            await stream.aclose()  # records a stream that never started (client gone at once)
        return response
