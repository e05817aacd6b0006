"""Reading the chain over JSON-RPC: the connection, the start-up checks, and the few reads.

Everything that asks a node something, except sending the host's transactions (``sender``):
building the :class:`~web3.AsyncWeb3`, checking that the node serves the configured chain and that
the configured address holds a JobMarketplace of the configured version, reading a job, v2's
dispute window, a job's ``ProofSubmitted`` logs, chain time, and the health figures. A
:class:`ConnectedChain` is what the start-up checks leave behind: everything the admission and
the worker need, all of it checked.

The reads and checks accept a ``Web3`` as well as an ``AsyncWeb3`` (``async`` either way): the
unit tests drive them through a synchronous fake provider. Errors of the checks are
:class:`sidecar.errors.ChainCheckError`; their messages never hold keys or RPC URLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypeVar

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils import to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3, Web3
from web3.exceptions import ContractLogicError
from web3.types import TxParams

from sidecar.chain.marketplace import (
    PROBE_SENDER,
    ContractVersion,
    Marketplace,
    OnChainJob,
    ProofSubmittedEvent,
    decode_exact,
    marketplace_for,
    revert_reason,
)
from sidecar.chain.sender import ChainSender, is_transient
from sidecar.errors import ChainCheckError

AnyWeb3: TypeAlias = "Web3 | AsyncWeb3[Any]"
T = TypeVar("T")

RPC_TIMEOUT = 10  # seconds, for each request to the node
HEALTH_TIMEOUT = 3  # seconds, for each read of /sidecar/health


@dataclass(frozen=True, slots=True)
class ConnectedChain:
    """A node and a contract that passed the start-up checks, and the host that works them.

    ``address`` is the marketplace's checksummed address; ``dispute_window`` the configured one on
    v1, the contract's own on v2."""

    w3: AsyncWeb3[AsyncHTTPProvider]
    market: Marketplace
    account: LocalAccount
    sender: ChainSender
    address: str
    chain_id: int
    dispute_window: int


# The start-up checks' failures; ``check`` names the check that failed.


class RpcUnreachableError(ChainCheckError):
    check: ClassVar[str] = "rpc"


class ChainIdMismatchError(ChainCheckError):
    check: ClassVar[str] = "chain_id"


class NoContractCodeError(ChainCheckError):
    check: ClassVar[str] = "code"


class ContractVersionMismatchError(ChainCheckError):
    check: ClassVar[str] = "contract_version"


def connect(rpc_url: str | None) -> AsyncWeb3[AsyncHTTPProvider]:
    """An ``AsyncWeb3`` for ``rpc_url``. No retries inside web3: the worker's own backoff
    retries, and a request's admission must not wait out five of them."""
    return AsyncWeb3(
        AsyncHTTPProvider(
            rpc_url,
            request_kwargs={"timeout": RPC_TIMEOUT},
            exception_retry_configuration=None,
        )
    )


async def _resolve(value: T | Awaitable[T]) -> T:
    # The same code serves Web3 (values) and AsyncWeb3 (awaitables).
    if isinstance(value, Awaitable):
        return await value
    return value


async def _eth_call(w3: AnyWeb3, address: str, data: bytes, sender: str | None = None) -> bytes:
    tx: TxParams = {"to": to_checksum_address(address), "data": HexStr("0x" + data.hex())}
    if sender is not None:
        tx["from"] = to_checksum_address(sender)
    return bytes(await _resolve(w3.eth.call(tx)))


# -- the start-up checks ------------------------------------------------------------------------


async def check_chain_id(w3: AnyWeb3, expected: int) -> int:
    try:
        actual = int(await _resolve(w3.eth.chain_id))
    except Exception as exc:
        raise RpcUnreachableError(
            f"chain check failed: the RPC endpoint does not answer eth_chainId "
            f"({type(exc).__name__})"
        ) from exc
    if actual != expected:
        raise ChainIdMismatchError(
            f"chain id check failed: the RPC endpoint serves chain id {actual}, "
            f"but the configured chain id is {expected}"
        )
    return actual


async def check_has_code(w3: AnyWeb3, address: str) -> None:
    code = bytes(await _resolve(w3.eth.get_code(to_checksum_address(address))))
    if not code:
        raise NoContractCodeError(
            f"contract code check failed: there is no contract at {to_checksum_address(address)} "
            f"on this chain (wrong address, or wrong network?)"
        )


