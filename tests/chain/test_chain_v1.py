"""The v1 double (the seed's contract, 0x1273E...) on a real anvil: ABI, rules in order, every
revert string, exact payments, and gas that grows with every proof.

Time is driven by the chain's clock (``set_next_block_timestamp``), never by sleeping; gas is
estimated against the pending block, so a reverting call raises before anything is mined.
"""

from __future__ import annotations

import itertools
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
PRICE = 10**12  # the devnet's v1 default: 10,000 tokens for 0.01 ETH


# -- helpers ---------------------------------------------------------------------------------


def submit(
    devnet: Devnet,
    deployment: Deployment,
    job_id: int,
    tokens: int,
    proof: bytes,
    *,
    after: int | None = None,
    sender: Any = None,
    **options: Any,
) -> Any:
    """Claim ``tokens`` with ``proof``; ``after``: the block comes that many seconds after the
    session's last proof (exact, whatever the wall clock does)."""
    if after is not None:
        last = devnet.session_job(deployment, job_id)["lastProofTime"]
        devnet.set_next_block_timestamp(last + after)
    market = devnet.marketplace(deployment)
    call = market.functions.submitProofOfWork(job_id, tokens, proof)
    return devnet.transact(call, sender or devnet.host_account, **options)


def complete(
    devnet: Devnet, deployment: Deployment, job_id: int, sender: Any, cid: str = "cid"
) -> Any:
    market = devnet.marketplace(deployment)
    return devnet.transact(market.functions.completeSessionJob(job_id, cid), sender)


# -- ABI -------------------------------------------------------------------------------------


def test_abi_matches_the_public_contract() -> None:
    artifact = load_artifact("JobMarketplaceV1")
    assert artifact["methodIdentifiers"]["submitProofOfWork(uint256,uint256,bytes)"] == "c8c664ee"
    functions = set(artifact["methodIdentifiers"])
    assert {
        "createSessionJob(address,uint256,uint256,uint256)",
        "completeSessionJob(uint256,string)",
        "sessionJobs(uint256)",
        "triggerSessionTimeout(uint256)",
    } <= functions
    events = {
        item["name"]: f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
        for item in artifact["abi"]
        if item["type"] == "event"
    }
    assert events["ProofSubmitted"] == "ProofSubmitted(uint256,address,uint256,bytes32)"
    assert events["SessionJobCreated"] == "SessionJobCreated(uint256,address,address,uint256)"
    assert (
        events["SessionCompleted"] == "SessionCompleted(uint256,uint256,uint256,uint256)"
    )  # 4 fields
    getter = next(i for i in artifact["abi"] if i.get("name") == "sessionJobs")
    assert [(o["name"], o["type"]) for o in getter["outputs"]] == [
        ("id", "uint256"),
        ("requester", "address"),
        ("host", "address"),
        ("paymentToken", "address"),
        ("deposit", "uint256"),
        ("pricePerToken", "uint256"),
        ("tokensUsed", "uint256"),
        ("maxDuration", "uint256"),
        ("startTime", "uint256"),
        ("lastProofTime", "uint256"),
        ("proofInterval", "uint256"),
        ("status", "uint8"),
        ("withdrawnByHost", "uint256"),
        ("refundedToUser", "uint256"),
        ("conversationCID", "string"),
    ]


# -- creating sessions -----------------------------------------------------------------------


