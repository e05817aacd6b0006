"""Which jobs this host may serve: the cached on-chain views, and the admission rules on them.

Before relaying a request the proxy asks :meth:`JobAdmission.admit`: unknown, inactive and foreign
jobs are refused (instead of being served for free), and so are jobs that are settling or whose
deposit is spent; an admitted job gets the tokens it may still be served.

The view of a known job is answered from the cache at once; one older than VIEW_MAX_AGE is
re-read in the background, so a slow or dead RPC never holds up a request for a job already
known, and while the chain is down known jobs keep being served. An unknown job waits for its
first read. Unknown jobs are never cached: a stream of made-up ids must not grow memory or the
claim worker's rounds, which go over the cached jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sidecar.chain.marketplace import OnChainJob
from sidecar.chain.rpc import ConnectedChain, read_job
from sidecar.errors import JobRefused
from sidecar.ledger import Ledger

log = logging.getLogger("sidecar.chain")

VIEW_MAX_AGE = 30.0  # seconds an on-chain view serves admission without a re-read


@dataclass
class KnownJob:
    """A job's latest on-chain view, and how far this host is with its session (cached only when
    the job exists). The claim worker reads and moves ``settle_requested`` and ``settled``."""

    view: OnChainJob
    read_at: float  # monotonic
    last_activity: float = 0.0  # monotonic: the last admitted request or recorded usage
    settle_requested: bool = False
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a job's deposit pays for: ``deposit_tokens`` in all, of which the chain already
    counts ``floor`` as used. What is left once ``metered`` tokens are counted is
    ``deposit_tokens - max(metered, floor)``."""

    deposit_tokens: int
    floor: int


class JobAdmission:
    def __init__(self, chain: ConnectedChain, ledger: Ledger) -> None:
        self._chain = chain
        self._ledger = ledger
        self._jobs: dict[int, KnownJob] = {}
        self._reading: dict[int, asyncio.Task[KnownJob | None]] = {}

    def stop(self) -> None:
        """Cancel the background re-reads."""
        for reading in list(self._reading.values()):
            reading.cancel()

    # -- the proxy's side ------------------------------------------------------------------

    async def admit(self, job_id: int) -> int:
        """The tokens this job may still be served, or :class:`JobRefused`."""
        job = await self.known(job_id, refresh=False)
        if job is None:
            raise JobRefused(
                f"job {job_id} cannot be checked on-chain right now (the chain does not answer); "
                "retry later",
                code="chain_unavailable",
                status=503,
                param="job_id",
            )
        view = job.view
        if not view.exists:
            raise JobRefused(
                f"job {job_id} does not exist on the marketplace",
                code="unknown_job",
                status=402,
                param="job_id",
            )
        if view.host.lower() != self._chain.account.address.lower():
            raise JobRefused(
                f"job {job_id} belongs to host {view.host}, not this host",
                code="foreign_job",
                status=403,
                param="job_id",
            )
        if not view.is_active or job.settled or job.settle_requested:
            raise JobRefused(
                f"job {job_id} is no longer active",
                code="job_not_active",
                status=402,
                param="job_id",
            )
        left = self._left(view, await self._metered(job_id))
        if left <= 0:
            raise JobRefused(
                f"job {job_id}'s deposit is used up",
                code="budget_spent",
                status=402,
                param="job_id",
            )
        job.last_activity = time.monotonic()
        return left

    def _left(self, view: OnChainJob, metered: int) -> int:
        """The tokens the deposit still pays for: its budget, less the larger of what this
        ledger metered and what the chain counts as used."""
        budget = self._chain.market.budget_tokens(view)
        return view.tokens_used + budget - max(metered, view.tokens_used)

    def allowance(self, job_id: int) -> Allowance | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        view = job.view
        deposit_tokens = view.tokens_used + self._chain.market.budget_tokens(view)
        return Allowance(deposit_tokens, view.tokens_used)

    def tokens_left(self, job_id: int, metered: int) -> int | None:
        """What the deposit still covers once ``metered`` tokens are counted, from the cached
        view (None for a job not seen yet); never below 0, never a refusal."""
        job = self._jobs.get(job_id)
        return None if job is None else max(0, self._left(job.view, metered))

    def note_usage(self, job_id: int) -> None:
        """A usage record of this job was committed: it is active (for settle-after-idle)."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.last_activity = time.monotonic()

    async def request_settlement(self, job_id: int, now_ms: int) -> KnownJob:
        """Mark the job for settlement (the worker settles it), or :class:`JobRefused`. The
        request is a ledger row before it is acted on: a crash, a restart or another replica
        never forgets one, and a request the ledger did not take is not acted on at all."""
        job = await self.known(job_id, refresh=True)
        if job is None or not job.view.exists:
            raise JobRefused(
                f"job {job_id} is not known on-chain",
                code="unknown_job",
                status=404,
                param="job_id",
            )
        await self._ledger.request_settlement(job_id, now_ms)
        job.settle_requested = True
        return job

    def view(self, job_id: int) -> OnChainJob | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.view

    # -- the cache -------------------------------------------------------------------------

    def jobs(self) -> list[tuple[int, KnownJob]]:
        """The cached jobs, as a list: the caller may await while going over it."""
        return list(self._jobs.items())

    async def known(self, job_id: int, *, refresh: bool) -> KnownJob | None:
        """The job's on-chain view. Without ``refresh`` a cached view is returned at once, and a
        stale one is re-read in the background: a slow or dead RPC never holds up a request
        for a job already known. An unknown job waits for its first read.

        None when the chain does not answer and the job is not cached. A job read as not
        existing comes back uncached, with ``view.exists`` false.
        """
        job = self._jobs.get(job_id)
        if job is not None and not refresh:
            if time.monotonic() - job.read_at >= VIEW_MAX_AGE and job_id not in self._reading:
                task = asyncio.create_task(self._read(job_id))
                self._reading[job_id] = task
                task.add_done_callback(lambda _: self._reading.pop(job_id, None))
            return job
        return await self._read(job_id)

    async def _read(self, job_id: int) -> KnownJob | None:
        job = self._jobs.get(job_id)
        chain = self._chain
        try:
            view = await read_job(chain.w3, chain.address, chain.market, job_id)
        except Exception as exc:  # the chain is down: serve from the cache when there is one
            log.warning("chain: cannot read job %s: %s", job_id, type(exc).__name__)
            if job is not None:
                job.read_at = time.monotonic()  # not again before VIEW_MAX_AGE
            return job
        if not view.exists:
            # Never cached: a stream of made-up ids must not grow memory or the worker's rounds.
            return KnownJob(view, time.monotonic())
        if job is None:
            job = self._jobs[job_id] = KnownJob(
                view, time.monotonic(), last_activity=time.monotonic()
            )
        else:
            job.view, job.read_at = view, time.monotonic()
        return job

    async def _metered(self, job_id: int) -> int:
        return await self._ledger.job_tokens(job_id)  # one row, not a sum over the job
