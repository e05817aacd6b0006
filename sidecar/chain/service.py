"""From metered tokens to payment: job admission, claims through the outbox, settlement.

The shell around the pure pieces (``checkpoints.decide``, ``proofs``, the ``marketplace``
adapters): it reads the ledger and the chain, writes outbox rows *before* sending, and hands
every transaction to the one :class:`~sidecar.chain.sender.ChainSender`.

One background task works the jobs. The proxy only calls :meth:`ChainService.admit` before
relaying (a cached on-chain view: unknown, inactive and foreign jobs are refused instead of
served for free) and :meth:`ChainService.note_usage` after a record is committed. When the chain
is down the proxy keeps serving known jobs; claims wait in the outbox and go out when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncHTTPProvider, AsyncWeb3

from sidecar.chain.marketplace import (
    Marketplace,
    OnChainJob,
    RevertKind,
    check_marketplace,
    proof_submitted_events,
    read_dispute_window,
    read_job,
)
from sidecar.chain.proofs import (
    ClaimProof,
    ClaimSpec,
    LedgerRow,
    build_claim_proof,
    conversation_cid,
    records_root,
)
from sidecar.chain.sender import ChainSender, Outcome, TxResult, describe, is_transient
from sidecar.checkpoints import ClaimNow, Idle, JobState, Settle, WaitUntil, decide
from sidecar.config import Settings
from sidecar.ledger import Claim, ClaimKind, ClaimState, Ledger, RecordState
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.chain")

VIEW_MAX_AGE = 30.0  # seconds an on-chain view serves admission without a re-read
TICK = 1.0  # the worker looks at waiting jobs at least this often
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
# Claim at the latest this long before anyone may time the session out (claims then fail).
TIMEOUT_MARGIN = 30
# A job whose claims the contract refuses this many times in a row (for a reason that is neither
# "wait" nor "the session ended") stops claiming: an operator must look (bad proof system...).
MAX_FAILED_CLAIMS = 3
# How far back a claim's ProofSubmitted log is looked for (about 5.5 hours of 2 s blocks).
LOG_WINDOW_BLOCKS = 10_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class JobRefused(Exception):
    """The proxy must not serve this job; ``status`` and ``code`` shape the client's error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class _Job:
    view: OnChainJob
    read_at: float  # monotonic
    settle_requested: bool = False
    settled: bool = False
    stopped: str | None = None  # why claiming stopped (the session ended, a config error)
    wake_at: float = 0.0  # monotonic: look again at this time (0: no timer)
    dirty: bool = True  # something changed (new usage, a mined claim): look again now
    failures: int = 0  # transient faults in a row (backoff)
    failed_claims: int = 0  # claims the contract refused in a row
    last_activity: float = 0.0