def test_create_session_job_records_the_session(devnet: Devnet, v1: Deployment) -> None:
    before = devnet.balance(devnet.requester.address)
    market = devnet.marketplace(v1)
    call = market.functions.createSessionJob(devnet.host_account.address, PRICE, 3600, 10)
    receipt = devnet.transact(call, devnet.requester, value=DEFAULT_DEPOSIT)
    (event,) = market.events.SessionJobCreated().process_receipt(receipt)
    job_id = event["args"]["jobId"]
    assert event["args"] == {
        "jobId": job_id,
        "requester": devnet.requester.address,
        "host": devnet.host_account.address,
        "deposit": DEFAULT_DEPOSIT,
    }
    block_time = devnet.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    job = devnet.session_job(v1, job_id)
    assert job | {"statusName": None} == {
        "id": job_id,
        "requester": devnet.requester.address,
        "host": devnet.host_account.address,
        "paymentToken": ZERO,
        "deposit": DEFAULT_DEPOSIT,
        "pricePerToken": PRICE,
        "tokensUsed": 0,
        "maxDuration": 3600,
        "startTime": block_time,
        "lastProofTime": block_time,
        "proofInterval": 10,
        "status": 0,
        "withdrawnByHost": 0,
        "refundedToUser": 0,
        "conversationCID": "",
        "statusName": None,
    }
    paid = before - devnet.balance(devnet.requester.address)
    assert paid == DEFAULT_DEPOSIT + receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert devnet.balance(v1.marketplace) == DEFAULT_DEPOSIT


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"deposit": 2 * 10**14 - 1}, "Insufficient deposit"),
        # Checks run in order: the deposit is checked before the price.
        ({"deposit": 2 * 10**14 - 1, "price_per_token": 0}, "Insufficient deposit"),
        ({"deposit": 1000 * ETHER + 1}, "Deposit too large"),
        ({"price_per_token": 0, "max_duration": 0}, "Invalid price"),
        ({"max_duration": 0}, "Invalid duration"),
        ({"max_duration": 365 * 24 * 3600 + 1}, "Invalid duration"),
        ({"proof_interval": 0, "host": ZERO}, "Invalid proof interval"),
        ({"host": ZERO, "proof_interval": 9}, "Invalid host"),
        ({"proof_interval": 9}, "Proof interval too small"),
        # 100 tokens of budget, 110 tokens per proof interval.
        (
            {"deposit": 10**15, "price_per_token": 10**13, "proof_interval": 11},
            "Deposit too small for proof interval",
        ),
    ],
)
def test_create_session_job_reverts(
    devnet: Devnet, v1: Deployment, reverts: Any, options: dict[str, Any], reason: str
) -> None:
    with reverts(reason):
        devnet.create_session_job(v1, **options)


def test_a_missing_job_reads_as_zeros_with_status_active(
    devnet: Devnet, v1: Deployment, reverts: Any, proof: Callable[..., bytes]
) -> None:
    job = devnet.session_job(v1, 999)
    assert job["host"] == ZERO and job["requester"] == ZERO and job["deposit"] == 0
    assert job["status"] == 0 and job["statusName"] == "Active"  # the quirk: check host != 0
    with reverts("Only host can submit proof"):
        submit(devnet, v1, 999, 100, proof(1))
    with reverts("Unauthorized"):
        complete(devnet, v1, 999, devnet.requester)


# -- claiming --------------------------------------------------------------------------------


def test_submit_checks_run_in_the_public_order(
    devnet: Devnet, v1: Deployment, reverts: Any, proof: Callable[..., bytes]
) -> None:
    """Each call breaks one rule and every rule after it; the first broken rule answers."""
    # 200 tokens of budget: 0.0002 ETH at 10^12 wei per token.
    job_id = devnet.create_session_job(v1, deposit=2 * 10**14)
    proof_system = devnet.proof_system(v1)

    with reverts("Only host can submit proof"):
        submit(devnet, v1, job_id, 99, proof(1), sender=devnet.stranger)
    with reverts("Only host can submit proof"):
        submit(devnet, v1, job_id, 100, proof(1), sender=devnet.requester)
    with reverts("Must claim minimum tokens"):
        submit(devnet, v1, job_id, 99, proof(1), after=100)
    # 201 tokens after 4 s: over the rate cap (80) and over the budget (200).
    with reverts("Excessive tokens claimed"):
        submit(devnet, v1, job_id, 201, proof(1), after=4)
    with reverts("Exceeds deposit"):
        submit(devnet, v1, job_id, 201, proof(1), after=20)

    submit(devnet, v1, job_id, 100, proof(1), after=5)
    # proof(1) again, now also recorded as verified: the duplicate check answers first.
    devnet.transact(proof_system.functions.recordVerifiedProof(proof(1)[:32]), devnet.stranger)
    with reverts("Proof already submitted"):
        submit(devnet, v1, job_id, 100, proof(1), after=5)
    with reverts("Invalid proof"):
        submit(devnet, v1, job_id, 100, proof(2, 63), after=5)  # under 64 bytes
    devnet.transact(proof_system.functions.recordVerifiedProof(proof(3)[:32]), devnet.stranger)
    with reverts("Invalid proof"):
        submit(devnet, v1, job_id, 100, proof(3), after=5)  # already verified elsewhere
    submit(devnet, v1, job_id, 100, proof(4), after=5)
    assert devnet.session_job(v1, job_id)["tokensUsed"] == 200

    complete(devnet, v1, job_id, devnet.requester)
    with reverts("Session not active"):
        submit(devnet, v1, job_id, 99, proof(5), sender=devnet.stranger, after=100)


