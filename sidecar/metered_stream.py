"""The one streaming loop of every shell: an engine's SSE stream through a :class:`StreamMeter`.

Split from :mod:`sidecar.exchange`, which starts each stream (``Exchange.stream``) and whose
records, commit and recount it uses; the rules it keeps are in :class:`MeteredStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.calls import Call, EngineReply
from sidecar.errors import LedgerUnavailable, UpstreamBroke
from sidecar.ledger import RecordState, UsageRecord
from sidecar.metering import DONE, SSEDecoder, StreamMeter, Usage

if TYPE_CHECKING:
    from sidecar.metrics import Metrics


class StreamOwner(Protocol):
    """What the loop needs of the exchange that started it (:class:`sidecar.exchange.Exchange`)."""

    @property
    def metrics(self) -> Metrics: ...

    def record(self, call: Call, usage: Usage, state: RecordState, status: int) -> UsageRecord: ...

    async def commit(self, record: UsageRecord) -> None: ...

    async def persist_progress(self, record: UsageRecord) -> None: ...

    def note_progress(self, record: UsageRecord) -> None: ...

    def submit_unawaited(self, record: UsageRecord, *, count: bool = True) -> None: ...

    async def receipt(self, call: Call, usage: Usage) -> dict[str, str]: ...

    async def recount(self, call: Call, usage: Usage, text: str) -> Usage: ...

    async def count_prompt(self, call: Call, text: str) -> int: ...


log = logging.getLogger("sidecar.exchange")

PROGRESS_EVERY_TOKENS = 64
PROGRESS_EVERY_SECONDS = 1.0


class MeteredStream:
    """One engine stream through a :class:`StreamMeter`: the one streaming loop of every shell.

    :meth:`chunks` yields the bytes to relay (a shell writes them unchanged); :meth:`events`
    yields the engine's parsed JSON chunks instead. Either way:

    * progress is persisted while the stream runs;
    * the FINAL record is committed before the chunk holding ``data: [DONE]`` is yielded (or,
      at an end without it, before the iteration ends);
    * if the engine breaks off, an ABORTED record is committed and
      :class:`~sidecar.errors.UpstreamBroke` raised;
    * if the consumer stops early (``aclose``, a cancelled task, a client gone), the engine
      request is closed and an ABORTED record written without waiting.
    """

    __slots__ = (
        "_final_usage",
        "_released",
        "call",
        "committed",
        "exchange",
        "meter",
        "prompt_text",
        "reply",
        "with_receipt",
    )

    def __init__(
        self,
        exchange: StreamOwner,
        call: Call,
        reply: EngineReply,
        meter: StreamMeter,
        *,
        with_receipt: bool = False,
    ) -> None:
        self.exchange = exchange
        self.call = call
        self.reply = reply
        self.meter = meter
        self.committed = False
        self.with_receipt = with_receipt  # an SSE comment with the receipt before [DONE]
        self._released = False
        self._final_usage: Usage | None = None  # recounted at the end (no usage, no token chunks)
        self.prompt_text: str | None = None  # --bill total: counted if the stream has no usage

    @property
    def key(self) -> str:
        return self.call.key

    @property
    def status(self) -> int:
        return self.reply.status

    @property
    def max_tokens(self) -> int | None:
        return self.call.max_tokens

    @property
    def usage(self) -> Usage:
        """The metered usage so far (final once the iteration ended)."""
        return self._final_usage or self.meter.usage()

    @property
    def completion_tokens(self) -> int:
        return self.meter.completion_tokens

    def _record(self, state: RecordState) -> UsageRecord:
        return self.exchange.record(self.call, self.usage, state, self.reply.status)

    async def _finish_usage(self) -> None:
        """At the end: a stream that reported no usage, whose chunks are not tokens, is
        counted by the engine's tokenizer over its text (else estimated)."""
        meter = self.meter
        if meter.collect_text and meter.reported is None:
            self._final_usage = await self.exchange.recount(self.call, meter.usage(), meter.text())
        usage = self.usage
        if self.prompt_text and usage.prompt_tokens is None:
            # --bill total bills the prompt: the engine's tokenizer, else the estimate.
            prompt = await self.exchange.count_prompt(self.call, self.prompt_text)
            self._final_usage = dataclasses.replace(usage, prompt_tokens=prompt)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Use as ``async with contextlib.aclosing(stream.chunks()) as chunks``."""
        exchange, meter = self.exchange, self.meter
        exchange.metrics.streams_in_flight.inc()
        loop = asyncio.get_running_loop()
        persisted_tokens = noted_tokens = 0  # awaited (the loss bound), and any progress write
        persisted_at = loop.time()
        try:
            async for chunk in self.reply.chunks():
                before = meter.completion_tokens
                out = meter.feed(chunk)
                if meter.done:
                    if not self.committed:
                        # [DONE] is in this chunk: the record goes first, then the bytes.
                        await self._finish_usage()
                        try:
                            await exchange.commit(self._record(RecordState.FINAL))
                        except LedgerUnavailable:
                            # The end is not relayed, nor the rest of this chunk: the record
                            # the stream is cut with ends before it.
                            self._final_usage = dataclasses.replace(
                                meter.usage(), completion_tokens=before
                            )
                            raise
                        self.committed = True
                        self.call.hold.release()
                        if self.with_receipt and self.call.job_id is not None:
                            receipt = await exchange.receipt(self.call, self.usage)
                            out = with_comment_before_done(out, receipt_comment(receipt))
                elif meter.completion_tokens - persisted_tokens >= PROGRESS_EVERY_TOKENS:
                    persisted_tokens = noted_tokens = meter.completion_tokens
                    persisted_at = loop.time()
                    try:
                        await exchange.persist_progress(self._record(RecordState.OPEN))
                    except LedgerUnavailable:
                        # This chunk is not relayed: the stream's record ends before it.
                        self._final_usage = dataclasses.replace(
                            meter.usage(), completion_tokens=before
                        )
                        raise
                elif (
                    meter.completion_tokens != noted_tokens
                    and loop.time() - persisted_at >= PROGRESS_EVERY_SECONDS
                ):
                    # A slow stream's view is refreshed once a second, without waiting.
                    noted_tokens = meter.completion_tokens
                    persisted_at = loop.time()
                    exchange.note_progress(self._record(RecordState.OPEN))
                if out:
                    yield out
            tail = meter.finish()
            self._log_anomalies()
            if not self.committed:
                await self._finish_usage()
                await exchange.commit(self._record(RecordState.FINAL))
                self.committed = True
            if tail:
                yield tail
        except UpstreamBroke as exc:
            await self._broke(exc)
            raise
        except LedgerUnavailable:
            # The final record was refused: the end is not delivered. What was relayed before
            # is still written as ABORTED if the ledger takes it, but not counted as served.
            self._abandon(count=False)
            raise
        finally:
            exchange.metrics.streams_in_flight.dec()
            if not self.committed:
                self._abandon()
            self.call.hold.release()

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """The engine's JSON chunks (``[DONE]`` excluded); use as
        ``async with contextlib.aclosing(stream.events())``."""
        decoder = SSEDecoder(self.meter.max_event_bytes)
        try:
            async with contextlib.aclosing(self.chunks()) as chunks:
                async for out in chunks:
                    for event in decoder.feed(out):
                        chunk = _json_chunk(event.data)
                        if chunk is not None:
                            yield chunk
        finally:
            self.release()

    async def aclose(self) -> None:
        """Stop early: the engine request is closed, the tokens so far recorded as ABORTED."""
        if not self.committed:
            self._abandon()
        self.call.hold.release()
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.reply.release()

    async def _broke(self, exc: UpstreamBroke) -> None:
        """The engine's stream broke: commit what was relayed as ABORTED."""
        with contextlib.suppress(RuntimeError):  # finish() already ran
            self.meter.finish()
        self.exchange.metrics.upstream_errors.labels("broken_stream").inc()
        log.warning(
            "engine stream broke (job %s, request %s) after %d tokens: %s",
            self.call.job_id,
            self.call.key,
            self.meter.completion_tokens,
            exc,
        )
        if not self.committed:
            self.committed = True
            await self.exchange.commit(self._record(RecordState.ABORTED))

    def _abandon(self, *, count: bool = True) -> None:
        """The consumer left (client gone, generation cancelled): stop the engine, keep what
        was relayed. Does not await: safe in a task that is being cancelled."""
        self.committed = True
        self.reply.close()
        self.exchange.submit_unawaited(self._record(RecordState.ABORTED), count=count)
        log.info(
            "client left stream of job %s after %d tokens; engine request closed",
            self.call.job_id,
            self.meter.completion_tokens,
        )

    def _log_anomalies(self) -> None:
        anomalies = self.meter.anomalies
        if anomalies:
            self.exchange.metrics.stream_anomalies.inc(len(anomalies))
            log.warning(
                "engine stream of job %s (request %s) was malformed: %s",
                self.call.job_id,
                self.call.key,
                "; ".join(anomalies[:5]),
            )


def receipt_comment(receipt: dict[str, str]) -> bytes:
    """The receipt as one SSE comment line (SSE clients skip comments)."""
    return b": sidecar-receipt " + json.dumps(receipt, separators=(",", ":")).encode() + b"\n\n"


def with_comment_before_done(out: bytes, comment: bytes) -> bytes:
    """``out`` with ``comment`` before its ``data: [DONE]`` event; after ``out`` when the event
    began in an earlier chunk (already relayed: a comment after it is still valid SSE)."""
    at = max(out.rfind(b"data: [DONE]"), out.rfind(b"data:[DONE]"))
    if at < 0 or (at > 0 and out[at - 1 : at] not in (b"\n", b"\r")):
        return out + comment
    return out[:at] + comment + out[at:]


def _json_chunk(data: str) -> dict[str, Any] | None:
    if data == DONE:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if type(value) is dict else None
