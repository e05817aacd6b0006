"""The values a metered call is made of, shared by the exchange and its stream loop: what
admission decided (:class:`Admission`), the call being served (:class:`Call`), and what the core
needs of one engine answer (:class:`EngineReply`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from sidecar.metering import Endpoint
from sidecar.reservations import NO_HOLD, Hold


class EngineReply(Protocol):
    """What the core needs of one engine answer (see :class:`sidecar.engine.EngineResponse`)."""

    @property
    def status(self) -> int: ...

    @property
    def is_event_stream(self) -> bool: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...

    def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission decided: the body to send, the lowered ``max_tokens`` if it was, and what
    the call holds of its job's deposit until its record is committed."""

    body: bytes
    max_tokens: int | None = None  # set when lowered to what the job's deposit still covers
    hold: Hold = NO_HOLD


@dataclass(frozen=True, slots=True)
class Call:
    """One metered engine call while it is served: what its records are keyed and labelled by."""

    key: str  # the record's idempotency key (also X-Sidecar-Request-Id)
    endpoint: Endpoint
    job_id: int | None
    model: str | None
    started_ms: int
    max_tokens: int | None  # lowered by admission, else None
    hold: Hold = NO_HOLD  # released when the call's record is committed (or it never ran)