def test_claims_need_a_proof_system(
    devnet: Devnet, reverts: Any, proof: Callable[..., bytes]
) -> None:
    deployment = devnet.deploy("v1", with_proof_system=False)
    job_id = devnet.create_session_job(deployment)
    with reverts("Proof system not set"):
        submit(devnet, deployment, job_id, 100, proof(1), after=5)


def test_only_the_treasury_sets_the_proof_system(
    devnet: Devnet, v1: Deployment, reverts: Any
) -> None:
    market = devnet.marketplace(v1)
    with reverts("Only treasury"):
        devnet.transact(market.functions.setProofSystem(ZERO), devnet.stranger)


@pytest.mark.parametrize("rate", [20, 50])
def test_rate_cap_is_exact_and_a_constructor_argument(
    devnet: Devnet, reverts: Any, proof: Callable[..., bytes], rate: int
) -> None:
    deployment = devnet.deploy("v1", rate_per_second=rate)
    job_id = devnet.create_session_job(deployment)
    with reverts("Excessive tokens claimed"):
        submit(devnet, deployment, job_id, 10 * rate + 1, proof(1), after=10)
    submit(devnet, deployment, job_id, 10 * rate, proof(1), after=10)
    # The cap counts from the last proof, not from the start.
    with reverts("Excessive tokens claimed"):
        submit(devnet, deployment, job_id, 5 * rate + 1, proof(2), after=5)
    submit(devnet, deployment, job_id, 5 * rate, proof(2), after=5)
    assert devnet.session_job(deployment, job_id)["tokensUsed"] == 15 * rate


def test_a_fixed_gas_limit_revert_is_mined_without_a_reason(
    devnet: Devnet, v1: Deployment, proof: Callable[..., bytes]
) -> None:
    job_id = devnet.create_session_job(v1)
    receipt = submit(devnet, v1, job_id, 201, proof(1), after=10, gas=300_000, check=False)
    assert receipt["status"] == 0
    assert devnet.revert_reason(receipt["transactionHash"]) == (
        "execution reverted: Excessive tokens claimed"
    )
    assert devnet.session_job(v1, job_id)["tokensUsed"] == 0


def test_gas_per_proof_grows_with_the_number_of_earlier_proofs(
    devnet: Devnet, proof: Callable[..., bytes]
) -> None:
    # A high cap, so that one second between proofs is enough.
    deployment = devnet.deploy("v1", rate_per_second=10**6)
    job_id = devnet.create_session_job(deployment)
    gas = [submit(devnet, deployment, job_id, 100, proof(i), after=1)["gasUsed"] for i in range(12)]
    # The first proof initializes the session's counters; after it, every earlier proof adds
    # the same scan cost (one more storage read per earlier proof).
    assert gas[1] < gas[0]
    steps = [later - earlier for earlier, later in itertools.pairwise(gas[1:])]
    assert all(2_000 <= step <= 3_500 for step in steps), steps
    assert max(steps) - min(steps) <= 100, steps

    # So a gas limit fixed from an early proof fails a few proofs later, mined with status 0.
    fixed = gas[1] + 5_000
    job_id = devnet.create_session_job(deployment)
    submit(devnet, deployment, job_id, 100, proof("first"), after=1)
    statuses = []
    for i in range(8):
        receipt = submit(
            devnet, deployment, job_id, 100, proof(f"fixed-{i}"), after=1, gas=fixed, check=False
        )
        statuses.append(receipt["status"])
        if receipt["status"] == 0:
            assert devnet.revert_reason(receipt["transactionHash"]) == "out of gas"
            break
    assert statuses[0] == 1 and statuses[-1] == 0, statuses


# -- completing ------------------------------------------------------------------------------


