"""The claim worker: one background task that turns each known job's metered tokens into claims,
and settles the session.

Each round goes over the cached jobs (``admission``) that changed (new usage, a mined claim) or
whose timer is due, and takes one step per job: an unfinished outbox row first (resend or confirm
it), else what ``policy.decide`` says on the ledger's records and a fresh on-chain view (claim
now, wait for the rate cap, settle). Every claim and settlement is written to the ledger's outbox
*before* it is sent through the one :class:`~sidecar.chain.sender.ChainSender`, so a crash never
loses what was sent, and at start the worker takes up every job the ledger holds that is not
settled. RPC faults back off per job; a job the contract refuses for good stops claiming.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sidecar.chain.admission import JobAdmission, KnownJob
from sidecar.chain.marketplace import OnChainJob, RevertKind
from sidecar.chain.policy import ClaimNow, Idle, JobState, Settle, WaitUntil, decide
from sidecar.chain.proofs import (
    GENESIS,
    ClaimProof,
    ClaimSpec,
    LedgerRow,
    build_claim_proof,
    claim_pieces,
    committed_by_pieces,
    conversation_cid,
    pieces_root,
)
from sidecar.chain.rpc import ConnectedChain, chain_now, proof_submitted_events
from sidecar.chain.sender import Outcome, TxResult, describe, is_transient
from sidecar.config import Settings
from sidecar.ledger import Claim, ClaimKind, ClaimState, Ledger
from sidecar.ledger.lease import SubmitterLease
from sidecar.metrics import Metrics
from sidecar.tasks import stop_task

log = logging.getLogger("sidecar.chain")

TICK = 1.0  # the worker looks at waiting jobs at least this often
# How often the worker reads the ledger for usage other replicas recorded and settlements they
# were asked for (one row per job: cheap), and closes the records of replicas that are gone.
DISCOVER_EVERY = 2.0
SWEEP_EVERY = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
# Claim at the latest this long before anyone may time the session out (claims then fail).
TIMEOUT_MARGIN = 30
# A job whose claims the contract refuses this many times in a row (for a reason that is neither
# "wait" nor "the session ended") stops claiming: an operator must look (bad proof system...).
MAX_FAILED_CLAIMS = 3


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Progress:
    """The worker's own state of one job: when to look at it again, and why it stopped."""

    stopped: str | None = None  # why claiming stopped (the session ended, a config error)
    wake_at: float = 0.0  # monotonic: look again at this time (0: no timer)
    dirty: bool = True  # something changed (new usage, a mined claim): look again now
    failures: int = 0  # transient faults in a row (backoff)
    failed_claims: int = 0  # claims the contract refused in a row


@dataclass(frozen=True, slots=True)
class ClaimEvent:
    """A claim of a job's tokens (or its settlement) that was mined, or refused."""

    job_id: int
    kind: ClaimKind
    seq: int
    tokens: int
    state: ClaimState  # CONFIRMED or FAILED
    tx_hash: str | None
    error: str | None = None


ClaimListener = Callable[[ClaimEvent], None]


