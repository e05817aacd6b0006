"""The metering core of every shell: one engine call, admitted, metered and recorded.

A shell (the OpenAI proxy, the node's HTTP routes, the node's WebSocket) parses what its client
sent and formats what its client gets; everything between is here, the same for all of them:

* admission: the job must be one this host may serve (the chain says so), and ``max_tokens`` is
  lowered to what the job's deposit still covers (an ``int``, never a header string);
* the metered JSON answer: read whole, its usage extracted, its record committed, then handed
  to the shell to deliver;
* the metered stream (:class:`~sidecar.metered_stream.MeteredStream`, the one loop): bytes
  relayed as they arrive, progress persisted every 64 tokens or every second, the FINAL record
  committed before the chunk holding ``[DONE]`` is handed on, an ABORTED record when the engine
  breaks off or the consumer leaves (the engine request is then closed, so it stops generating);
* the billing rule, and after every commit: the metrics and the chain service's notice.

No sockets of the client's and no ``aiohttp.web`` here: the engine is reached through a small
protocol (:class:`EngineReply`, implemented by :class:`sidecar.engine.EngineResponse`), so the
core runs in-process in tests with a stub engine and a real ledger.

Failures are :mod:`sidecar.errors`: :class:`~sidecar.errors.JobRefused` before anything is sent,
:class:`~sidecar.errors.UpstreamError` / :class:`~sidecar.errors.UpstreamBroke` from the engine,
:class:`~sidecar.errors.LedgerUnavailable` when a record cannot be committed (the answer must
then not be delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.auth import Requester, SessionAuth
from sidecar.calls import Admission, Call, EngineReply
from sidecar.config import Settings
from sidecar.engine_detect import EngineIdentity
from sidecar.errors import JobRefused, LedgerUnavailable, UpstreamBroke, UpstreamError
from sidecar.ledger import Ledger, RecordState, UsageRecord
from sidecar.metered_stream import MeteredStream
from sidecar.metering import (
    Endpoint,
    Source,
    StreamMeter,
    Usage,
    estimate,
    safejson,
)
from sidecar.metering.requests import LIMIT_FIELDS, RESPONSES_LIMIT_FIELDS, cap_max_tokens
from sidecar.metering.usage import response_text, usage_from_body
from sidecar.metrics import Metrics
from sidecar.reservations import Hold, Reservations

if TYPE_CHECKING:  # the chain package pulls in web3; the core needs only the type
    from sidecar.chain.admission import Allowance

log = logging.getLogger("sidecar.exchange")

RETRY_FIRST_S = 1.0  # a refused final record is tried again after this, then twice as long...
RETRY_MAX_S = 30.0  # ... up to this

METERED_ROUTES: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
    "/v1/responses": Endpoint.RESPONSES,
}
ENDPOINT_PATHS: dict[Endpoint, str] = {endpoint: path for path, endpoint in METERED_ROUTES.items()}

# The receipt of a metered answer (headers of a JSON answer; an SSE comment of a stream whose
# client asked with X-Sidecar-Receipt: 1).
RECEIPT_JOB = "X-Sidecar-Job"
RECEIPT_TOKENS = "X-Sidecar-Tokens"
RECEIPT_JOB_TOKENS = "X-Sidecar-Job-Tokens"
RECEIPT_DEPOSIT_LEFT = "X-Sidecar-Deposit-Left"

ENGINE_ERROR_TEXT = 300  # characters of an engine's error message quoted to the client


class Engine(Protocol):
    """What the core needs of the engine client, for calls it makes itself."""

    async def post_json(self, path: str, body: bytes) -> EngineReply: ...


TextCounter = Callable[[str, str | None], Awaitable[int | None]]


class JobGate(Protocol):
    """What the core needs of the chain service (:class:`sidecar.chain.service.ChainService`)."""

    async def admit(self, job_id: int) -> int: ...

    def note_usage(self, job_id: int) -> None: ...

    def tokens_left(self, job_id: int, metered: int) -> int | None: ...

    def allowance(self, job_id: int) -> Allowance | None: ...


def billable_tokens(endpoint: Endpoint, usage: Usage, *, bill_total: bool) -> int:
    """The tokens a response is billed for: generated tokens (``--bill completion``) or prompt
    plus generated (``--bill total``). Embeddings generate nothing: their input is the work."""
    if endpoint is Endpoint.EMBEDDINGS:
        return usage.prompt_tokens or 0
    return usage.total_tokens if bill_total else usage.completion_tokens


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def engine_error_message(status: int, payload: bytes) -> str:
    """ "the engine answered STATUS: MESSAGE" for an engine's error answer, its text cut short."""
    try:
        error = json.loads(payload)["error"]
        text = str(error["message"] if isinstance(error, dict) else error)[:ENGINE_ERROR_TEXT]
    except (ValueError, KeyError, TypeError):
        text = payload[:ENGINE_ERROR_TEXT].decode("utf-8", "replace") or "(empty)"
    return f"the engine answered {status}: {text}"