def test_proofs_then_completion_pay_the_host_minus_the_fee_and_refund_the_rest(
    devnet: Devnet, proof: Callable[..., bytes], reverts: Any
) -> None:
    deployment = devnet.deploy("v1", dispute_window=120)
    market = devnet.marketplace(deployment)
    earnings = devnet.earnings_contract(deployment)
    price = 1_000_000_000_003  # odd, so that the fee must be rounded
    deposit = DEFAULT_DEPOSIT
    job_id = devnet.create_session_job(deployment, deposit=deposit, price_per_token=price)
    start = devnet.session_job(deployment, job_id)["startTime"]

    claims = [(150, 8), (250, 13), (333, 17)]  # (tokens, seconds since the last proof)
    for index, (tokens, after) in enumerate(claims):
        receipt = submit(devnet, deployment, job_id, tokens, proof(index), after=after)
        (event,) = market.events.ProofSubmitted().process_receipt(receipt)
        assert event["args"] == {
            "jobId": job_id,
            "host": devnet.host_account.address,
            "tokensClaimed": tokens,  # a delta, not a running total
            "proofHash": keccak(proof(index)),
        }
        block_time = devnet.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        assert devnet.session_job(deployment, job_id)["lastProofTime"] == block_time
    tokens_used = sum(tokens for tokens, _ in claims)
    assert devnet.session_job(deployment, job_id)["tokensUsed"] == tokens_used == 733
    assert market.functions.getProofCount(job_id).call() == 3

    # The host waits the dispute window, counted from the session's start.
    devnet.set_next_block_timestamp(start + 119)
    with reverts("Must wait dispute window"):
        complete(devnet, deployment, job_id, devnet.host_account)
    requester_before = devnet.balance(devnet.requester.address)
    devnet.set_next_block_timestamp(start + 120)
    receipt = complete(devnet, deployment, job_id, devnet.host_account, cid="bafy-conversation")

    gross = tokens_used * price
    assert gross * FEE_BASIS_POINTS % 10_000 != 0  # the rounding is exercised
    fee = gross * FEE_BASIS_POINTS // 10_000  # rounded down
    net = gross - fee
    refund = deposit - gross
    (completed,) = market.events.SessionCompleted().process_receipt(receipt, errors=DISCARD)
    assert completed["args"] == {
        "jobId": job_id,
        "totalTokensUsed": tokens_used,
        "hostEarnings": net,
        "userRefund": refund,
    }
    (credited,) = earnings.events.EarningsCredited().process_receipt(receipt, errors=DISCARD)
    assert credited["args"] == {
        "host": devnet.host_account.address,
        "token": ZERO,
        "amount": net,
        "newBalance": net,
    }
    assert devnet.host_earnings(deployment) == net
    assert devnet.balance(devnet.requester.address) - requester_before == refund
    assert market.functions.accumulatedTreasuryETH().call() == fee
    assert devnet.balance(deployment.marketplace) == fee  # only the fee stays behind
    job = devnet.session_job(deployment, job_id)
    assert job["statusName"] == "Completed"
    assert job["conversationCID"] == "bafy-conversation"
    assert (job["withdrawnByHost"], job["refundedToUser"]) == (net, refund)

    # The host withdraws its earnings later.
    host_before = devnet.balance(devnet.host_account.address)
    receipt = devnet.transact(earnings.functions.withdrawAll(ZERO), devnet.host_account)
    paid_gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert devnet.balance(devnet.host_account.address) - host_before == net - paid_gas
    assert devnet.host_earnings(deployment) == 0


def test_the_requester_may_complete_at_once_and_no_one_else_may_complete(
    devnet: Devnet, v1: Deployment, reverts: Any, proof: Callable[..., bytes]
) -> None:
    market = devnet.marketplace(v1)
    job_id = devnet.create_session_job(v1)
    with reverts("Unauthorized"):
        complete(devnet, v1, job_id, devnet.stranger)
    with reverts("Must wait dispute window"):
        complete(devnet, v1, job_id, devnet.host_account)
    before = devnet.balance(devnet.requester.address)
    receipt = complete(devnet, v1, job_id, devnet.requester)
    (completed,) = market.events.SessionCompleted().process_receipt(receipt)
    assert completed["args"] == {
        "jobId": job_id,
        "totalTokensUsed": 0,
        "hostEarnings": 0,
        "userRefund": DEFAULT_DEPOSIT,
    }
    paid_gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert devnet.balance(devnet.requester.address) - before == DEFAULT_DEPOSIT - paid_gas
    assert devnet.host_earnings(v1) == 0
    with reverts("Session not active"):
        complete(devnet, v1, job_id, devnet.requester)
    with reverts("Session not active"):
        submit(devnet, v1, job_id, 100, proof(1), after=10)