class ClaimWorker:
    def __init__(
        self,
        chain: ConnectedChain,
        admission: JobAdmission,
        ledger: Ledger,
        metrics: Metrics,
        settings: Settings,
        on_claim: ClaimListener | None = None,
        lease: SubmitterLease | None = None,
    ) -> None:
        self._on_claim = on_claim
        # Sends only while this is held (several replicas: one sender per host key).
        self._lease = lease
        self._seen_tokens: dict[int, int] = {}
        self._next_discovery = 0.0
        self._next_sweep = 0.0
        self._chain = chain
        self._admission = admission
        self._ledger = ledger
        self._metrics = metrics
        self._settings = settings
        # Made when the worker first looks at a job: its defaults are a fresh job's.
        self._progress: dict[int, _Progress] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take up the ledger's unsettled jobs, then start the background task."""
        await self._resume()
        self._task = asyncio.create_task(self._run(), name="sidecar-chain-worker")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    def wake(self, job_id: int) -> None:
        """Something changed for this job (usage, a settlement request): look at it now."""
        progress = self._progress.get(job_id)
        if progress is not None:
            progress.dirty = True
        self._wake.set()

    async def _resume(self) -> None:
        """Take up every job the ledger holds that is not settled yet: tokens metered before a
        restart are claimed without waiting for the job's next request."""
        claims = await self._ledger.claims()
        settled = {
            c.job_id
            for c in claims
            if c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED
        }
        self._seen_tokens = await self._ledger.billable_by_job()
        jobs = set(self._seen_tokens) | {c.job_id for c in claims}
        for job_id in sorted(jobs - settled):
            await self._admission.known(job_id, refresh=False)
        if jobs - settled:
            log.info("chain: resuming %d job(s) from the ledger", len(jobs - settled))
        await self._take_settlement_requests()

    async def _discover(self) -> None:
        """Take up what other processes of this ledger saw: new usage of any job (the
        replicas that do not send), and settlements they were asked for."""
        now = time.monotonic()
        if now >= self._next_sweep and self._ledger.shared:
            self._next_sweep = now + SWEEP_EVERY
            closed = await self._ledger.close_interrupted(_now_ms())
            if closed:
                log.warning("chain: closed %d record(s) of replicas that are gone", closed)
        if now < self._next_discovery:
            return
        self._next_discovery = now + DISCOVER_EVERY
        for job_id, tokens in (await self._ledger.billable_by_job()).items():
            if self._seen_tokens.get(job_id) == tokens:
                continue
            self._seen_tokens[job_id] = tokens
            job = await self._admission.known(job_id, refresh=False)
            if job is not None and job.view.exists:
                job.last_activity = time.monotonic()
                self.wake(job_id)
        await self._take_settlement_requests()

    async def _take_settlement_requests(self) -> None:
        for job_id in await self._ledger.settlement_requests():
            job = await self._admission.known(job_id, refresh=False)
            if job is not None and job.view.exists and not job.settle_requested:
                job.settle_requested = True
                self.wake(job_id)

    # -- the rounds ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=TICK)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._discover()
            except Exception as exc:  # the ledger is down: claims wait, serving goes on
                log.warning("chain: cannot read the ledger's jobs: %s", describe(exc))
            now = time.monotonic()
            for job_id, job in self._admission.jobs():
                progress = self._progress.setdefault(job_id, _Progress())
                if job.settled or progress.stopped:
                    continue
                idle = self._settings.settle_after_idle
                if idle and not job.settle_requested and now - job.last_activity >= idle:
                    try:  # a ledger row first, as every settlement request
                        await self._ledger.request_settlement(job_id, time.time_ns() // 1_000_000)
                    except Exception as exc:
                        log.warning(
                            "chain: job %s cannot be marked to settle: %s", job_id, describe(exc)
                        )
                        continue
                    log.info("chain: job %s idle for %ss: settling", job_id, idle)
                    job.settle_requested = progress.dirty = True
                timer_due = 0 < progress.wake_at <= now
                if progress.wake_at > now or not (progress.dirty or timer_due):
                    continue  # nothing changed: no chain reads for idle jobs
                progress.dirty = False
                progress.wake_at = 0.0
                try:
                    await self._step(job_id, job, progress)
                    progress.failures = 0
                except Exception as exc:
                    if not is_transient(exc):
                        progress.failures += 1
                        progress.wake_at = time.monotonic() + BACKOFF_MAX
                        log.exception("chain: job %s failed a step", job_id)
                        continue
                    self._metrics.chain_errors.inc()
                    progress.failures += 1
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**progress.failures)
                    progress.wake_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
                    log.warning("chain: job %s waits %.1fs: %s", job_id, delay, describe(exc))
                if job.settle_requested and not job.settled and not progress.wake_at:
                    progress.wake_at = time.monotonic() + TICK  # settling: keep looking

    async def _step(self, job_id: int, job: KnownJob, progress: _Progress) -> None:
        chain = self._chain
        claims = await self._ledger.claims(job_id)
        for claim in claims:  # an unfinished row first: resend or confirm it
            if claim.state in (ClaimState.PENDING, ClaimState.SENT):
                await self._send(job, progress, claim)
                return
        refreshed = await self._admission.known(job_id, refresh=True)
        if refreshed is None:
            raise TimeoutError("the chain does not answer")
        view = job.view
        if not view.exists:
            progress.stopped = "no such job on the marketplace"
            log.warning("chain: job %s does not exist on the marketplace; claiming stops", job_id)
            return
        if not view.is_active:
            progress.stopped = f"session status {view.status.name}"
            log.info("chain: job %s is %s; claiming stops", job_id, view.status.name)
            return
        rows = await self._claimable_rows(job_id)
        metered = sum(tokens for _, tokens in rows)
        claimed = sum(
            c.tokens
            for c in claims
            if c.kind is ClaimKind.PROOF and c.state in (ClaimState.SENT, ClaimState.CONFIRMED)
        )
        now = await chain_now(chain.w3)
        state = JobState(
            metered=metered,
            claimed=max(claimed, view.tokens_used),
            onchain_used=view.tokens_used,
            budget=chain.market.budget_tokens(view),
            last_proof_time=view.last_proof_time,
            now=now,
            rate=chain.market.default_rate,
            checkpoint=self._settings.checkpoint_tokens,
            settling=job.settle_requested,
            min_first_claim=chain.market.min_first_claim(view),
            claim_by=self._claim_by(view),
        )
        decision = decide(state)
        seq = (claims[-1].seq if claims else 0) + 1
        if isinstance(decision, ClaimNow):
            first = view.tokens_used
            previous_root, committed = _claimed_so_far(claims, rows)
            pieces = claim_pieces(rows, committed, decision.tokens)
            spec = ClaimSpec(
                chain_id=chain.chain_id,
                marketplace=chain.address,
                job_id=job_id,
                seq=seq,
                first_token=first,
                end_token=first + decision.tokens,
                records_root=pieces_root(previous_root, pieces),
            )
            proof = build_claim_proof(spec, chain.account)
            claim = _new_claim(
                job_id, seq, ClaimKind.PROOF, first, decision.tokens, proof.to_payload(), pieces
            )
            await self._ledger.add_claim(claim)  # durable before it is sent
            await self._send(job, progress, claim)
        elif isinstance(decision, WaitUntil):
            progress.wake_at = time.monotonic() + max(0, decision.at - now)
        elif isinstance(decision, Settle):
            await self._settle(job_id, job, progress, decision, claims, rows, now, seq)
        else:
            assert isinstance(decision, Idle)

    async def _settle(
        self,
        job_id: int,
        job: KnownJob,
        progress: _Progress,
        decision: Settle,
        claims: list[Claim],
        rows: Iterable[LedgerRow],
        now: int,
        seq: int,
    ) -> None:
        view = job.view
        if decision.unclaimable and not any(c.state is ClaimState.UNCLAIMABLE for c in claims):
            first = view.tokens_used
            await self._ledger.add_claim(
                _new_claim(
                    job_id,
                    seq,
                    ClaimKind.PROOF,
                    first,
                    decision.unclaimable,
                    b"",
                    state=ClaimState.UNCLAIMABLE,
                    error=f"{decision.unclaimable} tokens can never be claimed "
                    f"({decision.over_budget} beyond the deposit)",
                )
            )
            seq += 1
            self._metrics.claims.labels("proof", "unclaimable").inc()
        not_before = self._chain.market.settle_not_before(view, self._chain.dispute_window)
        if now < not_before:
            progress.wake_at = time.monotonic() + (not_before - now)
            log.info(
                "chain: job %s settles after the dispute window, in %ss",
                job_id,
                not_before - now,
            )
            return
        cid = conversation_cid(rows)
        claim = _new_claim(job_id, seq, ClaimKind.SETTLE, view.tokens_used, 0, cid.encode())
        await self._ledger.add_claim(claim)
        await self._send(job, progress, claim)

    # -- sending and concluding ----------------------------------------------------------------

    async def _send(self, job: KnownJob, progress: _Progress, claim: Claim) -> None:
        """Send (or resend, or confirm) one outbox row, and move it forward."""
        chain = self._chain
        if claim.state is ClaimState.SENT and claim.tx_hash:
            earlier = await chain.sender.lookup(claim.tx_hash)
            if earlier is not None:
                await self._conclude(job, progress, claim, earlier)
                return
        if claim.kind is ClaimKind.PROOF:
            proof = ClaimProof.from_payload(claim.payload)
            data = chain.market.claim_calldata(claim.job_id, claim.tokens, proof)
        else:
            data = chain.market.settle_calldata(claim.job_id, claim.payload.decode())

        if self._lease is not None and not await self._lease.still_held():
            # Another replica may be the submitter now: it resumes this row from the outbox.
            progress.wake_at = time.monotonic() + TICK
            log.warning("chain: the submitter lease is lost; job %s's claim waits", claim.job_id)
            return

        async def on_sent(tx_hash: str, nonce: int) -> None:
            await self._ledger.update_claim(
                claim.job_id,
                claim.seq,
                ClaimState.SENT,
                now_ms=_now_ms(),
                tx_hash=tx_hash,
                nonce=nonce,
            )

        result = await chain.sender.send(chain.address, data, on_sent=on_sent)
        await self._conclude(job, progress, claim, result)

    async def _conclude(
        self, job: KnownJob, progress: _Progress, claim: Claim, result: TxResult
    ) -> None:
        chain = self._chain
        job_id = claim.job_id
        if result.outcome is Outcome.CONFIRMED:
            self._metrics.claims.labels(claim.kind.value, "confirmed").inc()
            await self._mark(claim, ClaimState.CONFIRMED, result.tx_hash)
            progress.dirty = True  # the next claim may be due now
            progress.failed_claims = 0
            await self._admission.known(job_id, refresh=True)
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
        kind = chain.market.classify_revert(reason)
        if claim.kind is ClaimKind.PROOF:
            # A resend of a claim that was already mined reverts (the rate cap comes before the
            # duplicate check): the ProofSubmitted logs say whether it is on-chain.
            events = await proof_submitted_events(
                chain.w3, chain.address, chain.market, job_id, None
            )
            expected = chain.market.event_proof_hash(ClaimProof.from_payload(claim.payload))
            found = next((e for e in events if e.proof_hash == expected), None)
            if found is not None:
                self._metrics.claims.labels(claim.kind.value, "already_on_chain").inc()
                await self._mark(claim, ClaimState.CONFIRMED, found.tx_hash)
                progress.dirty = True
                await self._admission.known(job_id, refresh=True)
                log.info(
                    "chain: job %s claim #%s was already on-chain; confirmed from its log",
                    job_id,
                    claim.seq,
                )
                return
        if kind is RevertKind.WAIT:
            self._metrics.claims.labels(claim.kind.value, "wait").inc()
            progress.wake_at = time.monotonic() + TICK
            log.info("chain: job %s claim #%s must wait: %s", job_id, claim.seq, reason)
            return
        self._metrics.claims.labels(claim.kind.value, "failed").inc()
        await self._mark(claim, ClaimState.FAILED, result.tx_hash, error=reason)
        if kind is RevertKind.CONFIG_ERROR:
            progress.stopped = f"configuration error: {reason}"
            log.error(
                "chain: job %s refused this host's claims (%s): check the host key and "
                "the job's host",
                job_id,
                reason,
            )
        elif kind is RevertKind.STOP_JOB:
            progress.stopped = f"session ended: {reason}"
            log.warning("chain: job %s: %s; claiming stops", job_id, reason)
        else:
            progress.failed_claims += 1
            if progress.failed_claims >= MAX_FAILED_CLAIMS:
                progress.stopped = f"{progress.failed_claims} claims refused: {reason}"
                log.error(
                    "chain: job %s: %d claims in a row refused (%s); claiming stops until "
                    "a restart",
                    job_id,
                    progress.failed_claims,
                    reason,
                )
            else:
                progress.wake_at = time.monotonic() + BACKOFF_MAX
                log.error("chain: job %s claim #%s reverted: %s", job_id, claim.seq, reason)

    async def _mark(
        self, claim: Claim, state: ClaimState, tx_hash: str | None, error: str | None = None
    ) -> None:
        await self._ledger.update_claim(
            claim.job_id, claim.seq, state, now_ms=_now_ms(), tx_hash=tx_hash, error=error
        )
        if self._on_claim is not None and state in (ClaimState.CONFIRMED, ClaimState.FAILED):
            event = ClaimEvent(
                claim.job_id, claim.kind, claim.seq, claim.tokens, state, tx_hash, error
            )
            try:
                self._on_claim(event)
            except Exception:  # a listener's fault must never stop claiming
                log.exception("chain: a claim listener failed on job %s", claim.job_id)

    # -- helpers ---------------------------------------------------------------------------

    def _claim_by(self, view: OnChainJob) -> int:
        """When unclaimed tokens must be secured even in small claims: a margin before anyone
        may time the session out. The margin is a third of the window, at most TIMEOUT_MARGIN:
        a short proof interval (v1's is in seconds) must not make every moment urgent."""
        timeout = self._chain.market.timeout_after(view)
        window = max(0, timeout - view.last_proof_time)
        return timeout - min(TIMEOUT_MARGIN, window // 3)

    async def _claimable_rows(self, job_id: int) -> list[LedgerRow]:
        """The job's records, in ledger order: what claims commit to. A stream still running
        is in with the tokens its last progress record persisted (metered from the engine's
        stream as it is relayed; at most 64 tokens or a second behind), so a long stream is
        claimed while it runs and its session never goes unproven for the contract's timeout.
        Records submitted without waiting (a stream cut off by a disconnect) are flushed
        first, so a settlement that follows a disconnect sees their tokens."""
        await self._ledger.flush()
        return [(r.key, r.billable_tokens) for r in await self._ledger.records(job_id)]


def _claimed_so_far(claims: list[Claim], rows: list[LedgerRow]) -> tuple[bytes, dict[str, int]]:
    """The job's last confirmed proof's records root (genesis before the first) and, per record,
    the tokens its confirmed proofs committed: where the next claim's pieces start."""
    confirmed = [c for c in claims if c.kind is ClaimKind.PROOF and c.state is ClaimState.CONFIRMED]
    if not confirmed:
        return GENESIS, {}
    last_root = ClaimProof.from_payload(confirmed[-1].payload).records_root
    kept = [c.pieces for c in confirmed if c.pieces is not None]
    committed = committed_by_pieces(kept)
    if len(kept) < len(confirmed):
        # Claims of an older ledger kept no pieces: each covered the shortest prefix of rows
        # holding its end token. Take their records as committed that far.
        legacy_end = max(c.end_token for c in confirmed if c.pieces is None)
        total = 0
        for key, tokens in rows:
            if total >= legacy_end:
                break
            take = min(tokens, legacy_end - total)
            committed[key] = max(committed.get(key, 0), take)
            total += tokens
    return last_root, committed


def _new_claim(
    job_id: int,
    seq: int,
    kind: ClaimKind,
    first_token: int,
    tokens: int,
    payload: bytes,
    pieces: tuple[LedgerRow, ...] | None = None,
    state: ClaimState = ClaimState.PENDING,
    error: str | None = None,
) -> Claim:
    """A new outbox row: ``tokens`` from ``first_token`` on (a settlement claims none)."""
    now = _now_ms()
    return Claim(
        job_id=job_id,
        seq=seq,
        kind=kind,
        tokens=tokens,
        first_token=first_token,
        end_token=first_token + tokens,
        payload=payload,
        state=state,
        created_ms=now,
        updated_ms=now,
        error=error,
        pieces=pieces,
    )
