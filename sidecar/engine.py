"""The one client of the engine: connection pool, transport errors, model list, health, dialect.

Every shell reaches the engine through :class:`EngineClient`, so a transport failure is mapped
once (an :class:`~sidecar.errors.UpstreamError`, counted and logged), the model list is fetched
in one way, and ``/sidecar/health`` and the node's ``/health`` mean the same thing by healthy.

The engine is never modified and never read beyond its OpenAI-compatible API; what the sidecar
must know about each engine (its usage dialect) is :mod:`sidecar.metering.dialects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp
from multidict import CIMultiDictProxy

from sidecar.errors import UpstreamBroke, UpstreamError
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.engine")

MODELS_MAX_AGE = 30.0  # seconds the engine's model list is trusted for validation
HEALTH_TIMEOUT = 3.0  # seconds a health probe waits for the engine's /v1/models


# What a response that already began can die of: the engine closed, reset or stalled.
_BREAKS = (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)


class EngineResponse:
    """One answer of the engine, its body read as it arrives. A break after the headers is an
    :class:`~sidecar.errors.UpstreamBroke`; :meth:`close` drops the connection, which makes the
    engine stop generating."""

    __slots__ = ("_origin", "_response", "_watchdog")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        origin: str,
        watchdog: IdleWatchdog | None = None,
    ) -> None:
        self._response = response
        self._origin = origin  # the engine's base URL, for messages
        self._watchdog = watchdog  # cuts the stream when it goes quiet (event streams only)

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def reason(self) -> str | None:
        return self._response.reason

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._response.headers

    @property
    def content_type(self) -> str:
        return self._response.content_type

    @property
    def is_event_stream(self) -> bool:
        """A successful ``text/event-stream`` answer: the body is a stream to meter chunk by
        chunk (an error answer is read whole, whatever its type)."""
        return self.status < 300 and _is_event_stream(self._response)

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (never re-chunked)."""
        chunks = _Chunks(self._response.content.iter_any(), self)
        if self._watchdog is not None:
            self._watchdog.watch(chunks)
        return chunks

    async def read(self) -> bytes:
        """The whole body."""
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self.broke(exc) from exc

    def broke(self, exc: BaseException) -> UpstreamBroke:
        """The error for this answer breaking off with ``exc``."""
        return UpstreamBroke(
            f"the engine at {self._origin} broke off its response ({_describe(exc)})"
        )

    def close(self) -> None:
        self._response.close()

    def release(self) -> None:
        self._response.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class _Chunks:
    """An answer's chunks with breaks mapped to UpstreamBroke. An iterator object rather than an
    async generator: every open stream holds one, and this one is a few dozen bytes.

    ``reads`` counts the chunks: the :class:`IdleWatchdog` compares it between its rounds, which
    costs a stream one increment per read instead of a timer rescheduled on every read."""

    __slots__ = ("__weakref__", "_inner", "_response", "idle_cut", "quiet_since", "reads", "seen")

    def __init__(self, inner: AsyncIterator[bytes], response: EngineResponse) -> None:
        self._inner = inner
        self._response = response
        self.reads = 0
        self.seen = -1  # reads at the watchdog's last round
        self.quiet_since = 0.0
        self.idle_cut: float | None = None  # seconds of silence it was cut after

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            raise
        except (*_BREAKS, aiohttp.ClientError) as exc:
            if self.idle_cut is not None:
                raise UpstreamBroke(
                    f"the engine at {self._response.origin} sent nothing for "
                    f"{self.idle_cut:g} s (--upstream-idle-timeout); the stream was cut"
                ) from exc
            if isinstance(exc, _BREAKS):
                raise self._response.broke(exc) from exc
            raise
        self.reads += 1
        return chunk

    def cut(self, idle_s: float) -> None:
        self.idle_cut = idle_s
        self._response.close()


class IdleWatchdog:
    """Cuts event streams that go ``idle_s`` seconds without a byte from the engine.

    One task for all streams wakes every ``min(1, idle_s / 4)`` seconds and compares each
    stream's read count with the last round's; a stream whose count did not move for ``idle_s``
    is closed, and its reader gets an :class:`~sidecar.errors.UpstreamBroke` saying why. A cut
    comes between ``idle_s`` and ``idle_s`` plus one round after the last byte.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.round_s = min(1.0, idle_s / 4)
        self._streams: weakref.WeakSet[_Chunks] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self.cuts = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sidecar-idle")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def watch(self, chunks: _Chunks) -> None:
        chunks.quiet_since = asyncio.get_running_loop().time()
        self._streams.add(chunks)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.round_s)
            now = loop.time()
            for chunks in list(self._streams):
                if chunks.reads != chunks.seen:
                    chunks.seen = chunks.reads
                    chunks.quiet_since = now
                elif now - chunks.quiet_since >= self.idle_s and chunks.idle_cut is None:
                    self.cuts += 1
                    log.warning("engine stream sent nothing for %g s: cut", self.idle_s)
                    chunks.cut(self.idle_s)
                    self._streams.discard(chunks)


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """One probe of the engine's ``/v1/models``: healthy when it answers 200 with a list."""

    reachable: bool  # it answered at all, with a status under 500
    status: int | None
    models: tuple[str, ...]
    latency_ms: float
    error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.status == 200 and bool(self.models)