def test_a_session_times_out_after_three_silent_proof_intervals(
    devnet: Devnet, v1: Deployment, reverts: Any, proof: Callable[..., bytes]
) -> None:
    market = devnet.marketplace(v1)
    job_id = devnet.create_session_job(v1, proof_interval=10)  # silent for 30 s at most
    submit(devnet, v1, job_id, 100, proof(1), after=5)
    last = devnet.session_job(v1, job_id)["lastProofTime"]

    devnet.set_next_block_timestamp(last + 30)
    with reverts("Session not timed out"):
        devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    devnet.set_next_block_timestamp(last + 31)
    receipt = devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)

    gross = 100 * PRICE
    net = gross - gross * FEE_BASIS_POINTS // 10_000
    # It settles like a completion: SessionCompleted first, then SessionTimedOut.
    topics = [log["topics"][0] for log in receipt["logs"] if log["address"] == market.address]
    assert topics == [
        keccak(text="SessionCompleted(uint256,uint256,uint256,uint256)"),
        keccak(text="SessionTimedOut(uint256,uint256,uint256)"),
    ]
    (timed_out,) = market.events.SessionTimedOut().process_receipt(receipt, errors=DISCARD)
    assert timed_out["args"] == {
        "jobId": job_id,
        "hostEarnings": net,
        "userRefund": DEFAULT_DEPOSIT - gross,
    }
    assert devnet.session_job(v1, job_id)["statusName"] == "TimedOut"
    assert devnet.host_earnings(v1) == net
    with reverts("Session not active"):
        devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    with reverts("Session not active"):
        submit(devnet, v1, job_id, 100, proof(2), after=100)


def test_a_session_times_out_after_its_maximum_duration(
    devnet: Devnet, v1: Deployment, reverts: Any
) -> None:
    market = devnet.marketplace(v1)
    # A proof interval of 1000 s: only the maximum duration (60 s) can end it early.
    job_id = devnet.create_session_job(v1, max_duration=60, proof_interval=1000)
    start = devnet.session_job(v1, job_id)["startTime"]
    devnet.set_next_block_timestamp(start + 60)
    with reverts("Session not timed out"):
        devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    devnet.set_next_block_timestamp(start + 61)
    devnet.transact(market.functions.triggerSessionTimeout(job_id), devnet.stranger)
    assert devnet.session_job(v1, job_id)["statusName"] == "TimedOut"


# -- payments that cannot be made ------------------------------------------------------------


def test_a_refund_the_requester_refuses_reverts_the_completion(
    devnet: Devnet, v1: Deployment, reverts: Any
) -> None:
    market = devnet.marketplace(v1)
    rejecting = devnet.deploy_contract("RejectingForwarder")
    create = market.encode_abi(
        "createSessionJob", args=[devnet.host_account.address, PRICE, 3600, 10]
    )
    receipt = devnet.transact(
        rejecting.functions.forward(v1.marketplace, create), devnet.stranger, value=DEFAULT_DEPOSIT
    )
    (created,) = market.events.SessionJobCreated().process_receipt(receipt, errors=DISCARD)
    job_id = created["args"]["jobId"]
    assert created["args"]["requester"] == rejecting.address
    with reverts("ETH refund failed"):
        devnet.transact(
            rejecting.functions.forward(
                v1.marketplace, market.encode_abi("completeSessionJob", args=[job_id, "cid"])
            ),
            devnet.stranger,
        )


def test_a_payment_host_earnings_refuses_reverts_the_completion(
    devnet: Devnet, reverts: Any, proof: Callable[..., bytes]
) -> None:
    # A marketplace whose "HostEarnings" is a contract that refuses ETH.
    rejecting = devnet.deploy_contract("RejectingForwarder")
    market = devnet.deploy_contract("JobMarketplaceV1", rejecting.address, 20, 30)
    proofs = devnet.deploy_contract("ProofSystemV1")
    devnet.transact(market.functions.setProofSystem(proofs.address), devnet.deployer)
    deployment = Deployment(
        version="v1",
        chain_id=devnet.chain_id,
        marketplace=market.address,
        host_earnings=rejecting.address,
        proof_system=proofs.address,
        rate_per_second=20,
        dispute_window=30,
        fee_basis_points=FEE_BASIS_POINTS,
        block_number=devnet.w3.eth.block_number,
    )
    job_id = devnet.create_session_job(deployment)
    submit(devnet, deployment, job_id, 100, proof(1), after=5)
    with reverts("ETH transfer to HostEarnings failed"):
        complete(devnet, deployment, job_id, devnet.requester)
