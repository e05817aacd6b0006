"""A transaction stuck in the pool is replaced: the same nonce and calldata at higher fees, so
at most one of them is mined, and the sender reports the one that was. Real anvil, with its
automine off while the test holds the transaction in the pool."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from eth_account import Account
from web3.exceptions import TransactionNotFound

from devtools.devnet import Devnet
from sidecar.chain.rpc import connect
from sidecar.chain.sender import ChainSender, Outcome

pytestmark = pytest.mark.integration

SINK = "0x000000000000000000000000000000000000bEEF"


@pytest.fixture
def no_automine(devnet: Devnet) -> Iterator[Devnet]:
    devnet.rpc("evm_setAutomine", [False])
    try:
        yield devnet
    finally:
        devnet.rpc("evm_setAutomine", [True])
        devnet.mine()


async def _wait(predicate, what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_stuck_transaction_is_replaced_with_the_same_nonce(no_automine: Devnet) -> None:
    devnet = no_automine
    w3 = connect(devnet.rpc_url)
    account = Account.from_key(devnet.host_key)
    sender = ChainSender(
        w3, account, devnet.chain_id, bump_after=0.3, max_bumps=2, poll_interval=0.05
    )
    sent: list[tuple[str, int]] = []

    async def on_sent(tx_hash: str, nonce: int) -> None:
        sent.append((tx_hash, nonce))

    nonce_before = devnet.w3.eth.get_transaction_count(account.address)
    try:
        sending = asyncio.create_task(sender.send(SINK, b"proof bytes", on_sent=on_sent))
        await _wait(lambda: len(sent) == 3, "two replacements")
        await asyncio.sleep(0.5)  # max_bumps reached: no fourth transaction
        assert len(sent) == 3 and sender.bumps == 2
        assert {nonce for _, nonce in sent} == {nonce_before}
        pending = devnet.rpc("txpool_content")["pending"]
        [(_, in_pool)] = next(
            txs
            for sender_address, txs in pending.items()
            if sender_address.lower() == account.address.lower()
        ).items()
        assert in_pool["hash"] == sent[-1][0]  # the pool holds the last replacement only
        devnet.mine()
        result = await asyncio.wait_for(sending, 10)
    finally:
        await w3.provider.disconnect()
    assert result.outcome is Outcome.CONFIRMED and result.tx_hash == sent[-1][0]
    assert devnet.w3.eth.get_transaction_count(account.address) == nonce_before + 1
    mined = devnet.w3.eth.get_transaction(sent[-1][0])
    assert bytes(mined["input"]) == b"proof bytes"  # the same calldata
    for stale, _ in sent[:-1]:  # the replaced ones were never mined
        with pytest.raises(TransactionNotFound):
            devnet.w3.eth.get_transaction_receipt(stale)


async def test_the_original_is_followed_when_it_is_mined_first(no_automine: Devnet) -> None:
    devnet = no_automine
    w3 = connect(devnet.rpc_url)
    account = Account.from_key(devnet.host_key)
    sender = ChainSender(w3, account, devnet.chain_id, bump_after=60, poll_interval=0.05)
    sent: list[tuple[str, int]] = []

    async def on_sent(tx_hash: str, nonce: int) -> None:
        sent.append((tx_hash, nonce))

    try:
        sending = asyncio.create_task(sender.send(SINK, b"x", on_sent=on_sent))
        await _wait(lambda: len(sent) == 1, "the transaction")
        devnet.mine()
        result = await asyncio.wait_for(sending, 10)
    finally:
        await w3.provider.disconnect()
    assert result.tx_hash == sent[0][0] and sender.bumps == 0