class ChainService:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ledger = ledger
        self.address = str(settings.marketplace)
        self._jobs: dict[int, _Job] = {}
        self._wake = asyncio.Event()
        self._reading: dict[int, asyncio.Task[_Job | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.w3: AsyncWeb3 | None = None
        self.market: Marketplace | None = None
        self.sender: ChainSender | None = None
        self.account: LocalAccount | None = None
        self.dispute_window = settings.dispute_window

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the chain and the contract (refusing to start with a clear message), resume
        the outbox, start the worker."""
        self.account = Account.from_key(self.settings.read_host_key())
        # No retries inside web3: the worker's own backoff retries, and a request's admission
        # must not wait out five of them.
        self.w3 = AsyncWeb3(
            AsyncHTTPProvider(
                self.settings.rpc_url,
                request_kwargs={"timeout": 10},
                exception_retry_configuration=None,
            )
        )
        self.market = await check_marketplace(
            self.w3,
            chain_id=int(self.settings.chain_id or 0),
            address=self.address,
            version=self.settings.contract_version,
        )
        self.address = AsyncWeb3.to_checksum_address(self.address)
        window = await read_dispute_window(self.w3, self.address, self.market)
        if window is not None:
            self.dispute_window = window
        self.sender = ChainSender(self.w3, self.account, int(self.settings.chain_id or 0))
        log.info(
            "chain: %s marketplace %s on chain %s, host %s, dispute window %ss",
            self.market.version.value,
            self.address,
            self.settings.chain_id,
            self.account.address,
            self.dispute_window,
        )
        await self._resume()
        self._task = asyncio.create_task(self._run(), name="sidecar-chain-worker")

    async def _resume(self) -> None:
        """Take up every job the ledger holds that is not settled yet: tokens metered before a
        restart are claimed without waiting for the job's next request."""
        claims = await self.ledger.claims()
        settled = {
            c.job_id
            for c in claims
            if c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED
        }
        jobs = {t.job_id for t in await self.ledger.jobs() if t.job_id is not None}
        jobs |= {c.job_id for c in claims}
        for job_id in sorted(jobs - settled):
            await self._known(job_id, refresh=False)
        if jobs - settled:
            log.info("chain: resuming %d job(s) from the ledger", len(jobs - settled))

    async def stop(self) -> None:
        for reading in list(self._reading.values()):
            reading.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.w3 is not None:
            await self.w3.provider.disconnect()

    async def health(self) -> dict[str, object]:
        """For /sidecar/health: does the RPC answer, and can the host key still pay for gas.

        The balance is a decimal string of wei, never a float (so it is not a Prometheus gauge)."""
        assert self.w3 is not None and self.account is not None
        out: dict[str, object] = {
            "contract_version": self.settings.contract_version,
            "marketplace": self.address,
            "host": self.account.address,
            "unfinished_claims": len(await self.ledger.unfinished_claims()),
        }
        try:
            block = await asyncio.wait_for(self.w3.eth.get_block_number(), timeout=3)
            balance = await asyncio.wait_for(self.w3.eth.get_balance(self.account.address), 3)
        except Exception as exc:
            out.update(reachable=False, error=describe(exc))
            return out
        out.update(reachable=True, block=int(block), host_balance_wei=str(int(balance)))
        return out

    # -- the proxy's side ------------------------------------------------------------------

    async def admit(self, job_id: int) -> int:
        """The tokens this job may still be served, or :class:`JobRefused`."""
        job = await self._known(job_id, refresh=False)
        if job is None:
            raise JobRefused(
                503,
                "chain_unavailable",
                f"job {job_id} cannot be checked on-chain right now (the chain does not answer); "
                "retry later",
            )
        view = job.view
        if not view.exists:
            raise JobRefused(402, "unknown_job", f"job {job_id} does not exist on the marketplace")
        assert self.account is not None and self.market is not None
        if view.host.lower() != self.account.address.lower():
            raise JobRefused(
                403, "foreign_job", f"job {job_id} belongs to host {view.host}, not this host"
            )
        if not view.is_active or job.settled or job.settle_requested:
            raise JobRefused(402, "job_not_active", f"job {job_id} is no longer active")
        metered = await self._metered(job_id)
        left = view.tokens_used + self.market.budget_tokens(view) - max(metered, view.tokens_used)
        if left <= 0:
            raise JobRefused(402, "budget_spent", f"job {job_id}'s deposit is used up")
        job.last_activity = time.monotonic()
        return left

    def note_usage(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.last_activity = time.monotonic()
            job.dirty = True
        self._wake.set()

    async def request_settlement(self, job_id: int) -> None:
        job = await self._known(job_id, refresh=True)
        if job is None or not job.view.exists:
            raise JobRefused(404, "unknown_job", f"job {job_id} is not known on-chain")
        job.settle_requested = True
        job.dirty = True
        self._wake.set()

    def view(self, job_id: int) -> OnChainJob | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.view

    # -- the worker ------------------------------------------------------------------------

    async def _known(self, job_id: int, *, refresh: bool) -> _Job | None:
        """The job's on-chain view. Without ``refresh`` a cached view is returned at once, and a
        stale one is re-read in the background: a slow or dead RPC never holds up a request
        for a job already known. An unknown job waits for its first read."""
        job = self._jobs.get(job_id)
        if job is not None and not refresh:
            if time.monotonic() - job.read_at >= VIEW_MAX_AGE and job_id not in self._reading:
                task = asyncio.create_task(self._read(job_id))
                self._reading[job_id] = task
                task.add_done_callback(lambda _: self._reading.pop(job_id, None))
            return job
        return await self._read(job_id)

    async def _read(self, job_id: int) -> _Job | None:
        job = self._jobs.get(job_id)
        try:
            assert self.w3 is not None and self.market is not None
            view = await read_job(self.w3, self.address, self.market, job_id)
        except Exception as exc:  # the chain is down: serve from the cache when there is one
            log.warning("chain: cannot read job %s: %s", job_id, type(exc).__name__)
            if job is not None:
                job.read_at = time.monotonic()  # not again before VIEW_MAX_AGE
            return job
        if not view.exists:
            # Never cached: a stream of made-up ids must not grow memory or the worker's rounds.
            return _Job(view, time.monotonic())
        if job is None:
            job = self._jobs[job_id] = _Job(view, time.monotonic(), last_activity=time.monotonic())
        else:
            job.view, job.read_at = view, time.monotonic()
        return job

    async def _metered(self, job_id: int) -> int:
        totals = await self.ledger.job(job_id)
        return 0 if totals is None else totals.billable_tokens

    def _claim_by(self, view: OnChainJob) -> int:
        """When unclaimed tokens must be secured even in small claims: a margin before anyone
        may time the session out. The margin is a third of the window, at most TIMEOUT_MARGIN:
        a short proof interval (v1's is in seconds) must not make every moment urgent."""
        assert self.market is not None
        timeout = self.market.timeout_after(view)
        window = max(0, timeout - view.last_proof_time)
        return timeout - min(TIMEOUT_MARGIN, window // 3)

    async def _chain_now(self) -> int:
        """The timestamp the next block will have, as well as the node knows it: the contract
        measures the rate cap and the dispute window with it. The pending block's (the same
        block gas is estimated against); the latest block's where a node has no pending block.
        On a quiet chain the latest block can be far behind, and a claim would wait for a block
        nobody mines."""
        assert self.w3 is not None
        latest = int((await self.w3.eth.get_block("latest"))["timestamp"])
        try:
            pending = int((await self.w3.eth.get_block("pending"))["timestamp"])
        except Exception as exc:
            if is_transient(exc):
                raise
            return latest
        return max(latest, pending)

    async def _closed_rows(self, job_id: int) -> list[LedgerRow]:
        """The job's finished records, in ledger order: what claims commit to. Records that were
        submitted without waiting (a stream cut off by a disconnect) are flushed first, so a
        settlement that follows a disconnect sees their tokens."""
        await self.ledger.flush()
        return [
            (r.key, r.billable_tokens)
            for r in await self.ledger.records(job_id)
            if r.state is not RecordState.OPEN
        ]

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=TICK)
            except TimeoutError:
                pass
            self._wake.clear()
            now = time.monotonic()
            for job_id, job in list(self._jobs.items()):
                if job.settled or job.stopped:
                    continue
                idle = self.settings.settle_after_idle
                if idle and not job.settle_requested and now - job.last_activity >= idle:
                    log.info("chain: job %s idle for %ss: settling", job_id, idle)
                    job.settle_requested = job.dirty = True
                timer_due = 0 < job.wake_at <= now
                if job.wake_at > now or not (job.dirty or timer_due):
                    continue  # nothing changed: no chain reads for idle jobs
                job.dirty = False
                job.wake_at = 0.0
                try:
                    await self._step(job_id, job)
                    job.failures = 0
                except Exception as exc:
                    if not is_transient(exc):
                        job.failures += 1
                        job.wake_at = time.monotonic() + BACKOFF_MAX
                        log.exception("chain: job %s failed a step", job_id)
                        continue
                    self.metrics.chain_errors.inc()
                    job.failures += 1
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**job.failures)
                    job.wake_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
                    log.warning("chain: job %s waits %.1fs: %s", job_id, delay, describe(exc))
                if job.settle_requested and not job.settled and not job.wake_at:
                    job.wake_at = time.monotonic() + TICK  # settling: keep looking

    async def _step(self, job_id: int, job: _Job) -> None:
        assert self.market is not None and self.w3 is not None
        claims = await self.ledger.claims(job_id)
        for claim in claims:  # an unfinished row first: resend or confirm it
            if claim.state in (ClaimState.PENDING, ClaimState.SENT):
                await self._send(job, claim)
                return
        refreshed = await self._known(job_id, refresh=True)
        if refreshed is None:
            raise TimeoutError("the chain does not answer")
        view = job.view
        if not view.exists:
            job.stopped = "no such job on the marketplace"
            log.warning("chain: job %s does not exist on the marketplace; claiming stops", job_id)
            return
        if not view.is_active:
            job.stopped = f"session status {view.status.name}"
            log.info("chain: job %s is %s; claiming stops", job_id, view.status.name)
            return
        rows = await self._closed_rows(job_id)
        metered = sum(tokens for _, tokens in rows)
        claimed = sum(
            c.tokens
            for c in claims
            if c.kind is ClaimKind.PROOF and c.state in (ClaimState.SENT, ClaimState.CONFIRMED)
        )
        chain_now = await self._chain_now()
        state = JobState(
            metered=metered,
            claimed=max(claimed, view.tokens_used),
            onchain_used=view.tokens_used,
            budget=self.market.budget_tokens(view),
            last_proof_time=view.last_proof_time,
            now=chain_now,
            rate=self.market.default_rate,
            checkpoint=self.settings.checkpoint_tokens,
            settling=job.settle_requested,
            min_first_claim=self.market.min_first_claim(view),
            claim_by=self._claim_by(view),
        )
        decision = decide(state)
        seq = (claims[-1].seq if claims else 0) + 1
        if isinstance(decision, ClaimNow):
            first = view.tokens_used
            spec = ClaimSpec(
                chain_id=int(self.settings.chain_id or 0),
                marketplace=self.address,
                job_id=job_id,
                seq=seq,
                first_token=first,
                end_token=first + decision.tokens,
                records_root=records_root(rows, first + decision.tokens),
            )
            assert self.account is not None
            proof = build_claim_proof(spec, self.account)
            claim = Claim(
                job_id=job_id,
                seq=seq,
                kind=ClaimKind.PROOF,
                tokens=decision.tokens,
                first_token=first,
                end_token=first + decision.tokens,
                payload=proof.to_payload(),
                state=ClaimState.PENDING,
                created_ms=_now_ms(),
                updated_ms=_now_ms(),
            )
            await self.ledger.add_claim(claim)  # durable before it is sent
            await self._send(job, claim)
        elif isinstance(decision, WaitUntil):
            job.wake_at = time.monotonic() + max(0, decision.at - chain_now)
        elif isinstance(decision, Settle):
            await self._settle(job_id, job, decision, claims, rows, chain_now, seq)
        else:
            assert isinstance(decision, Idle)

    async def _settle(
        self,
        job_id: int,
        job: _Job,
        decision: Settle,
        claims: list[Claim],
        rows: Iterable[LedgerRow],
        chain_now: int,
        seq: int,
    ) -> None:
        assert self.market is not None
        view = job.view
        if decision.unclaimable and not any(c.state is ClaimState.UNCLAIMABLE for c in claims):
            first = view.tokens_used
            await self.ledger.add_claim(
                Claim(
                    job_id=job_id,
                    seq=seq,
                    kind=ClaimKind.PROOF,
                    tokens=decision.unclaimable,
                    first_token=first,
                    end_token=first + decision.unclaimable,
                    payload=b"",
                    state=ClaimState.UNCLAIMABLE,
                    created_ms=_now_ms(),
                    updated_ms=_now_ms(),
                    error=f"{decision.unclaimable} tokens can never be claimed "
                    f"({decision.over_budget} beyond the deposit)",
                )
            )
            seq += 1
            self.metrics.claims.labels("proof", "unclaimable").inc()
        not_before = self.market.settle_not_before(view, self.dispute_window)
        if chain_now < not_before:
            job.wake_at = time.monotonic() + (not_before - chain_now)
            log.info(
                "chain: job %s settles after the dispute window, in %ss",
                job_id,
                not_before - chain_now,
            )
            return
        cid = conversation_cid(rows)
        claim = Claim(
            job_id=job_id,
            seq=seq,
            kind=ClaimKind.SETTLE,
            tokens=0,
            first_token=view.tokens_used,
            end_token=view.tokens_used,
            payload=cid.encode(),
            state=ClaimState.PENDING,
            created_ms=_now_ms(),
            updated_ms=_now_ms(),
        )
        await self.ledger.add_claim(claim)
        await self._send(job, claim)

    async def _send(self, job: _Job, claim: Claim) -> None:
        """Send (or resend, or confirm) one outbox row, and move it forward."""
        assert self.market is not None and self.sender is not None and self.w3 is not None
        if claim.state is ClaimState.SENT and claim.tx_hash:
            earlier = await self.sender.lookup(claim.tx_hash)
            if earlier is not None:
                await self._conclude(job, claim, earlier)
                return
        if claim.kind is ClaimKind.PROOF:
            proof = ClaimProof.from_payload(claim.payload)
            data = self.market.claim_calldata(claim.job_id, claim.tokens, proof)
        else:
            data = self.market.settle_calldata(claim.job_id, claim.payload.decode())

        async def on_sent(tx_hash: str, nonce: int) -> None:
            await self.ledger.update_claim(
                claim.job_id,
                claim.seq,
                ClaimState.SENT,
                now_ms=_now_ms(),
                tx_hash=tx_hash,
                nonce=nonce,
            )

        result = await self.sender.send(self.address, data, on_sent=on_sent)
        await self._conclude(job, claim, result)

    async def _conclude(self, job: _Job, claim: Claim, result: TxResult) -> None:
        assert self.market is not None and self.w3 is not None
        job_id = claim.job_id
        if result.outcome is Outcome.CONFIRMED:
            self.metrics.claims.labels(claim.kind.value, "confirmed").inc()
            await self._mark(claim, ClaimState.CONFIRMED, result.tx_hash)
            job.dirty = True  # the next claim may be due now
            job.failed_claims = 0
            await self._known(job_id, refresh=True)
            if claim.kind is ClaimKind.SETTLE:
                job.settled = True
                log.info("chain: job %s settled in %s", job_id, result.tx_hash)
            else:
                log.info(
                    "chain: job %s claimed %s tokens (#%s) in %s",
                    job_id,
                    claim.tokens,
                    claim.seq,
                    result.tx_hash,
                )
            return
        reason = result.revert_reason
        kind = self.market.classify_revert(reason)
        if claim.kind is ClaimKind.PROOF:
            # A resend of a claim that was already mined reverts (the rate cap comes before the
            # duplicate check): the ProofSubmitted logs say whether it is on-chain.
            events = await proof_submitted_events(self.w3, self.address, self.market, job_id, None)
            expected = self.market.event_proof_hash(ClaimProof.from_payload(claim.payload))
            found = next((e for e in events if e.proof_hash == expected), None)
            if found is not None:
                self.metrics.claims.labels(claim.kind.value, "already_on_chain").inc()
                await self._mark(claim, ClaimState.CONFIRMED, found.tx_hash)
                job.dirty = True
                await self._known(job_id, refresh=True)
                log.info(
                    "chain: job %s claim #%s was already on-chain; confirmed from its log",
                    job_id,
                    claim.seq,
                )
                return
        if kind is RevertKind.WAIT:
            self.metrics.claims.labels(claim.kind.value, "wait").inc()
            job.wake_at = time.monotonic() + TICK
            log.info("chain: job %s claim #%s must wait: %s", job_id, claim.seq, reason)
            return
        self.metrics.claims.labels(claim.kind.value, "failed").inc()
        await self._mark(claim, ClaimState.FAILED, result.tx_hash, error=reason)
        if kind is RevertKind.CONFIG_ERROR:
            job.stopped = f"configuration error: {reason}"
            log.error(
                "chain: job %s refused this host's claims (%s): check the host key and "
                "the job's host",
                job_id,
                reason,
            )
        elif kind is RevertKind.STOP_JOB:
            job.stopped = f"session ended: {reason}"
            log.warning("chain: job %s: %s; claiming stops", job_id, reason)
        else:
            job.failed_claims += 1
            if job.failed_claims >= MAX_FAILED_CLAIMS:
                job.stopped = f"{job.failed_claims} claims refused: {reason}"
                log.error(
                    "chain: job %s: %d claims in a row refused (%s); claiming stops until "
                    "a restart",
                    job_id,
                    job.failed_claims,
                    reason,
                )
            else:
                job.wake_at = time.monotonic() + BACKOFF_MAX
                log.error("chain: job %s claim #%s reverted: %s", job_id, claim.seq, reason)

    async def _mark(
        self, claim: Claim, state: ClaimState, tx_hash: str | None, error: str | None = None
    ) -> None:
        await self.ledger.update_claim(
            claim.job_id, claim.seq, state, now_ms=_now_ms(), tx_hash=tx_hash, error=error
        )
