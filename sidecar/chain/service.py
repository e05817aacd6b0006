"""The chain as the rest of the sidecar sees it: one :class:`ChainService` to start, ask and stop.

:meth:`ChainService.start` checks the chain and the contract (refusing to start with a clear
message), then builds the admission (``admission``: may this job be served?) and the claim worker
(``worker``: claims and settlement through the outbox) on the one checked connection. The proxy
calls :meth:`ChainService.admit` before relaying and :meth:`ChainService.note_usage` after a
record is committed; the admin and node APIs call :meth:`ChainService.request_settlement`,
:meth:`ChainService.view` and :meth:`ChainService.health`. When the chain is down the proxy keeps
serving known jobs; claims wait in the outbox and go out when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from eth_account import Account
from web3 import AsyncWeb3

from sidecar.chain.admission import Allowance, JobAdmission
from sidecar.chain.marketplace import OnChainJob
from sidecar.chain.rpc import (
    ConnectedChain,
    check_marketplace,
    connect,
    read_block_and_balance,
    read_dispute_window,
)
from sidecar.chain.sender import ChainSender, describe
from sidecar.chain.worker import ClaimEvent, ClaimListener, ClaimWorker
from sidecar.config import Settings
from sidecar.errors import LedgerMarketplaceMismatchError
from sidecar.ledger import Ledger, MarketplaceIdentity
from sidecar.ledger.lease import SubmitterLease
from sidecar.metrics import Metrics
from sidecar.tasks import stop_task

log = logging.getLogger("sidecar.chain")


@dataclass(frozen=True, slots=True)
class _Started:
    chain: ConnectedChain
    admission: JobAdmission
    worker: ClaimWorker
    lease: SubmitterLease


class ChainService:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self._started: _Started | None = None
        self._claim_listeners: list[ClaimListener] = []
        self._leading: asyncio.Task[None] | None = None
        self.submitting = False  # holds the submitter lease: this process sends transactions

    def on_claim(self, listener: ClaimListener) -> None:
        """Call ``listener`` with every claim mined or refused (the sessions tell their
        clients); called on the event loop, it must not block."""
        self._claim_listeners.append(listener)

    def _claimed(self, event: ClaimEvent) -> None:
        for listener in self._claim_listeners:
            listener(event)

    # -- lifecycle -------------------------------------------------------------------------

    async def _bind_ledger(self, chain: ConnectedChain) -> None:
        """The ledger's job ids are this marketplace's: bind it on first use, refuse to start on
        a ledger bound to another (job 164 of one contract is not job 164 of another)."""
        assert self.settings.chain_id is not None  # checked with --rpc-url
        here = MarketplaceIdentity(
            self.settings.chain_id, chain.address, chain.market.version.value
        )
        bound = await self.ledger.bind_marketplace(here, time.time_ns() // 1_000_000)
        if bound != here:
            raise LedgerMarketplaceMismatchError(
                f"the ledger {self.ledger!r} holds the jobs of the {bound}, not of the {here}: "
                "their job ids would mix. Use a ledger of its own for each marketplace "
                "(--ledger), or point this sidecar back at the one its ledger was made for"
            )

    async def start(self) -> None:
        """Check the chain and the contract (refusing to start with a clear message), resume
        the outbox, start the worker."""
        chain = await self._connect()
        await self._bind_ledger(chain)
        log.info(
            "chain: %s marketplace %s on chain %s, host %s, dispute window %ss",
            chain.market.version.value,
            chain.address,
            self.settings.chain_id,
            chain.account.address,
            chain.dispute_window,
        )
        admission = JobAdmission(chain, self.ledger)
        lease = self.ledger.submitter_lease(
            chain.account.address, float(self.settings.submitter_takeover)
        )
        worker = ClaimWorker(
            chain,
            admission,
            self.ledger,
            self.metrics,
            self.settings,
            on_claim=self._claimed,
            lease=lease,
        )
        self._started = _Started(chain, admission, worker, lease)
        if await lease.try_acquire():
            # The usual case (one sidecar): resume the outbox before serving, as always.
            await self._become_submitter(worker)
        self._leading = asyncio.create_task(self._lead(worker, lease), name="sidecar-submitter")

    async def _become_submitter(self, worker: ClaimWorker) -> None:
        self.metrics.submitter.set(1)
        await worker.start()
        self.submitting = True
        log.info("chain: this process sends the host's transactions (the submitter lease)")

    async def _lead(self, worker: ClaimWorker, lease: SubmitterLease) -> None:
        """Hold the submitter lease, or wait for it: while held the claim worker runs; when it
        is lost (the ledger cut this process off) the worker stops, and another replica
        resumes from the outbox."""
        while True:
            try:
                if not self.submitting:
                    await lease.acquire()
                    await self._become_submitter(worker)
                while await lease.still_held():  # noqa: ASYNC110 - a check over the network
                    await asyncio.sleep(lease.poll_interval)
                log.warning("chain: the submitter lease is lost; claims stop in this process")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("chain: the submitter failed; it steps down and tries again")
                await asyncio.sleep(lease.poll_interval)
            self.submitting = False
            self.metrics.submitter.set(0)
            await worker.stop()
            await lease.release()

    async def _connect(self) -> ConnectedChain:
        settings = self.settings
        account = Account.from_key(settings.read_host_key())
        chain_id = int(settings.chain_id or 0)
        w3 = connect(settings.rpc_url)
        try:
            market = await check_marketplace(
                w3,
                chain_id=chain_id,
                address=str(settings.marketplace),
                version=settings.contract_version,
            )
            address = AsyncWeb3.to_checksum_address(str(settings.marketplace))
            window = await read_dispute_window(w3, address, market)
        except BaseException:
            await w3.provider.disconnect()  # nothing else will: the service did not start
            raise
        return ConnectedChain(
            w3=w3,
            market=market,
            account=account,
            sender=ChainSender(
                w3,
                account,
                chain_id,
                bump_after=float(settings.fee_bump_after),
                max_bumps=settings.max_fee_bumps,
                # Long enough for every bump to have its turn, and the last its own wait.
                receipt_timeout=max(
                    120.0, float(settings.fee_bump_after) * (settings.max_fee_bumps + 2)
                ),
            ),
            address=address,
            chain_id=chain_id,
            dispute_window=settings.dispute_window if window is None else window,
        )

    async def stop(self) -> None:
        started = self._started
        if started is None:
            return
        if self._leading is not None:
            await stop_task(self._leading)
            self._leading = None
        started.admission.stop()
        await started.worker.stop()
        await started.lease.release()  # a successor need not wait for a timeout
        self.submitting = False
        await started.chain.w3.provider.disconnect()

    def _require_started(self) -> _Started:
        if self._started is None:
            raise RuntimeError("the chain service is not started (ChainService.start)")
        return self._started

    async def health(self) -> dict[str, object]:
        """For /sidecar/health: does the RPC answer, and can the host key still pay for gas.

        The balance is a decimal string of wei, never a float (so it is not a Prometheus gauge)."""
        chain = self._require_started().chain
        out: dict[str, object] = {
            "contract_version": self.settings.contract_version,
            "marketplace": chain.address,
            "host": chain.account.address,
            "unfinished_claims": len(await self.ledger.unfinished_claims()),
            "submitter": self.submitting,
        }
        try:
            block, balance = await read_block_and_balance(chain.w3, chain.account.address)
        except Exception as exc:
            out.update(reachable=False, error=describe(exc))
            return out
        out.update(reachable=True, block=block, host_balance_wei=str(balance))
        return out

    # -- the proxy's side ------------------------------------------------------------------

    async def admit(self, job_id: int) -> int:
        """The tokens this job may still be served, or :class:`~sidecar.errors.JobRefused`."""
        return await self._require_started().admission.admit(job_id)

    def note_usage(self, job_id: int) -> None:
        started = self._started
        if started is None:
            return  # nothing to claim before the worker runs; it resumes from the ledger
        started.admission.note_usage(job_id)
        started.worker.wake(job_id)

    async def request_settlement(self, job_id: int) -> None:
        """Settle the job's session once its last claim is mined, or
        :class:`~sidecar.errors.JobRefused` (404) when it is not known on-chain."""
        started = self._require_started()
        # Durable first, for whichever replica sends (and for after a restart).
        await started.admission.request_settlement(job_id, time.time_ns() // 1_000_000)
        started.worker.wake(job_id)

    def tokens_left(self, job_id: int, metered: int) -> int | None:
        """What the job's deposit still covers once ``metered`` tokens are counted (for the
        receipts); None when the job is not known yet."""
        started = self._started
        return None if started is None else started.admission.tokens_left(job_id, metered)

    def allowance(self, job_id: int) -> Allowance | None:
        """What the job's deposit pays for, from the cached view (None: not seen yet)."""
        started = self._started
        return None if started is None else started.admission.allowance(job_id)

    def view(self, job_id: int) -> OnChainJob | None:
        started = self._started
        return None if started is None else started.admission.view(job_id)
