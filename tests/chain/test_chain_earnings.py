"""HostEarnings, the proof-system doubles and the test-only RejectingForwarder: every revert
string they have, on a real anvil. (The marketplaces' own strings are in test_chain_v1/v2.)"""

from __future__ import annotations

from typing import Any

import pytest

from devtools.devchain import Deployment, anvil_available
from devtools.devnet import Devnet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not anvil_available(), reason="devchain not installed: run `npm ci` in devchain/"
    ),
]

ZERO = "0x" + "00" * 20
OTHER_TOKEN = "0x" + "11" * 20


@pytest.fixture
def earnings(devnet: Devnet) -> Any:
    """A HostEarnings of its own, with the deployer allowed to credit (as a marketplace)."""
    contract = devnet.deploy_contract("HostEarnings")
    devnet.transact(
        contract.functions.setAuthorizedCaller(devnet.deployer.address, True), devnet.deployer
    )
    return contract


def test_only_the_owner_authorizes_callers(devnet: Devnet, earnings: Any, reverts: Any) -> None:
    with reverts("Only owner"):
        devnet.transact(
            earnings.functions.setAuthorizedCaller(devnet.stranger.address, True), devnet.stranger
        )
    with reverts("Invalid caller address"):
        devnet.transact(earnings.functions.setAuthorizedCaller(ZERO, True), devnet.deployer)


def test_crediting_rules(devnet: Devnet, earnings: Any, reverts: Any) -> None:
    host = devnet.host_account.address
    with reverts("Not authorized to credit earnings"):
        devnet.transact(earnings.functions.creditEarnings(host, 1, ZERO), devnet.stranger)
    with reverts("Invalid host address"):
        devnet.transact(earnings.functions.creditEarnings(ZERO, 1, ZERO), devnet.deployer)
    with reverts("Amount must be positive"):
        devnet.transact(earnings.functions.creditEarnings(host, 0, ZERO), devnet.deployer)
    devnet.transact(earnings.functions.creditEarnings(host, 7, ZERO), devnet.deployer)
    devnet.transact(earnings.functions.creditEarnings(host, 5, ZERO), devnet.deployer)
    assert earnings.functions.getBalance(host, ZERO).call() == 12
    assert earnings.functions.totalAccumulated(ZERO).call() == 12


def test_withdrawal_rules(devnet: Devnet, earnings: Any, reverts: Any) -> None:
    host = devnet.host_account
    with reverts("Amount must be positive"):
        devnet.transact(earnings.functions.withdraw(0, ZERO), host)
    with reverts("Insufficient earnings"):
        devnet.transact(earnings.functions.withdraw(1, ZERO), host)
    with reverts("No earnings to withdraw"):
        devnet.transact(earnings.functions.withdrawAll(ZERO), host)
    # The double holds only ETH: a balance in another token cannot be paid out.
    devnet.transact(
        earnings.functions.creditEarnings(host.address, 5, OTHER_TOKEN), devnet.deployer
    )
    with reverts("Only native token"):
        devnet.transact(earnings.functions.withdraw(1, OTHER_TOKEN), host)

    # The ETH arrives first (as from a marketplace), then it is credited; a partial withdrawal.
    devnet.w3.eth.send_transaction(
        {"from": devnet.deployer.address, "to": earnings.address, "value": 1000}
    )
    devnet.transact(earnings.functions.creditEarnings(host.address, 1000, ZERO), devnet.deployer)
    before = devnet.balance(host.address)
    receipt = devnet.transact(earnings.functions.withdraw(400, ZERO), host)
    (event,) = earnings.events.EarningsWithdrawn().process_receipt(receipt)
    assert event["args"] == {
        "host": host.address,
        "token": ZERO,
        "amount": 400,
        "remainingBalance": 600,
    }
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert devnet.balance(host.address) - before == 400 - gas
    assert earnings.functions.getBalance(host.address, ZERO).call() == 600


def test_a_host_that_refuses_eth_cannot_withdraw(
    devnet: Devnet, earnings: Any, reverts: Any
) -> None:
    rejecting = devnet.deploy_contract("RejectingForwarder")
    devnet.w3.eth.send_transaction(
        {"from": devnet.deployer.address, "to": earnings.address, "value": 5}
    )
    devnet.transact(earnings.functions.creditEarnings(rejecting.address, 5, ZERO), devnet.deployer)
    withdraw = earnings.encode_abi("withdraw", args=[5, ZERO])
    with reverts("ETH transfer failed"):
        devnet.transact(rejecting.functions.forward(earnings.address, withdraw), devnet.stranger)
    assert earnings.functions.getBalance(rejecting.address, ZERO).call() == 5


def test_the_forwarder_refuses_eth_and_relays_revert_strings(
    devnet: Devnet, v2: Deployment, reverts: Any
) -> None:
    rejecting = devnet.deploy_contract("RejectingForwarder")
    with reverts("Rejects ETH"):
        devnet.w3.eth.estimate_gas(
            {"from": devnet.stranger.address, "to": rejecting.address, "value": 1}
        )
    market = devnet.marketplace(v2)
    data = market.encode_abi("completeSessionJob", args=[999, "cid"])
    with reverts("Not depositor or host"):
        devnet.transact(rejecting.functions.forward(v2.marketplace, data), devnet.stranger)


def test_proof_system_v2_authorization(devnet: Devnet, v2: Deployment, reverts: Any) -> None:
    proofs = devnet.proof_system(v2)
    with reverts("Only owner"):
        devnet.transact(
            proofs.functions.setAuthorizedCaller(devnet.stranger.address, True), devnet.stranger
        )
    with reverts("Invalid caller"):
        devnet.transact(proofs.functions.setAuthorizedCaller(ZERO, True), devnet.deployer)
    # Only the marketplace may mark proofs used.
    with reverts("Unauthorized"):
        devnet.transact(
            proofs.functions.markProofUsed(
                b"\1" * 32, devnet.host_account.address, 100, b"\0" * 32
            ),
            devnet.host_account,
        )


def test_proof_system_v1_accepts_64_bytes_not_yet_verified(devnet: Devnet, v1: Deployment) -> None:
    proofs = devnet.proof_system(v1)
    host = devnet.host_account.address
    verify = proofs.functions.verifyEKZL
    assert verify(b"\1" * 64, host, 100).call() is True
    assert verify(b"\1" * 63, host, 100).call() is False
    assert verify(b"\1" * 64, host, 0).call() is False
    assert verify(b"\1" * 64, ZERO, 100).call() is False
    devnet.transact(proofs.functions.recordVerifiedProof(b"\1" * 32), devnet.stranger)
    assert verify(b"\1" * 64, host, 100).call() is False
    assert verify(b"\1" * 32 + b"\2" * 32, host, 100).call() is False  # first 32 bytes count
    assert verify(b"\2" * 32 + b"\1" * 32, host, 100).call() is True
