"""The v2 double (the latest public contract, proxy 0xD067719E...) on a real anvil: ABI, rules in
the public order, every short revert string, PRICE_PRECISION payments, a dispute window counted
from the last proof, and replay protection across sessions.

Time is driven by the chain's clock (``set_next_block_timestamp``), never by sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_utils import keccak
from web3.logs import DISCARD

from devtools.devchain import (
    DEFAULT_DEPOSIT,
    ETHER,
    FEE_BASIS_POINTS,
    Deployment,
    anvil_available,
    load_artifact,
)
from devtools.devnet import Devnet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not anvil_available(), reason="devchain not installed: run `npm ci` in devchain/"
    ),
]

ZERO = "0x" + "00" * 20
PRICE = 10**15  # the devnet's v2 default: 10,000 tokens for 0.01 ETH (price per 1000 tokens)
PRICE_PRECISION = 1000
DAY = 24 * 3600


# -- helpers ---------------------------------------------------------------------------------


def submit(
    devnet: Devnet,
    deployment: Deployment,
    job_id: int,
    tokens: int,
    proof_hash: bytes,
    *,
    after: int | None = None,
    sender: Any = None,
    proof_cid: str = "proof-cid",
    delta_cid: str = "delta-cid",
    **options: Any,
) -> Any:
    """Claim ``tokens``; ``after``: the block comes that many seconds after the last proof."""
    if after is not None:
        last = devnet.session_job(deployment, job_id)["lastProofTime"]
        devnet.set_next_block_timestamp(last + after)
    market = devnet.marketplace(deployment)
    call = market.functions.submitProofOfWork(job_id, tokens, proof_hash, proof_cid, delta_cid)
    return devnet.transact(call, sender or devnet.host_account, **options)


def complete(
    devnet: Devnet, deployment: Deployment, job_id: int, sender: Any, cid: str = "cid"
) -> Any:
    market = devnet.marketplace(deployment)
    return devnet.transact(market.functions.completeSessionJob(job_id, cid), sender)


def deploy_with_earnings(devnet: Devnet, earnings_address: str) -> Deployment:
    """A wired v2 marketplace whose HostEarnings is ``earnings_address`` (any contract)."""
    market = devnet.deploy_contract(
        "JobMarketplaceV2", earnings_address, FEE_BASIS_POINTS, 30, 2000
    )
    proofs = devnet.deploy_contract("ProofSystemV2")
    devnet.transact(proofs.functions.setAuthorizedCaller(market.address, True), devnet.deployer)
    devnet.transact(market.functions.setProofSystem(proofs.address), devnet.deployer)
    model = keccak(text="sidecar-tiny")
    devnet.transact(market.functions.setModelApproved(model, True), devnet.deployer)
    return Deployment(
        version="v2",
        chain_id=devnet.chain_id,
        marketplace=market.address,
        host_earnings=earnings_address,
        proof_system=proofs.address,
        rate_per_second=2000,
        dispute_window=30,
        fee_basis_points=FEE_BASIS_POINTS,
        block_number=devnet.w3.eth.block_number,
        model_id="0x" + model.hex(),
    )


# -- ABI -------------------------------------------------------------------------------------


def test_abi_matches_the_public_contract() -> None:
    artifact = load_artifact("JobMarketplaceV2")
    identifiers = artifact["methodIdentifiers"]
    assert identifiers["submitProofOfWork(uint256,uint256,bytes32,string,string)"] == "7c5cb561"
    assert {
        "createSessionJobForModel(address,bytes32,uint256,uint256,uint256,uint256)",
        "completeSessionJob(uint256,string)",
        "sessionJobs(uint256)",
        "disputeWindow()",
        "triggerSessionTimeout(uint256)",
        "getProofSubmission(uint256,uint256)",
        "PRICE_PRECISION()",
    } <= set(identifiers)
    events = {
        item["name"]: f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
        for item in artifact["abi"]
        if item["type"] == "event"
    }
    assert events["ProofSubmitted"] == (
        "ProofSubmitted(uint256,address,uint256,bytes32,string,string)"
    )
    assert events["SessionJobCreated"] == "SessionJobCreated(uint256,address,address,uint256)"
    assert events["SessionCompleted"] == "SessionCompleted(uint256,uint256,uint256,uint256)"
    getter = next(i for i in artifact["abi"] if i.get("name") == "sessionJobs")
    # The public v2 getter: depositor instead of requester, plus proofTimeoutWindow and the
    # last proof's hash and CID.
    assert [(o["name"], o["type"]) for o in getter["outputs"]] == [
        ("id", "uint256"),
        ("depositor", "address"),
        ("host", "address"),
        ("paymentToken", "address"),
        ("deposit", "uint256"),
        ("pricePerToken", "uint256"),
        ("tokensUsed", "uint256"),
        ("maxDuration", "uint256"),
        ("startTime", "uint256"),
        ("lastProofTime", "uint256"),
        ("proofInterval", "uint256"),
        ("proofTimeoutWindow", "uint256"),
        ("status", "uint8"),
        ("withdrawnByHost", "uint256"),
        ("refundedToUser", "uint256"),
        ("conversationCID", "string"),
        ("lastProofHash", "bytes32"),
        ("lastProofCID", "string"),
    ]


# -- deploying and administering -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fee", "window", "zero_earnings", "reason"),
    [
        (250, 30, True, "Zero addr"),
        (10_001, 30, False, "Bad fee"),
        (250, 0, False, "Bad window"),
        (250, 7 * DAY + 1, False, "Bad window"),
    ],
)
def test_constructor_reverts(
    devnet: Devnet, reverts: Any, fee: int, window: int, zero_earnings: bool, reason: str
) -> None:
    earnings = ZERO if zero_earnings else devnet.deploy_contract("HostEarnings").address
    with reverts(reason):
        devnet.deploy_contract("JobMarketplaceV2", earnings, fee, window, 2000)


def test_dispute_window_and_fee_are_readable_on_chain(devnet: Devnet) -> None:
    deployment = devnet.deploy("v2", dispute_window=45, fee_basis_points=1000)
    market = devnet.marketplace(deployment)
    assert market.functions.disputeWindow().call() == 45
    assert market.functions.feeBasisPoints().call() == 1000
    assert market.functions.PRICE_PRECISION().call() == PRICE_PRECISION


def test_admin_functions_are_for_the_admin(devnet: Devnet, v2: Deployment, reverts: Any) -> None:
    market = devnet.marketplace(v2)
    for call in (
        market.functions.setProofSystem(v2.proof_system),
        market.functions.setModelApproved(keccak(text="m"), True),
        market.functions.setHostActive(devnet.host_account.address, False),
    ):
        with reverts("Not admin"):
            devnet.transact(call, devnet.stranger)
    with reverts("Zero addr"):
        devnet.transact(market.functions.setProofSystem(ZERO), devnet.deployer)


# -- creating sessions -----------------------------------------------------------------------


def test_create_session_job_for_model_records_the_session(devnet: Devnet, v2: Deployment) -> None:
    market = devnet.marketplace(v2)
    model = bytes.fromhex(v2.model_id[2:])  # type: ignore[index]
    call = market.functions.createSessionJobForModel(
        devnet.host_account.address, model, PRICE, 3600, 100, 300
    )
    receipt = devnet.transact(call, devnet.requester, value=DEFAULT_DEPOSIT)
    (created,) = market.events.SessionJobCreated().process_receipt(receipt, errors=DISCARD)
    (for_model,) = market.events.SessionJobCreatedForModel().process_receipt(
        receipt, errors=DISCARD
    )
    job_id = created["args"]["jobId"]
    assert created["args"] == {
        "jobId": job_id,
        "depositor": devnet.requester.address,
        "host": devnet.host_account.address,
        "deposit": DEFAULT_DEPOSIT,
    }
    assert for_model["args"]["modelId"] == model
    block_time = devnet.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    job = devnet.session_job(v2, job_id)
    assert job | {"statusName": None} == {
        "id": job_id,
        "depositor": devnet.requester.address,
        "host": devnet.host_account.address,
        "paymentToken": ZERO,
        "deposit": DEFAULT_DEPOSIT,
        "pricePerToken": PRICE,
        "tokensUsed": 0,
        "maxDuration": 3600,
        "startTime": block_time,
        "lastProofTime": block_time,
        "proofInterval": 100,
        "proofTimeoutWindow": 300,
        "status": 0,
        "withdrawnByHost": 0,
        "refundedToUser": 0,
        "conversationCID": "",
        "lastProofHash": b"\0" * 32,
        "lastProofCID": "",
        "statusName": None,
    }
    assert market.functions.sessionModel(job_id).call() == model


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"deposit": 10**14 - 1}, "Low deposit"),
        ({"deposit": 10**14 - 1, "price_per_token": 0}, "Low deposit"),
        ({"price_per_token": 0, "max_duration": 0}, "Bad price"),
        ({"max_duration": 0, "proof_interval": 0}, "Bad dur"),
        ({"max_duration": 365 * DAY + 1}, "Bad dur"),
        ({"proof_interval": 0, "proof_timeout_window": 0}, "Bad interval"),
        ({"proof_timeout_window": 59, "host": ZERO}, "Bad timeout"),
        ({"proof_timeout_window": 3601}, "Bad timeout"),
        ({"host": ZERO, "deposit": 1000 * ETHER + 1}, "No host"),
        ({"deposit": 1000 * ETHER + 1, "proof_interval": 99}, "Over max"),
        ({"proof_interval": 99}, "Low interval"),
        # 100 tokens of budget (0.0001 ETH at 10^15 per 1000 tokens), 101 per proof interval.
        ({"deposit": 10**14, "proof_interval": 101}, "Low deposit"),
        ({"model_id": keccak(text="not approved")}, "Bad model"),
    ],
)
def test_create_session_job_for_model_reverts(
    devnet: Devnet, v2: Deployment, reverts: Any, options: dict[str, Any], reason: str
) -> None:
    with reverts(reason):
        devnet.create_session_job(v2, **options)


def test_an_inactive_host_gets_no_sessions_and_cannot_claim(
    devnet: Devnet, v2: Deployment, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    market = devnet.marketplace(v2)
    job_id = devnet.create_session_job(v2)
    devnet.transact(
        market.functions.setHostActive(devnet.host_account.address, False), devnet.deployer
    )
    assert market.functions.isActiveNode(devnet.host_account.address).call() is False
    with reverts("Host not active"):
        devnet.create_session_job(v2)
    with reverts("Host not active"):
        submit(devnet, v2, job_id, 100, proof_hash(1), after=10)
    devnet.transact(
        market.functions.setHostActive(devnet.host_account.address, True), devnet.deployer
    )
    submit(devnet, v2, job_id, 100, proof_hash(1), after=10)


# -- claiming --------------------------------------------------------------------------------


def test_submit_checks_run_in_the_public_order(
    devnet: Devnet, v2: Deployment, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    """Each call breaks one rule and every rule after it; the first broken rule answers."""
    other_job = devnet.create_session_job(v2)
    submit(devnet, v2, other_job, 100, proof_hash("used"), after=1)
    # 300 tokens of budget, a proof interval of 200 tokens.
    job_id = devnet.create_session_job(v2, deposit=3 * 10**14, proof_interval=200)

    with reverts("Not host"):
        submit(devnet, v2, job_id, 99, proof_hash(1), sender=devnet.stranger)
    with reverts("Not host"):
        submit(devnet, v2, job_id, 200, proof_hash(1), sender=devnet.requester, after=1)
    with reverts("Min tokens"):
        submit(devnet, v2, job_id, 99, proof_hash("used"), after=0)
    # The first proof must cover a proof interval (200), whatever else is wrong with it.
    with reverts("Low first"):
        submit(devnet, v2, job_id, 199, proof_hash("used"), after=0)
    # 301 tokens in the same second as the session's start: over the cap and over the budget.
    with reverts("Too many"):
        submit(devnet, v2, job_id, 301, proof_hash("used"), after=0)
    with reverts("Over dep"):
        submit(devnet, v2, job_id, 301, proof_hash("used"), after=1)
    # The hash was used by another session: replay is refused across sessions.
    with reverts("Proof already used"):
        submit(devnet, v2, job_id, 200, proof_hash("used"), after=1)
    submit(devnet, v2, job_id, 200, proof_hash(2), after=1)
    # After the first proof, any claim of at least 100 tokens is fine.
    submit(devnet, v2, job_id, 100, proof_hash(3), after=1)
    assert devnet.session_job(v2, job_id)["tokensUsed"] == 300

    complete(devnet, v2, job_id, devnet.requester)
    with reverts("Not active"):
        submit(devnet, v2, job_id, 99, proof_hash(4), sender=devnet.stranger, after=10)


def test_claims_need_a_proof_system_first_of_all(
    devnet: Devnet, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    deployment = devnet.deploy("v2", with_proof_system=False)
    job_id = devnet.create_session_job(deployment)
    with reverts("No proof sys"):
        submit(devnet, deployment, job_id, 100, proof_hash(1), after=1)
    # Even before the session and the sender are looked at (a missing job, a stranger).
    with reverts("No proof sys"):
        submit(devnet, deployment, 999, 1, proof_hash(1), sender=devnet.stranger)


def test_an_unauthorized_marketplace_is_refused_by_the_proof_system(
    devnet: Devnet, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    deployment = devnet.deploy("v2", authorize_proof_system=False)
    job_id = devnet.create_session_job(deployment)
    with reverts("Unauthorized"):
        submit(devnet, deployment, job_id, 100, proof_hash(1), after=1)


def test_a_missing_job_reads_as_zeros_with_status_active(
    devnet: Devnet, v2: Deployment, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    job = devnet.session_job(v2, 999)
    assert job["host"] == ZERO and job["deposit"] == 0 and job["statusName"] == "Active"
    with reverts("Not host"):
        submit(devnet, v2, 999, 100, proof_hash(1))
    with reverts("Not depositor or host"):
        complete(devnet, v2, 999, devnet.requester)


@pytest.mark.parametrize("rate", [2000, 500])
def test_rate_cap_is_exact_and_a_constructor_argument(
    devnet: Devnet, reverts: Any, proof_hash: Callable[[Any], bytes], rate: int
) -> None:
    deployment = devnet.deploy("v2", rate_per_second=rate)
    job_id = devnet.create_session_job(deployment)
    with reverts("Too many"):
        submit(devnet, deployment, job_id, 2 * rate + 1, proof_hash(f"{rate}-1"), after=2)
    submit(devnet, deployment, job_id, 2 * rate, proof_hash(f"{rate}-1"), after=2)
    with reverts("Too many"):
        submit(devnet, deployment, job_id, rate + 1, proof_hash(f"{rate}-2"), after=1)
    submit(devnet, deployment, job_id, rate, proof_hash(f"{rate}-2"), after=1)
    assert devnet.session_job(deployment, job_id)["tokensUsed"] == 3 * rate


def test_proof_submissions_are_recorded_with_their_cids(
    devnet: Devnet, v2: Deployment, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    market = devnet.marketplace(v2)
    job_id = devnet.create_session_job(v2)
    receipt = submit(
        devnet, v2, job_id, 150, proof_hash(1), after=1, proof_cid="bafy-p", delta_cid="bafy-d"
    )
    (event,) = market.events.ProofSubmitted().process_receipt(receipt, errors=DISCARD)
    assert event["args"] == {
        "jobId": job_id,
        "host": devnet.host_account.address,
        "tokensClaimed": 150,
        "proofHash": proof_hash(1),
        "proofCID": "bafy-p",
        "deltaCID": "bafy-d",
    }
    block_time = devnet.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    job = devnet.session_job(v2, job_id)
    assert (job["lastProofHash"], job["lastProofCID"]) == (proof_hash(1), "bafy-p")
    assert job["lastProofTime"] == block_time
    assert market.functions.getProofSubmission(job_id, 0).call() == [
        proof_hash(1),
        150,
        block_time,
        True,
        "bafy-d",
    ]
    with reverts("Bad index"):
        market.functions.getProofSubmission(job_id, 1).call()


def test_gas_per_proof_does_not_grow(devnet: Devnet, proof_hash: Callable[[Any], bytes]) -> None:
    deployment = devnet.deploy("v2")
    job_id = devnet.create_session_job(deployment)
    gas = [
        submit(devnet, deployment, job_id, 100, proof_hash(f"gas-{i}"), after=1)["gasUsed"]
        for i in range(8)
    ]
    # No scan of earlier proofs in v2: the replay guard is one mapping lookup.
    assert max(gas[1:]) - min(gas[1:]) <= 100, gas


# -- completing ------------------------------------------------------------------------------


def test_proofs_then_completion_pay_with_price_precision(
    devnet: Devnet, proof_hash: Callable[[Any], bytes], reverts: Any
) -> None:
    deployment = devnet.deploy("v2", dispute_window=60)
    market = devnet.marketplace(deployment)
    earnings = devnet.earnings_contract(deployment)
    price = 1_000_000_000_007  # per 1000 tokens; odd, so both divisions must round
    deposit = DEFAULT_DEPOSIT
    job_id = devnet.create_session_job(deployment, deposit=deposit, price_per_token=price)
    submit(devnet, deployment, job_id, 150, proof_hash("pay-1"), after=1)
    submit(devnet, deployment, job_id, 1234, proof_hash("pay-2"), after=1)
    tokens_used = 1384
    last = devnet.session_job(deployment, job_id)["lastProofTime"]

    # The host waits the dispute window counted from the LAST PROOF, not from the start.
    devnet.set_next_block_timestamp(last + 59)
    with reverts("Dispute wait"):
        complete(devnet, deployment, job_id, devnet.host_account)
    requester_before = devnet.balance(devnet.requester.address)
    devnet.set_next_block_timestamp(last + 60)
    receipt = complete(devnet, deployment, job_id, devnet.host_account, cid="bafy-conv")

    assert tokens_used * price % PRICE_PRECISION != 0  # the rounding is exercised
    gross = tokens_used * price // PRICE_PRECISION
    assert gross * FEE_BASIS_POINTS % 10_000 != 0
    fee = gross * FEE_BASIS_POINTS // 10_000
    net = gross - fee
    refund = deposit - gross
    (completed,) = market.events.SessionCompleted().process_receipt(receipt, errors=DISCARD)
    assert completed["args"] == {
        "jobId": job_id,
        "totalTokensUsed": tokens_used,
        "hostEarnings": net,
        "userRefund": refund,
    }
    (by,) = market.events.SessionCompletedBy().process_receipt(receipt, errors=DISCARD)
    assert by["args"] == {
        "jobId": job_id,
        "completedBy": devnet.host_account.address,
        "tokensUsed": tokens_used,
        "paymentAmount": gross,
        "refundAmount": refund,
    }
    (credited,) = earnings.events.EarningsCredited().process_receipt(receipt, errors=DISCARD)
    assert credited["args"]["amount"] == net
    assert devnet.host_earnings(deployment) == net
    assert devnet.balance(devnet.requester.address) - requester_before == refund
    assert market.functions.accumulatedTreasuryNative().call() == fee
    assert devnet.balance(deployment.marketplace) == fee
    job = devnet.session_job(deployment, job_id)
    assert job["statusName"] == "Completed" and job["conversationCID"] == "bafy-conv"
    assert (job["withdrawnByHost"], job["refundedToUser"]) == (net, refund)


def test_the_fee_is_a_constructor_argument(
    devnet: Devnet, proof_hash: Callable[[Any], bytes]
) -> None:
    deployment = devnet.deploy("v2", fee_basis_points=1000)
    job_id = devnet.create_session_job(deployment)
    submit(devnet, deployment, job_id, 500, proof_hash("fee"), after=1)
    complete(devnet, deployment, job_id, devnet.requester)
    gross = 500 * PRICE // PRICE_PRECISION
    assert devnet.host_earnings(deployment) == gross - gross * 1000 // 10_000


def test_the_depositor_may_complete_at_once_and_no_one_else_may_complete(
    devnet: Devnet, v2: Deployment, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    job_id = devnet.create_session_job(v2)
    submit(devnet, v2, job_id, 100, proof_hash("at-once"), after=1)
    with reverts("Not depositor or host"):
        complete(devnet, v2, job_id, devnet.stranger)
    with reverts("Dispute wait"):
        complete(devnet, v2, job_id, devnet.host_account)
    complete(devnet, v2, job_id, devnet.requester)
    assert devnet.session_job(v2, job_id)["statusName"] == "Completed"
    with reverts("Not active"):
        complete(devnet, v2, job_id, devnet.requester)


def test_a_session_times_out_after_its_proof_timeout_window(
    devnet: Devnet, v2: Deployment, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    market = devnet.marketplace(v2)
    job_id = devnet.create_session_job(v2, proof_timeout_window=60)
    submit(devnet, v2, job_id, 100, proof_hash("timeout"), after=1)
    last = devnet.session_job(v2, job_id)["lastProofTime"]
    devnet.set_next_block_timestamp(last + 60)
    with reverts("Not timeout"):
        devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    devnet.set_next_block_timestamp(last + 61)
    receipt = devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    gross = 100 * PRICE // PRICE_PRECISION
    net = gross - gross * FEE_BASIS_POINTS // 10_000
    (timed_out,) = market.events.SessionTimedOut().process_receipt(receipt, errors=DISCARD)
    assert timed_out["args"] == {
        "jobId": job_id,
        "hostEarnings": net,
        "userRefund": DEFAULT_DEPOSIT - gross,
    }
    assert devnet.session_job(v2, job_id)["statusName"] == "TimedOut"
    with reverts("Not active"):
        devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)


def test_a_session_times_out_after_its_maximum_duration(
    devnet: Devnet, v2: Deployment, reverts: Any
) -> None:
    market = devnet.marketplace(v2)
    job_id = devnet.create_session_job(v2, max_duration=30, proof_timeout_window=3600)
    start = devnet.session_job(v2, job_id)["startTime"]
    devnet.set_next_block_timestamp(start + 30)
    with reverts("Not timeout"):
        devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    devnet.set_next_block_timestamp(start + 31)
    devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    assert devnet.session_job(v2, job_id)["statusName"] == "TimedOut"


# -- payments that cannot be made ------------------------------------------------------------


def test_a_refused_refund_is_credited_to_the_deposit_balance(
    devnet: Devnet, v2: Deployment
) -> None:
    market = devnet.marketplace(v2)
    rejecting = devnet.deploy_contract("RejectingForwarder")
    create = market.encode_abi(
        "createSessionJobForModel",
        args=[devnet.host_account.address, bytes.fromhex(v2.model_id[2:]), PRICE, 3600, 100, 300],  # type: ignore[index]
    )
    receipt = devnet.transact(
        rejecting.functions.forward(v2.marketplace, create), devnet.stranger, value=DEFAULT_DEPOSIT
    )
    (created,) = market.events.SessionJobCreated().process_receipt(receipt, errors=DISCARD)
    job_id = created["args"]["jobId"]
    receipt = devnet.transact(
        rejecting.functions.forward(
            v2.marketplace, market.encode_abi("completeSessionJob", args=[job_id, "cid"])
        ),
        devnet.stranger,
    )
    (credited,) = market.events.RefundCreditedToDeposit().process_receipt(receipt, errors=DISCARD)
    assert credited["args"] == {
        "jobId": job_id,
        "depositor": rejecting.address,
        "amount": DEFAULT_DEPOSIT,
        "token": ZERO,
    }
    assert market.functions.userDepositsNative(rejecting.address).call() == DEFAULT_DEPOSIT
    assert devnet.session_job(v2, job_id)["refundedToUser"] == DEFAULT_DEPOSIT


def test_a_payment_host_earnings_refuses_reverts_the_completion(
    devnet: Devnet, reverts: Any, proof_hash: Callable[[Any], bytes]
) -> None:
    rejecting = devnet.deploy_contract("RejectingForwarder")
    deployment = deploy_with_earnings(devnet, rejecting.address)
    job_id = devnet.create_session_job(deployment)
    submit(devnet, deployment, job_id, 100, proof_hash("tx-fail"), after=1)
    with reverts("Tx fail"):
        complete(devnet, deployment, job_id, devnet.requester)
