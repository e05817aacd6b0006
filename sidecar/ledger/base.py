"""The ledger interface: one durable record per metered response, and per-job totals.

Backends (SQLite, the embedded default; PostgreSQL, for several replicas) implement :class:`Ledger`
unchanged. The proxy never
blocks the event loop on the ledger: ``submit`` only enqueues and returns a future that resolves
once the record is committed (durable). Awaiting that future before the response's last byte is
what makes "a served token is never lost" true.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from sidecar.metering.types import Source

if TYPE_CHECKING:
    from sidecar.ledger.lease import SubmitterLease


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
    cached_tokens: int | None = None  # of the prompt, served from the engine's cache
    reasoning_tokens: int | None = None  # of the completion, spent reasoning

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + self.completion_tokens


class ClaimKind(StrEnum):
    PROOF = "proof"  # submitProofOfWork: a delta of billable tokens
    SETTLE = "settle"  # completeSessionJob: the session's settlement


class ClaimState(StrEnum):
    """An outbox row's life: pending -> sent (tx hash) -> confirmed | failed.

    ``unclaimable`` marks a remainder the contract will never accept (under its minimum claim at
    settlement): recorded so the books balance, never sent.
    """

    PENDING = "pending"
    SENT = "sent"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    UNCLAIMABLE = "unclaimable"


TERMINAL_CLAIM_STATES = frozenset({ClaimState.CONFIRMED, ClaimState.UNCLAIMABLE})


@dataclass(frozen=True, slots=True)
class Claim:
    """One on-chain transaction of a job, written before it is sent (a durable outbox row).

    ``seq`` numbers a job's claims from 1. A proof claims the billable tokens
    ``[first_token, end_token)`` of the job (``tokens == end_token - first_token``); ``payload``
    holds the transaction's deterministic arguments (the proof bytes, or the settlement's
    conversation CID), so a resend after an unknown outcome sends exactly the same claim.
    """

    job_id: int
    seq: int
    kind: ClaimKind
    tokens: int
    first_token: int
    end_token: int
    payload: bytes
    state: ClaimState
    tx_hash: str | None = None
    nonce: int | None = None
    error: str | None = None
    created_ms: int = 0
    updated_ms: int = 0
    # A proof's (record key, tokens) pieces, chained from the job's previous confirmed proof:
    # what its records root commits to (None: a settlement, or a claim of an older ledger).
    pieces: tuple[tuple[str, int], ...] | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "kind": self.kind.value,
            "tokens": self.tokens,
            "token_range": [self.first_token, self.end_token],
            "state": self.state.value,
            "tx_hash": self.tx_hash,
            "nonce": self.nonce,
            "error": self.error,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "pieces": None if self.pieces is None else [list(p) for p in self.pieces],
        }


def claim_totals(claims: Iterable[Claim]) -> dict[str, int]:
    """A job's tokens claimed (sent or confirmed), confirmed, and never claimable."""
    proofs = [c for c in claims if c.kind is ClaimKind.PROOF]
    return {
        "tokens_claimed": sum(
            c.tokens for c in proofs if c.state in (ClaimState.SENT, ClaimState.CONFIRMED)
        ),
        "tokens_confirmed": sum(c.tokens for c in proofs if c.state is ClaimState.CONFIRMED),
        "tokens_unclaimable": sum(c.tokens for c in proofs if c.state is ClaimState.UNCLAIMABLE),
    }


class ClaimConflictError(ValueError):
    """A claim with this (job, seq) exists already with different content."""


@dataclass(frozen=True, slots=True)
class MarketplaceIdentity:
    """Which marketplace a ledger's job ids belong to: job 164 of one contract is not job 164
    of another. ``marketplace`` is compared without case (an address)."""

    chain_id: int
    marketplace: str
    contract_version: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "marketplace", self.marketplace.lower())

    def __str__(self) -> str:
        return f"{self.contract_version} marketplace {self.marketplace} on chain {self.chain_id}"

    def as_json(self) -> dict[str, object]:
        return {
            "chain_id": self.chain_id,
            "marketplace": self.marketplace,
            "contract_version": self.contract_version,
        }


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
    cached_tokens: int = 0  # summed where the engine reported them
    reasoning_tokens: int = 0

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
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
        }


