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

import logging
from dataclasses import dataclass

from eth_account import Account
from web3 import AsyncWeb3

from sidecar.chain.admission import JobAdmission
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
from sidecar.ledger import Ledger
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.chain")


@dataclass(frozen=True, slots=True)
class _Started:
    chain: ConnectedChain
    admission: JobAdmission
    worker: ClaimWorker


class ChainService:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self._started: _Started | None = None
        self._claim_listeners: list[ClaimListener] = []

    def on_claim(self, listener: ClaimListener) -> None:
        """Call ``listener`` with every claim mined or refused (the sessions tell their
        clients); called on the event loop, it must not block."""
        self._claim_listeners.append(listener)

    def _claimed(self, event: ClaimEvent) -> None:
        for listener in self._claim_listeners:
            listener(event)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the chain and the contract (refusing to start with a clear message), resume
        the outbox, start the worker."""
        chain = await self._connect()
        log.info(
            "chain: %s marketplace %s on chain %s, host %s, dispute window %ss",
            chain.market.version.value,
            chain.address,
            self.settings.chain_id,
            chain.account.address,
            chain.dispute_window,
        )
        admission = JobAdmission(chain, self.ledger)
        worker = ClaimWorker(
            chain, admission, self.ledger, self.metrics, self.settings, on_claim=self._claimed
        )
        # Started before the worker takes up the ledger's jobs, so that stop() also cleans up
        # after a failed resume.
        self._started = _Started(chain, admission, worker)
        await worker.start()

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
            sender=ChainSender(w3, account, chain_id),
            address=address,
            chain_id=chain_id,
            dispute_window=settings.dispute_window if window is None else window,
        )

    async def stop(self) -> None:
        started = self._started
        if started is None:
            return
        started.admission.stop()
        await started.worker.stop()
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
        await started.admission.request_settlement(job_id)
        started.worker.wake(job_id)

    def tokens_left(self, job_id: int, metered: int) -> int | None:
        """What the job's deposit still covers once ``metered`` tokens are counted (for the
        receipts); None when the job is not known yet."""
        started = self._started
        return None if started is None else started.admission.tokens_left(job_id, metered)

    def view(self, job_id: int) -> OnChainJob | None:
        started = self._started
        return None if started is None else started.admission.view(job_id)