async def check_contract_version(w3: AnyWeb3, address: str, market: Marketplace) -> None:
    """Does the contract answer this version's getters and have its functions?

    The seed's lesson: a host called a function its contract did not have. Each probe is an
    ``eth_call``; a function that exists reverts with one of its reasons on job 0 from an address
    that hosts nothing, while a missing one reverts without a reason (or a fallback accepts it).
    """
    other = marketplace_for(
        ContractVersion.V2 if market.version is ContractVersion.V1 else ContractVersion.V1
    )
    hint = f"is it a {other.version} contract? (--contract-version {other.version})"
    address = to_checksum_address(address)
    failed = f"contract version check failed: the contract at {address}"
    data: bytes | None = None
    try:
        data = await _eth_call(w3, address, market.calldata("sessionJobs", [0]))
        market.decode_job_return(0, data)
    except (ContractLogicError, ValueError, TypeError) as exc:
        fields = len(market.entry("sessionJobs")["outputs"])
        try:
            other.decode_job_return(0, data or b"")
        except ValueError:
            hint = f"nor in the {other.version} layout: is it a JobMarketplace at all?"
        raise ContractVersionMismatchError(
            f"{failed} does not answer sessionJobs(uint256) in the {market.version} layout "
            f"({fields} values); {hint}"
        ) from exc
    if market.version is ContractVersion.V2:
        try:
            decode_exact(
                ["uint256"], await _eth_call(w3, address, market.calldata("disputeWindow", []))
            )
        except (ContractLogicError, ValueError, TypeError) as exc:
            raise ContractVersionMismatchError(
                f"{failed} does not answer disputeWindow(); {hint}"
            ) from exc
    for signature, probe in market.probe_calls():
        try:
            await _eth_call(w3, address, probe, sender=PROBE_SENDER)
        except ContractLogicError as exc:
            if revert_reason(exc) is not None:
                continue  # it exists: it refused with one of its own reasons
        raise ContractVersionMismatchError(f"{failed} has no {signature}; {hint}")


async def check_marketplace(
    w3: AnyWeb3, *, chain_id: int, address: str, version: str | ContractVersion
) -> Marketplace:
    """The start-up checks in order (chain id, code, version); the adapter when all pass."""
    market = marketplace_for(version)
    await check_chain_id(w3, chain_id)
    await check_has_code(w3, address)
    await check_contract_version(w3, address, market)
    return market


# -- reads --------------------------------------------------------------------------------------


async def read_job(w3: AnyWeb3, address: str, market: Marketplace, job_id: int) -> OnChainJob:
    data = await _eth_call(w3, address, market.calldata("sessionJobs", [job_id]))
    return market.decode_job_return(job_id, data)


async def read_dispute_window(w3: AnyWeb3, address: str, market: Marketplace) -> int | None:
    """v2's ``disputeWindow()``; None on v1, whose window is configured (it is not readable on
    every v1 deployment)."""
    if market.version is not ContractVersion.V2:
        return None
    (window,) = decode_exact(
        ["uint256"], await _eth_call(w3, address, market.calldata("disputeWindow", []))
    )
    return int(window)


async def proof_submitted_events(
    w3: AnyWeb3,
    address: str,
    market: Marketplace,
    job_id: int,
    host: str | None,
    from_block: int = 0,
) -> list[ProofSubmittedEvent]:
    """This job's ``ProofSubmitted`` logs, e.g. to confirm a claim after "already submitted"."""
    flt = market.proof_submitted_filter(address, job_id, host, from_block)
    logs = await _resolve(w3.eth.get_logs(flt))
    events = (market.decode_proof_submitted(log) for log in logs)
    return [event for event in events if event is not None]


async def chain_now(w3: AsyncWeb3[Any]) -> int:
    """The timestamp the next block will have, as well as the node knows it: the contract
    measures the rate cap and the dispute window with it. The pending block's (the same
    block gas is estimated against); the latest block's where a node has no pending block.
    On a quiet chain the latest block can be far behind, and a claim would wait for a block
    nobody mines."""
    latest = int((await w3.eth.get_block("latest"))["timestamp"])
    try:
        pending = int((await w3.eth.get_block("pending"))["timestamp"])
    except Exception as exc:
        if is_transient(exc):
            raise
        return latest
    return max(latest, pending)


async def read_block_and_balance(w3: AsyncWeb3[Any], address: ChecksumAddress) -> tuple[int, int]:
    """The latest block number and ``address``'s balance in wei, each read within
    HEALTH_TIMEOUT: /sidecar/health must answer even when the node does not."""
    block = await asyncio.wait_for(w3.eth.get_block_number(), timeout=HEALTH_TIMEOUT)
    balance = await asyncio.wait_for(w3.eth.get_balance(address), HEALTH_TIMEOUT)
    return int(block), int(balance)