@dataclass(frozen=True, slots=True)
class MeteredAnswer:
    """A non-stream answer of the engine, already recorded in the ledger."""

    call: Call
    status: int
    body: bytes  # the engine's answer, as sent
    usage: Usage

    @property
    def key(self) -> str:
        return self.call.key

    @property
    def max_tokens(self) -> int | None:
        return self.call.max_tokens


class Exchange:
    """The core shared by every shell; one per app."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        engine: Engine,
        chain: JobGate | None = None,
        auth: SessionAuth | None = None,
        identity: EngineIdentity | None = None,
        count_text: TextCounter | None = None,
    ) -> None:
        # The engine's own tokenizer (sidecar.engine_facts), for answers without usage where
        # chunks are not tokens; None: tiktoken's estimate is the fallback.
        self.count_text = count_text
        self.ledger = ledger
        self.auth = auth  # who may use a job (--session-auth); None: whoever names it
        self.metrics = metrics
        self.engine = engine
        self.chain = chain
        self.require_job = settings.require_job
        self.bill_total = settings.bill == "total"
        self.identity = identity or EngineIdentity(settings.engine)
        self.default_max_tokens = settings.default_max_tokens
        self.max_event_bytes = settings.max_event_bytes
        self.max_streams_per_job = settings.max_streams_per_job
        self._streams: dict[int, int] = {}  # streams open per job (in this process)
        self.reservations = Reservations()
        # Idempotency keys: a random 64-bit prefix per process and a counter (uuid4 would cost
        # a system call per request); unique across restarts and replicas.
        prefix = os.urandom(8).hex()
        self._keys = (f"{prefix}-{n:x}" for n in itertools.count(1))

    @property
    def inject_include_usage(self) -> bool:
        """Ask the engine for a stream's usage (the dialect in force, which auto may change)."""
        return self.identity.profile.inject_include_usage

    # -- admission -------------------------------------------------------------------------

    def check_job_named(self, job_id: int | None, hint: str) -> None:
        """With ``--require-job``, a request must name its job; ``hint`` says how."""
        if job_id is None and self.require_job:
            raise self.refused(
                JobRefused(f"this host serves marketplace jobs only: {hint}", code="job_required")
            )

    def refused(self, error: JobRefused) -> JobRefused:
        """Count a refusal by its code (and hand it back to raise)."""
        self.metrics.rejected.labels(error.code).inc()
        return error

    def requester_from_bearer(self, authorization: str | None, job_id: int) -> Requester | None:
        """Who an ``Authorization: Bearer <job token>`` proves the client is (None: no job
        token, or no --session-auth); a token that does not hold is refused (counted)."""
        if self.auth is None:
            return None
        try:
            return self.auth.requester_from_bearer(authorization, job_id)
        except JobRefused as exc:
            raise self.refused(exc) from None

    async def admit_job(self, job_id: int, requester: Requester | None = None) -> int | None:
        """The tokens the job may still be served to ``requester`` (None: no chain, so no
        limit), or :class:`~sidecar.errors.JobRefused` (counted). The chain is asked first, so
        a made-up job is refused before it could be bound to anyone."""
        try:
            left = None if self.chain is None else await self.chain.admit(job_id)
            if self.auth is not None:
                await self.auth.authorize(job_id, requester)
        except JobRefused as exc:
            raise self.refused(exc) from None
        return left

    async def admit(
        self,
        endpoint: Endpoint,
        job_id: int | None,
        body: bytes,
        requester: Requester | None = None,
        *,
        stream: bool = False,
    ) -> Admission:
        """Ask the chain whether the job may be served (to ``requester``); lower
        ``max_tokens`` to its budget. Raises :class:`~sidecar.errors.JobRefused` (counted).
        A stream also takes one of its job's ``--max-streams-per-job`` slots, given back with
        the admission's hold."""
        if not stream or job_id is None:
            return await self._admit(endpoint, job_id, body, requester)
        if self._streams.get(job_id, 0) >= self.max_streams_per_job:
            raise self.refused(
                JobRefused(
                    f"job {job_id} already has {self.max_streams_per_job} streams open "
                    "(--max-streams-per-job); retry when one ends",
                    code="too_many_streams",
                    status=429,
                )
            )
        self._streams[job_id] = self._streams.get(job_id, 0) + 1
        try:
            admission = await self._admit(endpoint, job_id, body, requester)
        except BaseException:
            self._stream_ended(job_id)
            raise
        hold = admission.hold
        release_inner = hold.on_release

        def release() -> None:
            if release_inner is not None:
                release_inner()
            self._stream_ended(job_id)

        slot = Hold(hold.reservations, hold.job_id, hold.tokens, on_release=release)
        return dataclasses.replace(admission, hold=slot)

    def _stream_ended(self, job_id: int) -> None:
        left = self._streams.get(job_id, 1) - 1
        if left > 0:
            self._streams[job_id] = left
        else:
            self._streams.pop(job_id, None)

    def streams_open(self, job_id: int) -> int:
        """Streams of ``job_id`` open now in this process."""
        return self._streams.get(job_id, 0)

    async def _admit(
        self,
        endpoint: Endpoint,
        job_id: int | None,
        body: bytes,
        requester: Requester | None,
    ) -> Admission:
        left = None if job_id is None else await self.admit_job(job_id, requester)
        if left is None or job_id is None or endpoint is Endpoint.EMBEDDINGS:
            return Admission(body)
        fields = RESPONSES_LIMIT_FIELDS if endpoint is Endpoint.RESPONSES else LIMIT_FIELDS
        if self.ledger.shared:
            return await self._admit_shared(job_id, left, body, fields)
        available = left - self.reservations.held(job_id)
        if available <= 0:
            raise self._held_in_flight(job_id)
        body, limit, lowered = cap_max_tokens(
            body, available, default=self.default_max_tokens, fields=fields
        )
        hold = self.reservations.grant(job_id, left, limit)
        # The deposit covers fewer tokens than asked: the shell says so rather than work for free.
        return Admission(body, limit if lowered else None, hold)

    async def _admit_shared(
        self, job_id: int, left: int, body: bytes, fields: tuple[str, ...]
    ) -> Admission:
        """Admission when replicas share the ledger: the hold is granted in the ledger, against
        every replica's holds and records at once, and the body is capped to what it got."""
        assert self.chain is not None
        allowance = self.chain.allowance(job_id)
        if allowance is None:  # admitted a moment ago, so the view is cached; never refuse for it
            raise self._held_in_flight(job_id)
        _, want, _ = cap_max_tokens(body, left, default=self.default_max_tokens, fields=fields)
        hold_id, tokens = await self.ledger.hold(
            job_id, allowance.deposit_tokens, allowance.floor, want, now_ms()
        )
        if hold_id is None or tokens <= 0:
            raise self._held_in_flight(job_id)
        body, limit, lowered = cap_max_tokens(
            body, tokens, default=self.default_max_tokens, fields=fields
        )
        ledger = self.ledger
        hold = Hold(None, job_id, tokens, on_release=lambda: ledger.release_hold(hold_id))
        return Admission(body, limit if lowered else None, hold)

    def _held_in_flight(self, job_id: int) -> JobRefused:
        return self.refused(
            JobRefused(
                f"job {job_id}'s deposit is held by requests in flight; retry when they end",
                code="budget_spent",
            )
        )

    def start(
        self, endpoint: Endpoint, job_id: int | None, model: str | None, admission: Admission
    ) -> Call:
        return Call(
            key=next(self._keys),
            endpoint=endpoint,
            job_id=job_id,
            model=model,
            started_ms=now_ms(),
            max_tokens=admission.max_tokens,
            hold=admission.hold,
        )

    # -- records ---------------------------------------------------------------------------

    def record(self, call: Call, usage: Usage, state: RecordState, status: int) -> UsageRecord:
        return UsageRecord(
            key=call.key,
            job_id=call.job_id,
            endpoint=call.endpoint.value,
            model=call.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            billable_tokens=billable_tokens(call.endpoint, usage, bill_total=self.bill_total),
            source=usage.source,
            state=state,
            status=status,
            started_ms=call.started_ms,
            updated_ms=now_ms(),
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
        )

    async def commit(self, record: UsageRecord) -> None:
        """Make a response's final record durable; the caller sends the last byte after this.
        Raises :class:`~sidecar.errors.LedgerUnavailable` when the ledger refuses it."""
        started = time.perf_counter()
        try:
            await self.ledger.submit(record)
        except Exception as exc:  # any failure of the write: the record is not durable
            self.metrics.ledger_errors.inc()
            log.exception(
                "could not commit the usage of request %s (job %s)", record.key, record.job_id
            )
            raise LedgerUnavailable() from exc
        self.metrics.ledger_write_latency.observe(time.perf_counter() - started)
        self._count(record)

    def committed(self, record: UsageRecord) -> None:
        """A final record a shell made durable itself (``Ledger.write_blocking``): counted in
        the metrics and told to the chain service, as :meth:`commit` does."""
        self._count(record)

    async def persist_progress(self, record: UsageRecord) -> None:
        """An OPEN record of a running stream, durable before the stream relays more: so no
        more than one progress step (64 tokens) is ever relayed unrecorded, even
        when the process dies or the disk fills. The ledger's writer commits many streams'
        steps together; a step costs its stream one commit's wait every 64 tokens. Raises
        :class:`~sidecar.errors.LedgerUnavailable` when the ledger refuses it."""
        try:
            await self.ledger.submit(record)
        except Exception as exc:
            self.metrics.ledger_errors.inc()
            log.error("could not persist the progress of request %s: %s", record.key, exc)
            raise LedgerUnavailable() from exc

    def note_progress(self, record: UsageRecord) -> None:
        """An OPEN record of a slow stream, a second after its last step: written without
        waiting. It keeps the ledger's view (claims of open streams, ``/sidecar/jobs``) fresh;
        the loss bound is the awaited 64-token step, so a stream never stalls on this one (a
        stall that every open stream took once a second, as jitter between its tokens)."""

        def done(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                self.metrics.ledger_errors.inc()
                log.error(
                    "could not note the progress of request %s: %s", record.key, future.exception()
                )

        try:
            self.ledger.submit(record).add_done_callback(done)
        except Exception as exc:  # closed: the next 64-token step refuses the stream
            log.error("could not note the progress of request %s: %s", record.key, exc)

    def submit_unawaited(self, record: UsageRecord, *, count: bool = True) -> None:
        """A final record written by a task that is being cancelled: not awaited, but the
        ledger's writer commits it regardless; one the ledger refuses (a full disk) is tried
        again until it takes it, so no stream's record stays open once it is over."""
        self._submit_until_taken(record, RETRY_FIRST_S)
        if count:
            self._count(record)

    def _submit_until_taken(self, record: UsageRecord, delay: float) -> None:
        def done(future: asyncio.Future[None]) -> None:
            if future.cancelled() or future.exception() is None:
                return
            log.error(
                "could not commit the usage of request %s: %s; trying again in %g s",
                record.key,
                future.exception(),
                delay,
            )
            with contextlib.suppress(RuntimeError):  # the loop is closing: restart recovery
                asyncio.get_running_loop().call_later(
                    delay, self._submit_until_taken, record, min(RETRY_MAX_S, delay * 2)
                )

        try:
            self.ledger.submit(record).add_done_callback(done)
        except Exception as exc:  # closed: the next start closes the open record instead
            log.error("could not submit the usage of request %s: %s", record.key, exc)

    def _count(self, record: UsageRecord) -> None:
        """A finished record: counted in the metrics, and the chain service told."""
        self.metrics.count_response(
            record.endpoint,
            record.status,
            record.job_id,
            record.source.value,
            record.prompt_tokens,
            record.completion_tokens,
            record.billable_tokens,
            record.cached_tokens,
            record.reasoning_tokens,
        )
        if self.chain is not None and record.job_id is not None:
            self.chain.note_usage(record.job_id)

    async def receipt(self, call: Call, usage: Usage) -> dict[str, str]:
        """What a metered answer tells its client about the job, once its record is committed:
        the job, this answer's billable tokens, the job's tokens so far (one row of the ledger's
        per-job totals) and, with a chain, what the deposit still covers, in tokens. Empty
        without a job."""
        if call.job_id is None:
            return {}
        out = {
            RECEIPT_JOB: str(call.job_id),
            RECEIPT_TOKENS: str(billable_tokens(call.endpoint, usage, bill_total=self.bill_total)),
        }
        job_tokens = await self.ledger.job_tokens(call.job_id)
        out[RECEIPT_JOB_TOKENS] = str(job_tokens)
        left = None if self.chain is None else self.chain.tokens_left(call.job_id, job_tokens)
        if left is not None:
            out[RECEIPT_DEPOSIT_LEFT] = str(left)
        return out

    async def recount(self, call: Call, usage: Usage, text: str) -> Usage:
        """The generated ``text`` counted by the engine's tokenizer (TOKENIZED: exact for the
        model it runs), else by tiktoken (ESTIMATED): an answer that reported no usage, from
        an engine whose chunks are not tokens."""
        counted, source = await self._count_text(call, text)
        return Usage(usage.prompt_tokens, counted, source)

    async def count_prompt(self, call: Call, text: str) -> int:
        """A prompt's tokens where the stream did not say: the engine's tokenizer (exact for
        a completion's prompt; a chat's template tokens are the engine's own and not in it),
        else tiktoken's estimate."""
        return (await self._count_text(call, text))[0]

    async def _count_text(self, call: Call, text: str) -> tuple[int, Source]:
        if self.count_text is not None:
            counted = await self.count_text(text, call.model)
            if counted is not None:
                return counted, Source.TOKENIZED
        if not estimate.loaded():
            await asyncio.to_thread(estimate.load)  # off the loop: a fraction of a second once
        return estimate.count_tokens(text), Source.ESTIMATED

    # -- answers and streams ---------------------------------------------------------------

    async def answer(self, call: Call, reply: EngineReply) -> MeteredAnswer:
        """Read a whole (non-stream) answer, extract its usage, commit its record.

        Raises :class:`~sidecar.errors.UpstreamBroke` if the engine broke off, and
        :class:`~sidecar.errors.LedgerUnavailable` if the record could not be committed: the
        caller must then not deliver the answer."""
        try:
            return await self._answer(call, reply)
        finally:
            call.hold.release()  # committed (its tokens are metered now), or never will be

    async def _answer(self, call: Call, reply: EngineReply) -> MeteredAnswer:
        try:
            payload = await reply.read()
        except UpstreamBroke:
            self.metrics.upstream_errors.labels("broken_response").inc()
            log.warning("engine response broke before its end (job %s)", call.job_id)
            raise
        usage: Usage | None = None
        if reply.status < 300:
            if not estimate.loaded() and b'"usage"' not in payload:
                # The last-resort tokenizer takes a fraction of a second to build: off the
                # event loop, and only for engines that ever answer without usage.
                await asyncio.to_thread(estimate.load)
            anomalies: list[str] = []
            usage = usage_from_body(call.endpoint, payload, anomalies)
            if anomalies:
                self.metrics.stream_anomalies.inc(len(anomalies))
                log.warning(
                    "engine answer to %s (job %s, request %s) was malformed: %s",
                    ENDPOINT_PATHS[call.endpoint],
                    call.job_id,
                    call.key,
                    "; ".join(anomalies[:5]),
                )
        if usage is None:
            # An error answer, or a body nothing can be read from: zero tokens, and never
            # marked as reported by the engine.
            usage = Usage(prompt_tokens=None, completion_tokens=0, source=Source.ESTIMATED)
        elif usage.source is Source.ESTIMATED and self.count_text is not None:
            # No usage in the answer: the engine's own tokenizer over its text comes first.
            answer = safejson.loads(payload)
            usage = await self.recount(call, usage, response_text(call.endpoint, answer))
        await self.commit(self.record(call, usage, RecordState.FINAL, reply.status))
        return MeteredAnswer(call, reply.status, payload, usage)

    def stream(
        self,
        call: Call,
        reply: EngineReply,
        *,
        strip_usage_chunk: bool = False,
        with_receipt: bool = False,
        prompt_text: str | None = None,
    ) -> MeteredStream:
        # Where a chunk is not a token, keep the text: without usage, the engine's tokenizer
        # counts it at the end.
        collect = not self.identity.profile.chunk_is_token
        meter = StreamMeter(
            call.endpoint,
            strip_usage_chunk=strip_usage_chunk,
            collect_text=collect,
            max_event_bytes=self.max_event_bytes,
        )
        stream = MeteredStream(self, call, reply, meter, with_receipt=with_receipt)
        if self.bill_total:
            stream.prompt_text = prompt_text  # billed: counted where the stream says nothing
        return stream

    # -- calls for shells that speak another API (the node's HTTP and WebSocket) -------------

    async def call_json(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
        requester: Requester | None = None,
    ) -> MeteredAnswer:
        """One non-stream OpenAI request to the engine, metered like the OpenAI routes; its
        record is committed when this returns."""
        call, reply = await self._send(endpoint, body, job_id, requester, stream=False)
        async with _released(reply):
            return await self.answer(call, reply)

    async def call_stream(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
        requester: Requester | None = None,
    ) -> MeteredStream:
        """Start one streamed OpenAI request; iterate :meth:`MeteredStream.events`. An engine
        that answers with an error instead of a stream is an :class:`UpstreamError` (recorded
        with zero tokens)."""
        call, reply = await self._send(endpoint, body, job_id, requester, stream=True)
        if not reply.is_event_stream:
            async with _released(reply):
                try:
                    payload = (await self.answer(call, reply)).body
                except (UpstreamBroke, LedgerUnavailable):
                    payload = b""
            raise UpstreamError(
                engine_error_message(reply.status, payload),
                status=502 if reply.status < 400 else reply.status,
            )
        return self.stream(call, reply)

    async def _send(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        job_id: int | None,
        requester: Requester | None,
        *,
        stream: bool,
    ) -> tuple[Call, EngineReply]:
        payload = dict(body, stream=stream)
        if (
            stream
            and self.inject_include_usage
            and endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS)
        ):
            payload["stream_options"] = {"include_usage": True}
        admission = await self.admit(
            endpoint, job_id, json.dumps(payload).encode(), requester, stream=stream
        )
        model = body.get("model")
        call = self.start(endpoint, job_id, model if type(model) is str else None, admission)
        sent_at = time.perf_counter()
        try:
            reply = await self.engine.post_json(ENDPOINT_PATHS[endpoint], admission.body)
        except BaseException:
            call.hold.release()  # nothing was served
            raise
        self.metrics.observe_upstream(endpoint.value, time.perf_counter() - sent_at)
        return call, reply


@contextlib.asynccontextmanager
async def _released(reply: EngineReply) -> AsyncIterator[EngineReply]:
    try:
        yield reply
    finally:
        reply.release()
