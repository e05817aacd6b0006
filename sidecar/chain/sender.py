"""The one sender of the host key's transactions: it owns the nonce.

Every transaction of the host (claims and settlements alike) goes through :meth:`ChainSender.send`,
which holds a lock from nonce lookup to receipt: two claims and a settlement can never race for a
nonce. A transaction is simulated first (``eth_estimateGas``), so a revert is learned with its
reason before any gas is spent, and its gas limit is estimated every time (the v1 contract's gas
grows with every proof of a session: a fixed limit fails after a few dozen claims). Fees are
EIP-1559: ``maxFeePerGas = 2 * baseFee + tip``.

A transaction that is not mined within ``bump_after`` seconds is replaced: the same nonce, the
same gas and calldata (so the same proof bytes), fees raised by ``BUMP_PERCENT`` (more than the
10% a node's pool asks of a replacement), at most ``max_bumps`` times. One nonce means at most
one of them is ever mined; the receipts of all of them are polled, and the result names the one
that was, so the caller's outbox follows it (after a restart, the outbox knows the last hash;
a claim mined under an earlier one is found by its ProofSubmitted log, as a resend is).

RPC faults (connection refused, timeouts, "nonce too low", "already known", "replacement
transaction underpriced") raise :class:`TransientChainError`; the caller retries later with
backoff. Nothing here retries on its own, so the caller's durable outbox stays the one record of
what was sent. The host key never reaches a log line or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import aiohttp
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from web3 import AsyncWeb3
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)
from web3.types import TxParams

from sidecar.chain.marketplace import revert_reason

log = logging.getLogger("sidecar.chain")

GAS_MARGIN_PERCENT = 25  # over the estimate: state can move between estimate and inclusion
BUMP_PERCENT = 25  # a replacement's raise of both fees (geth and anvil ask at least 10%)
_TRANSIENT_RPC_MESSAGES = (
    "nonce too low",
    "already known",
    "replacement transaction underpriced",
    "transaction underpriced",
    "known transaction",
    "header not found",
)


class TransientChainError(Exception):
    """The chain or its RPC did not answer usefully; try again later."""


class Outcome(StrEnum):
    CONFIRMED = "confirmed"  # mined with status 1
    REVERTED = "reverted"  # the contract refused (in simulation or on-chain)


@dataclass(frozen=True, slots=True)
class TxResult:
    outcome: Outcome
    tx_hash: str | None  # None: refused in simulation, nothing was sent
    revert_reason: str | None = None
    block_number: int | None = None
    logs: tuple[Any, ...] = ()


OnSent = Callable[[str, int], Awaitable[None]]


def _reason(exc: BaseException) -> str:
    """The contract's reason (Error(string), custom errors, node messages), else the error text:
    the caller classifies it either way."""
    return revert_reason(exc) or redact_urls(str(exc)) or type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    if isinstance(
        exc,
        aiohttp.ClientError
        | OSError
        | TimeoutError
        | ProviderConnectionError
        | TimeExhausted
        | TransientChainError,
    ):
        return True
    if isinstance(exc, Web3RPCError):
        text = str(exc).lower()
        return any(m in text for m in _TRANSIENT_RPC_MESSAGES)
    return False


class ChainSender:
    def __init__(
        self,
        w3: AsyncWeb3[Any],
        account: LocalAccount,
        chain_id: int,
        *,
        receipt_timeout: float = 120.0,
        poll_interval: float = 0.25,
        bump_after: float = 30.0,
        max_bumps: int = 3,
    ) -> None:
        self.w3 = w3
        self._account = account
        self.address = account.address
        self.chain_id = chain_id
        self.receipt_timeout = receipt_timeout
        self.poll_interval = poll_interval
        self.bump_after = bump_after  # seconds without a receipt before a replacement
        self.max_bumps = max_bumps  # replacements per transaction (fees x1.25 each)
        self.bumps = 0  # replacements sent, over the sender's life (for tests and logs)
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # never the key
        return f"ChainSender(host={self.address}, chain_id={self.chain_id})"

    async def send(self, to: str, data: bytes, *, on_sent: OnSent) -> TxResult:
        """Simulate, sign and send one transaction, wait for its receipt.

        ``on_sent(tx_hash, nonce)`` runs after the node accepted the transaction and before its
        receipt is awaited: the caller makes the hash durable there, so a crash while waiting
        leaves an outbox row that knows what to look up.
        """
        async with self._lock:
            try:
                return await self._send_locked(to, data, on_sent)
            except (ContractLogicError, TransientChainError):
                raise
            except Exception as exc:
                if is_transient(exc):
                    raise TransientChainError(describe(exc)) from None
                raise

    async def _send_locked(self, to: str, data: bytes, on_sent: OnSent) -> TxResult:
        call: TxParams = {"from": self.address, "to": to, "data": data}
        try:
            # Against the pending block: the rate cap is measured with the timestamp of the block
            # the claim will be mined in, and "latest" would refuse a claim it allows.
            estimate = await self.w3.eth.estimate_gas(call, "pending")
        except ContractLogicError as exc:
            return TxResult(Outcome.REVERTED, None, _reason(exc))
        nonce = await self.w3.eth.get_transaction_count(self.address, "pending")
        latest = await self.w3.eth.get_block("latest")
        base_fee = int(latest.get("baseFeePerGas", 0) or 0)
        tip = int(await self.w3.eth.max_priority_fee)
        tx: dict[str, Any] = {
            **call,
            "chainId": self.chain_id,
            "nonce": nonce,
            "gas": estimate * (100 + GAS_MARGIN_PERCENT) // 100,
            "maxPriorityFeePerGas": tip,
            "maxFeePerGas": 2 * base_fee + tip,
            "type": 2,
        }
        signed = self._account.sign_transaction(tx)
        tx_hash = "0x" + bytes(signed.hash).hex()
        try:
            await self.w3.eth.send_raw_transaction(signed.raw_transaction)
        except Web3RPCError as exc:
            if "already known" not in str(exc).lower():
                raise
            # The very same signed transaction is already in the pool: wait for it.
        await on_sent(tx_hash, nonce)
        return await self._await_receipt(tx_hash, tx, on_sent)

    async def _await_receipt(self, tx_hash: str, tx: dict[str, Any], on_sent: OnSent) -> TxResult:
        """Poll for the receipt of ``tx_hash`` or of any replacement; replace the transaction
        at a higher fee each ``bump_after`` seconds without one (``max_bumps`` times)."""
        loop = asyncio.get_running_loop()
        sent = [(tx_hash, tx)]
        give_up_at = loop.time() + self.receipt_timeout
        bump_at = loop.time() + self.bump_after
        while True:
            for sent_hash, sent_tx in reversed(sent):
                try:
                    receipt = await self.w3.eth.get_transaction_receipt(HexStr(sent_hash))
                except TransactionNotFound:
                    continue
                return await self._result(sent_hash, receipt, sent_tx)
            now = loop.time()
            if now >= give_up_at:
                raise TimeExhausted(
                    f"no receipt for {sent[-1][0]} (nonce {tx['nonce']}) in "
                    f"{self.receipt_timeout:g} s"
                )
            if now >= bump_at and len(sent) <= self.max_bumps:
                bump_at = now + self.bump_after
                replacement = await self._replace(sent[-1][1], on_sent)
                if replacement is not None:
                    sent.append(replacement)
            await asyncio.sleep(self.poll_interval)

    async def _replace(
        self, tx: dict[str, Any], on_sent: OnSent
    ) -> tuple[str, dict[str, Any]] | None:
        """Send ``tx`` again with the same nonce and calldata at higher fees; None when the
        node refused it (the nonce is used already, or the raise was not enough: the polling
        goes on either way)."""
        latest = await self.w3.eth.get_block("latest")
        base_fee = int(latest.get("baseFeePerGas", 0) or 0)
        tip = max(_bumped(tx["maxPriorityFeePerGas"]), int(await self.w3.eth.max_priority_fee))
        bumped = {
            **tx,
            "maxPriorityFeePerGas": tip,
            "maxFeePerGas": max(_bumped(tx["maxFeePerGas"]), 2 * base_fee + tip),
        }
        signed = self._account.sign_transaction(bumped)
        tx_hash = "0x" + bytes(signed.hash).hex()
        try:
            await self.w3.eth.send_raw_transaction(signed.raw_transaction)
        except Web3RPCError as exc:
            log.info("chain: replacement of nonce %s refused: %s", tx["nonce"], describe(exc))
            return None
        self.bumps += 1
        log.warning(
            "chain: transaction with nonce %s not mined in %g s; replaced at max fee %s wei (%s)",
            tx["nonce"],
            self.bump_after,
            bumped["maxFeePerGas"],
            tx_hash,
        )
        await on_sent(tx_hash, int(tx["nonce"]))
        return tx_hash, bumped

    async def lookup(self, tx_hash: str) -> TxResult | None:
        """The outcome of an earlier transaction, or None if the chain does not know it (yet)."""
        try:
            receipt = await self.w3.eth.get_transaction_receipt(HexStr(tx_hash))
        except TransactionNotFound:
            return None
        except Exception as exc:
            if is_transient(exc):
                raise TransientChainError(describe(exc)) from None
            raise
        try:
            tx = dict(await self.w3.eth.get_transaction(HexStr(tx_hash)))
        except TransactionNotFound:
            tx = {}
        return await self._result(tx_hash, receipt, tx)

    async def _result(self, tx_hash: str, receipt: Any, tx: dict[str, Any]) -> TxResult:
        block = int(receipt["blockNumber"])
        if int(receipt["status"]) == 1:
            return TxResult(Outcome.CONFIRMED, tx_hash, None, block, tuple(receipt["logs"]))
        # A mined revert carries no reason: replay the call at that block to read it.
        reason = "reverted without a reason"
        if tx:
            # The mined transaction's own fields, as the node returned them.
            replay = cast(
                TxParams,
                {
                    "from": tx.get("from", self.address),
                    "to": tx["to"],
                    "data": tx.get("data", tx.get("input")),
                },
            )
            try:
                await self.w3.eth.call(replay, block)
            except ContractLogicError as exc:
                reason = _reason(exc)
            except Exception as exc:  # the replay is best effort
                log.debug("could not replay reverted tx %s: %s", tx_hash, describe(exc))
        return TxResult(Outcome.REVERTED, tx_hash, reason, block, ())


def _bumped(fee: int) -> int:
    return int(fee) * (100 + BUMP_PERCENT) // 100 + 1


# An RPC provider's URL often carries its API key in the path or the query (or a password in
# the userinfo); aiohttp puts the URL in its errors' text. Only scheme and host are kept.
_URL = re.compile(r"""(https?|wss?)://(?:[^/@\s'"]*@)?([^/?#\s'"]+)[^\s'"]*""")


def redact_urls(text: str) -> str:
    """``text`` with every URL cut to its scheme and host: no key, password, path or query."""
    return _URL.sub(r"\1://\2/...", text)


def describe(exc: BaseException) -> str:
    """An error for a log line or an API answer: its type and text, URLs redacted."""
    text = redact_urls(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