class EngineClient:
    """The connection pool to the engine at ``base_url`` (``start`` before use, then ``close``)."""

    def __init__(
        self,
        base_url: str,
        metrics: Metrics,
        *,
        connect_timeout: float = 10,
        first_byte_timeout: float = 600,
        idle_timeout: float = 120,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout  # to the headers (a JSON answer: all of it)
        self.idle_timeout = idle_timeout  # between two reads of a streamed answer
        self._watchdog = IdleWatchdog(idle_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._models: tuple[float, tuple[str, ...]] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False,  # relay the engine's bytes exactly as sent
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, connect=self.connect_timeout),
            # Send only the client's own headers: no User-Agent, Accept or compression of ours.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self._watchdog.start()

    async def close(self) -> None:
        await self._watchdog.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("EngineClient.start() was not called")
        return self._session

    async def request(
        self,
        method: str,
        path_qs: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> EngineResponse:
        """Send one request; its answer's headers have arrived when this returns. An engine that
        cannot be reached is an :class:`UpstreamError` (502, or 504 on a connect timeout)."""
        try:
            response = await self._pool().request(
                method,
                self.base_url + path_qs,
                data=body or None,
                headers=headers,
                allow_redirects=False,
                # aiohttp's read timeout runs from the request to the first byte and between
                # reads after: the first-byte bound until the headers (and for the whole of a
                # JSON answer, read in a few reads). A stream drops it below.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.connect_timeout, sock_read=self.first_byte_timeout
                ),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self.unreachable(exc) from exc
        if not (response.status < 300 and _is_event_stream(response)):
            return EngineResponse(response, self.base_url)
        # A stream: no read timer from here on (aiohttp would reschedule one on every read,
        # that is every token); the watchdog looks after its silence instead.
        connection = response.connection
        protocol = None if connection is None else connection.protocol
        if protocol is not None:
            protocol.read_timeout = None
            protocol.start_timeout()  # drops the first-byte timer
        return EngineResponse(response, self.base_url, self._watchdog)

    async def post_json(self, path: str, body: bytes) -> EngineResponse:
        return await self.request("POST", path, body, {"Content-Type": "application/json"})

    def unreachable(self, exc: BaseException) -> UpstreamError:
        """The error for an engine that could not be reached (counted, logged)."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            kind, status, detail = "timeout", 504, "did not accept a connection in time"
        elif isinstance(exc, asyncio.TimeoutError):
            kind, status = "timeout", 504
            detail = f"did not start its answer within {self.first_byte_timeout:g} s"
        else:
            kind, status, detail = "unreachable", 502, f"is unreachable ({_describe(exc)})"
        self.metrics.upstream_errors.labels(kind).inc()
        log.warning("upstream %s %s", self.base_url, detail)
        return UpstreamError(
            f"the engine at {self.base_url} {detail}", code=f"upstream_{kind}", status=status
        )

    async def models(self) -> tuple[str, ...]:
        """The engine's model ids (cached for MODELS_MAX_AGE); empty when the engine cannot say."""
        cached = self._models
        if cached is not None and time.monotonic() - cached[0] < MODELS_MAX_AGE:
            return cached[1]
        return (await self.health()).models

    async def health(self) -> EngineHealth:
        """Probe ``/v1/models`` now (and refresh the cached model list)."""
        started = time.perf_counter()
        status: int | None = None
        try:
            async with self._pool().get(
                self.base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return EngineHealth(False, None, (), _elapsed_ms(started), _describe(exc))
        models = _model_ids(raw) if status == 200 else ()
        if models:
            self._models = (time.monotonic(), models)
        return EngineHealth(status < 500, status, models, _elapsed_ms(started))


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("Content-Type", "").startswith("text/event-stream")


def _model_ids(raw: bytes) -> tuple[str, ...]:
    try:
        data = json.loads(raw)["data"]
        return tuple(m["id"] for m in data if type(m) is dict and type(m.get("id")) is str)
    except (ValueError, KeyError, TypeError):
        return ()


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
