"""The ledger interface: one durable record per metered response, and per-job totals.

Backends (SQLite here, PostgreSQL later) implement :class:`Ledger` unchanged. The proxy never
blocks the event loop on the ledger: ``submit`` only enqueues and returns a future that resolves
once the record is committed (durable). Awaiting that future before the response's last byte is
what makes "a served token is never lost" true.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum

from sidecar.metering.types import Source


class LedgerClosedError(RuntimeError):
    """The ledger is not open (never opened, or closed): nothing can be submitted or read."""


class RecordState(StrEnum):
    OPEN = "open"  # a response still being relayed; counts are a lower bound
    FINAL = "final"  # the response ended normally
    ABORTED = "aborted"  # the client left or the upstream broke; counts are what was relayed


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The usage of one response. ``key`` is its idempotency key (unique per response)."""

    key: str
    job_id: int | None  # None: unattributed
    endpoint: str  # an Endpoint value
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int
    billable_tokens: int
    source: Source
    state: RecordState
    status: int  # the HTTP status relayed to the client
    started_ms: int  # unix time in milliseconds
    updated_ms: int

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + self.completion_tokens


@dataclass(frozen=True, slots=True)
class JobTotals:
    """Everything metered for one job (``job_id`` None: the unattributed requests)."""

    job_id: int | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    billable_tokens: int
    billable_by_source: dict[str, int] = field(default_factory=dict)
    open_requests: int = 0
    first_ms: int | None = None
    last_ms: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_json(self) -> dict[str, object]:
        return {
            "job_id": None if self.job_id is None else str(self.job_id),
            "requests": self.requests,
            "open_requests": self.open_requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "billable_tokens": self.billable_tokens,
            "billable_tokens_by_source": dict(self.billable_by_source),
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
        }


class Ledger(ABC):
    """A durable store of usage records."""

    @abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema. Call once before anything else."""

    @abstractmethod
    async def close(self) -> None:
        """Flush everything submitted, then release the connection(s)."""

    @abstractmethod
    async def close_interrupted(self, now_ms: int) -> int:
        """Mark every OPEN record ABORTED (its persisted count stands); return how many.

        Called once at start, before serving: an OPEN record then belongs to a process that
        died mid-stream (kill -9, power loss), and its last persisted progress is what was
        relayed, within the progress bound.
        """

    @abstractmethod
    def submit(self, record: UsageRecord) -> asyncio.Future[None]:
        """Enqueue an upsert by ``record.key`` without blocking; the future resolves when committed.

        Must be called from the event loop thread. Records of one key are applied in submit
        order; a record whose stored state is already FINAL or ABORTED is never changed again
        (a replayed final record is a no-op). Safe to call without awaiting: the write still
        happens (used on cancellation paths).
        """

    async def write(self, record: UsageRecord) -> None:
        await self.submit(record)

    @abstractmethod
    async def job(self, job_id: int | None) -> JobTotals | None:
        """Totals of one job (None: unattributed), or None when the ledger has no record of it."""

    @abstractmethod
    async def jobs(self) -> list[JobTotals]:
        """Totals of every job, unattributed last."""

    @abstractmethod
    async def records(self, job_id: int | None) -> list[UsageRecord]:
        """The records of one job, oldest first."""