class Ledger(ABC):
    """A durable store of usage records.

    ``shared`` is True for a backend that several replicas use at once (PostgreSQL): the
    deposit's holds of requests in flight then live in the ledger too (:meth:`hold`), so every
    replica sees them.
    """

    shared: bool = False

    @abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema. Call once before anything else."""

    @abstractmethod
    async def close(self) -> None:
        """Flush everything submitted, then release the connection(s)."""

    @abstractmethod
    async def close_interrupted(self, now_ms: int) -> int:
        """Mark the OPEN records of processes that are gone ABORTED (their persisted counts
        stand); return how many.

        Called at start, before serving, and by the submitter now and then: an OPEN record of a
        process that died mid-stream (kill -9, power loss) holds its last persisted progress,
        which is what was relayed, within the progress bound. The SQLite ledger has one process,
        so every OPEN record at start is such a record; the PostgreSQL ledger closes only those
        of replicas whose presence lock is free.
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
    def write_blocking(self, record: UsageRecord) -> None:
        """Commit ``record`` durably before returning, from a synchronous caller (a shell whose
        host calls it back synchronously: the mitmproxy addon's stream hook). Blocks the
        calling thread for the commit, so it is for the final record of a stream only."""

    @abstractmethod
    async def flush(self) -> None:
        """Return once every record submitted before this call is applied (committed or failed):
        a reader that must see them (the claim worker before settling) waits here first."""

    @abstractmethod
    async def job(self, job_id: int | None) -> JobTotals | None:
        """Totals of one job (None: unattributed), or None when the ledger has no record of it."""

    @abstractmethod
    async def job_tokens(self, job_id: int) -> int:
        """The job's billable tokens so far (0 for a job with no record): one row's read, for
        every answer's receipt and admission."""

    @abstractmethod
    async def billable_by_job(self) -> dict[int, int]:
        """Every job's billable tokens so far (one row per job, no sums over records): how the
        submitter learns of usage that other replicas recorded."""

    @abstractmethod
    async def jobs(self) -> list[JobTotals]:
        """Totals of every job, unattributed last."""

    @abstractmethod
    async def records(self, job_id: int | None) -> list[UsageRecord]:
        """The records of one job, oldest first."""

    # -- the on-chain outbox ---------------------------------------------------------------

    @abstractmethod
    async def add_claim(self, claim: Claim) -> None:
        """Durably insert an outbox row. Adding an identical row again is a no-op (a retry);
        a different row with the same (job, seq) raises :class:`ClaimConflictError`."""

    @abstractmethod
    async def update_claim(
        self,
        job_id: int,
        seq: int,
        state: ClaimState,
        *,
        now_ms: int,
        tx_hash: str | None = None,
        nonce: int | None = None,
        error: str | None = None,
    ) -> None:
        """Move a row forward durably. A terminal row (confirmed, unclaimable) never changes;
        tx_hash/nonce/error given as None keep their stored values."""

    @abstractmethod
    async def claims(self, job_id: int | None = None) -> list[Claim]:
        """Outbox rows of one job (or of every job), in (job, seq) order."""

    @abstractmethod
    async def unfinished_claims(self) -> list[Claim]:
        """Rows the sender still owes an outcome (pending or sent), in (job, seq) order."""

    # -- who may use a job (--session-auth bound) ------------------------------------------

    @abstractmethod
    async def bind_job(self, job_id: int, address: str, proof: str, now_ms: int) -> str:
        """Bind ``job_id`` to ``address`` unless it is bound already; return the address it is
        bound to (the first binding wins, durably, across restarts and replicas)."""

    @abstractmethod
    async def binding(self, job_id: int) -> str | None:
        """The address ``job_id`` is bound to, or None."""

    # -- the marketplace the ledger's jobs belong to ----------------------------------------

    @abstractmethod
    async def bind_marketplace(
        self, identity: MarketplaceIdentity, now_ms: int
    ) -> MarketplaceIdentity:
        """Bind the ledger, and so every job in it, to ``identity`` unless it is bound already;
        return the identity it is bound to (the first binding stands, durably)."""

    @abstractmethod
    async def marketplace(self) -> MarketplaceIdentity | None:
        """The marketplace the ledger is bound to, or None (never started with a chain)."""

    # -- settlement requests: any replica takes them, the submitter settles ----------------

    @abstractmethod
    async def request_settlement(self, job_id: int, now_ms: int) -> None:
        """Durably note that the job's session is to be settled (again: a no-op)."""

    @abstractmethod
    async def settlement_requests(self) -> list[int]:
        """Every job whose settlement was requested and is not confirmed yet, in job order."""

    # -- one transaction sender per host key ---------------------------------------------

    @abstractmethod
    def submitter_lease(self, name: str, takeover_s: float) -> SubmitterLease:
        """The lease that lets one process at a time send ``name``'s transactions (the host
        address), for every process of this ledger; a dead holder's successor gets it within
        about ``takeover_s``."""

    # -- deposit holds across replicas (``shared`` backends only) --------------------------

    async def hold(
        self, job_id: int, deposit_tokens: int, floor: int, want: int, now_ms: int
    ) -> tuple[int | None, int]:
        """Hold up to ``want`` of what the deposit still covers, for every replica to see."""
        raise NotImplementedError(f"{type(self).__name__} keeps holds in memory (not shared)")

    def release_hold(self, hold_id: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} keeps holds in memory (not shared)")
