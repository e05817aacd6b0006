"""The contract adapters: ABIs, calldata, decoding, budgets, reverts and the start-up checks.

The start-up checks run against ``FakeNode``, a JSON-RPC fake that answers like anvil for the few
calls they make (named as a fake: it is not a chain). The same checks against a real anvil with
the Solidity doubles belong to the integration tests.
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi import decode, encode
from eth_account import Account
from eth_utils import event_signature_to_log_topic, function_signature_to_4byte_selector, keccak
from web3 import AsyncWeb3, Web3
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.providers.async_base import AsyncBaseProvider
from web3.providers.base import BaseProvider

from sidecar.chain.marketplace import (
    PROBE_SENDER,
    ZERO_ADDRESS,
    ContractVersion,
    Marketplace,
    OnChainJob,
    RevertKind,
    SessionStatus,
    classify_revert,
    decode_exact,
    load_abi,
    marketplace_for,
    revert_reason,
)
from sidecar.chain.proofs import ClaimSpec, build_claim_proof, records_root
from sidecar.chain.rpc import (
    ChainIdMismatchError,
    ContractVersionMismatchError,
    NoContractCodeError,
    RpcUnreachableError,
    check_marketplace,
    proof_submitted_events,
    read_dispute_window,
    read_job,
)

V1 = marketplace_for("v1")
V2 = marketplace_for("v2")
MARKET = "0x1273E6358aa52Bb5B160c34Bf2e617B745e4A944"
HOST = Account.from_key("0x" + "42" * 32)
USER = "0x00000000000000000000000000000000000000A1"
TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"

V1_JOB_FIELDS = [
    "id", "requester", "host", "paymentToken", "deposit", "pricePerToken", "tokensUsed",
    "maxDuration", "startTime", "lastProofTime", "proofInterval", "status", "withdrawnByHost",
    "refundedToUser", "conversationCID",
]  # fmt: skip
V2_JOB_FIELDS = [
    "id", "depositor", "host", "paymentToken", "deposit", "pricePerToken", "tokensUsed",
    "maxDuration", "startTime", "lastProofTime", "proofInterval", "proofTimeoutWindow", "status",
    "withdrawnByHost", "refundedToUser", "conversationCID", "lastProofHash", "lastProofCID",
]  # fmt: skip


def proof(seq: int = 1) -> Any:
    rows = [("req-a", 300)]
    spec = ClaimSpec(84532, MARKET, 164, seq, 0, 300, records_root(rows, 300))
    return build_claim_proof(spec, HOST)


def job_values(version: ContractVersion, **fields: Any) -> list[Any]:
    """sessionJobs values in ABI order: zeros, then ``fields`` by ABI name."""
    names = V1_JOB_FIELDS if version is ContractVersion.V1 else V2_JOB_FIELDS
    market = marketplace_for(version)
    values = []
    for output in market.entry("sessionJobs")["outputs"]:
        zero: Any = {"address": ZERO_ADDRESS, "string": "", "bytes32": bytes(32)}.get(
            output["type"], 0
        )
        values.append(fields.get(output["name"], zero))
    assert [o["name"] for o in market.entry("sessionJobs")["outputs"]] == names
    return values


def job_bytes(version: ContractVersion, **fields: Any) -> bytes:
    market = marketplace_for(version)
    types = [o["type"] for o in market.entry("sessionJobs")["outputs"]]
    return encode(types, job_values(version, **fields))


# -- the ABIs -----------------------------------------------------------------------------------


def test_v1_selector_is_the_public_contracts() -> None:
    assert V1.selector("submitProofOfWork").hex() == "c8c664ee"
    assert V1.selector("submitProofOfWork") == function_signature_to_4byte_selector(
        "submitProofOfWork(uint256,uint256,bytes)"
    )


def test_v2_selector_is_the_public_contracts() -> None:
    assert V2.selector("submitProofOfWork").hex() == "7c5cb561"
    assert V2.selector("submitProofOfWork") == function_signature_to_4byte_selector(
        "submitProofOfWork(uint256,uint256,bytes32,string,string)"
    )


@pytest.mark.parametrize("market", [V1, V2], ids=["v1", "v2"])
def test_settlement_takes_two_arguments(market: Marketplace) -> None:
    assert market.selector("completeSessionJob") == function_signature_to_4byte_selector(
        "completeSessionJob(uint256,string)"
    )


def test_abis_hold_what_the_sidecar_uses_and_nothing_it_does_not() -> None:
    v1 = {e["name"] for e in load_abi(ContractVersion.V1)}
    v2 = {e["name"] for e in load_abi(ContractVersion.V2)}
    common = {"submitProofOfWork", "completeSessionJob", "sessionJobs", "ProofSubmitted"}
    common |= {"SessionCompleted", "SessionJobCreated"}
    assert v1 == common | {"createSessionJob"}
    assert v2 == common | {"createSessionJobForModel", "disputeWindow"}
    # The seed's lesson: no function that the contract does not have.
    assert not {"submitCheckpoint", "ProofOfWork"} & (v1 | v2)


def test_event_shapes() -> None:
    assert V1.proof_submitted_topic == event_signature_to_log_topic(
        "ProofSubmitted(uint256,address,uint256,bytes32)"
    )
    assert V2.proof_submitted_topic == event_signature_to_log_topic(
        "ProofSubmitted(uint256,address,uint256,bytes32,string,string)"
    )
    for market in (V1, V2):
        completed = market.entry("SessionCompleted")
        assert [(p["type"], p["indexed"]) for p in completed["inputs"]] == [
            ("uint256", True),
            ("uint256", False),
            ("uint256", False),
            ("uint256", False),
        ]


def test_session_creation_entries() -> None:
    create = V1.entry("createSessionJob")
    assert [p["type"] for p in create["inputs"]] == ["address", "uint256", "uint256", "uint256"]
    assert create["stateMutability"] == "payable"
    create = V2.entry("createSessionJobForModel")
    assert [p["name"] for p in create["inputs"]] == [
        "host",
        "modelId",
        "pricePerToken",
        "maxDuration",
        "proofInterval",
        "proofTimeoutWindow",
    ]
    assert create["stateMutability"] == "payable"


def test_unknown_version() -> None:
    with pytest.raises(ValueError, match="use v1 or v2"):
        marketplace_for("v3")
    assert marketplace_for(ContractVersion.V2) is V2


# -- calls --------------------------------------------------------------------------------------


def test_v1_claim_call() -> None:
    p = proof()
    data = V1.claim_calldata(164, 300, p)
    assert data[:4].hex() == "c8c664ee"
    assert decode(["uint256", "uint256", "bytes"], data[4:]) == (164, 300, p.v1_proof)


def test_v2_claim_call() -> None:
    p = proof()
    data = V2.claim_calldata(164, 300, p)
    assert data[:4].hex() == "7c5cb561"
    decoded = decode(["uint256", "uint256", "bytes32", "string", "string"], data[4:])
    assert decoded == (164, 300, p.proof_hash, p.proof_cid, p.delta_cid)


@pytest.mark.parametrize("market", [V1, V2], ids=["v1", "v2"])
def test_web3_contract_functions_encode_the_same_bytes(market: Marketplace) -> None:
    contract = market.contract(Web3(), MARKET)
    p = proof()
    claim = market.claim_function(contract, 164, 300, p)
    assert bytes.fromhex(claim._encode_transaction_data()[2:]) == market.claim_calldata(164, 300, p)
    settle = market.settle_function(contract, 164, "sidecar-ledger:00")
    assert bytes.fromhex(settle._encode_transaction_data()[2:]) == market.settle_calldata(
        164, "sidecar-ledger:00"
    )


def test_same_claim_same_calldata() -> None:
    assert V1.claim_calldata(164, 300, proof()) == V1.claim_calldata(164, 300, proof())
    assert V1.claim_calldata(164, 300, proof(1)) != V1.claim_calldata(164, 300, proof(2))


# -- sessionJobs --------------------------------------------------------------------------------


def test_decode_v1_job() -> None:
    data = job_bytes(
        ContractVersion.V1,
        id=164,
        requester=USER,
        host=HOST.address,
        deposit=10**16,
        pricePerToken=10**12,
        tokensUsed=300,
        maxDuration=86400,
        startTime=1000,
        lastProofTime=1300,
        proofInterval=100,
        status=0,
        conversationCID="",
    )
    job = V1.decode_job_return(164, data)
    assert job == OnChainJob(
        job_id=164,
        requester=USER,
        host=HOST.address,
        payment_token=ZERO_ADDRESS,
        deposit=10**16,
        price_per_token=10**12,
        tokens_used=300,
        max_duration=86400,
        start_time=1000,
        last_proof_time=1300,
        proof_interval=100,
        status=SessionStatus.ACTIVE,
        conversation_cid="",
    )
    assert job.exists and job.is_active


def test_decode_v2_job() -> None:
    data = job_bytes(
        ContractVersion.V2,
        id=7,
        depositor=USER,
        host=HOST.address,
        paymentToken=TOKEN,
        deposit=5_000_000,
        pricePerToken=2_000,
        tokensUsed=1000,
        proofTimeoutWindow=600,
        status=2,
        conversationCID="sidecar-ledger:ab",
        lastProofHash=b"\x01" * 32,
        lastProofCID="x",
    )
    job = V2.decode_job_return(7, data)
    assert job.requester == USER  # the depositor: it may complete at once, it gets the refund
    assert job.payment_token == TOKEN
    assert job.status is SessionStatus.TIMED_OUT
    assert job.proof_timeout_window == 600
    assert job.conversation_cid == "sidecar-ledger:ab"
    assert job.exists and not job.is_active


@pytest.mark.parametrize("market", [V1, V2], ids=["v1", "v2"])
def test_a_job_never_created_reads_as_active_zeros_and_does_not_exist(market: Marketplace) -> None:
    job = market.decode_job_return(999, job_bytes(market.version))
    assert job.status is SessionStatus.ACTIVE
    assert not job.exists and not job.is_active
    assert market.budget_tokens(job) == 0


def test_a_layout_of_the_other_version_is_refused() -> None:
    # v2 data read with v1 types decodes leniently (extra words ignored); a strict decode must not.
    # Job 0 of a v2 contract, all zeros, would otherwise pass for a v1 job.
    with pytest.raises(ValueError, match="v1 layout"):
        V1.decode_job_return(0, job_bytes(ContractVersion.V2))
    with pytest.raises(ValueError, match="v2 layout"):
        V2.decode_job_return(0, job_bytes(ContractVersion.V1))
    with pytest.raises(ValueError, match="v1 layout"):
        V1.decode_job_return(0, job_bytes(ContractVersion.V1) + bytes(32))


def test_decode_job_refuses_wrong_counts_and_statuses() -> None:
    with pytest.raises(ValueError, match="15"):
        V1.decode_job(1, job_values(ContractVersion.V1)[:-1])
    with pytest.raises(ValueError, match="unknown session status 9"):
        V1.decode_job(1, job_values(ContractVersion.V1, status=9))


def test_decode_exact() -> None:
    assert decode_exact(["uint256"], (30).to_bytes(32)) == (30,)
    for bad in (b"", (30).to_bytes(32) + b"\x00", b"\x00" * 31):
        with pytest.raises(ValueError):
            decode_exact(["uint256"], bad)


# -- budget, cap and windows --------------------------------------------------------------------


def v1_job(**fields: Any) -> OnChainJob:
    base = {"host": HOST.address, "startTime": 1000, "lastProofTime": 1000} | fields
    return V1.decode_job(1, job_values(ContractVersion.V1, **base))


def v2_job(**fields: Any) -> OnChainJob:
    base = {"host": HOST.address, "startTime": 1000, "lastProofTime": 1000} | fields
    return V2.decode_job(1, job_values(ContractVersion.V2, **base))


def test_v1_budget() -> None:
    job = v1_job(deposit=10**16 + 5, pricePerToken=10**12, tokensUsed=300)
    assert V1.max_tokens(job) == 10_000
    assert V1.budget_tokens(job) == 9_700
    assert V1.budget_tokens(v1_job(deposit=10, pricePerToken=1, tokensUsed=11)) == 0


def test_v2_budget_uses_the_price_precision() -> None:
    # payment = tokens * price / 1000: 5 USDC (6 decimals) at 2000/1000 units a token.
    job = v2_job(deposit=5_000_000, pricePerToken=2_000, tokensUsed=1000)
    assert V2.max_tokens(job) == 2_500_000
    assert V2.budget_tokens(job) == 2_499_000
    assert V2.max_tokens(v2_job(deposit=999, pricePerToken=1_000)) == 999


def test_host_payment() -> None:
    assert V1.host_payment(v1_job(pricePerToken=10**12, tokensUsed=300)) == 3 * 10**14
    assert V2.host_payment(v2_job(pricePerToken=2_000, tokensUsed=1000)) == 2_000
    # v2 bills at least proofInterval tokens once a proof was made.
    assert V2.host_payment(v2_job(pricePerToken=2_000, tokensUsed=100, proofInterval=500)) == 1_000
    assert V2.host_payment(v2_job(pricePerToken=2_000, tokensUsed=0, proofInterval=500)) == 0


def test_rate_caps_and_their_defaults() -> None:
    assert V1.rate_cap(v1_job(lastProofTime=1000), now=1010) == 200  # 10 tokens/s, times 2
    assert V2.rate_cap(v2_job(lastProofTime=1000), now=1010) == 20_000
    assert V2.rate_cap(v2_job(lastProofTime=1000), now=1010, rate=500) == 5_000
    assert V1.rate_cap(v1_job(lastProofTime=1000), now=990) == 0


def test_dispute_windows() -> None:
    # v1 counts from the session's start, v2 from its last proof.
    assert V1.settle_not_before(v1_job(startTime=1000, lastProofTime=5000), 3600) == 4600
    assert V2.settle_not_before(v2_job(startTime=1000, lastProofTime=5000), 30) == 5030


def test_first_claim_minimum() -> None:
    assert V1.min_first_claim(v1_job(proofInterval=50)) == 0
    assert V2.min_first_claim(v2_job(proofInterval=1000)) == 1000
    assert V2.min_first_claim(v2_job(proofInterval=1000, tokensUsed=1000)) == 0


def test_timeouts() -> None:
    job = v1_job(startTime=1000, maxDuration=86400, lastProofTime=2000, proofInterval=10)
    assert V1.timeout_after(job) == 2030
    job = v2_job(startTime=1000, maxDuration=100, lastProofTime=1050, proofTimeoutWindow=600)
    assert V2.timeout_after(job) == 1100
    assert V2.timeout_after(v2_job(startTime=0, maxDuration=10**6, lastProofTime=50)) == 350


# -- ProofSubmitted -----------------------------------------------------------------------------


def proof_log(market: Marketplace, job_id: int, host: str, tokens: int, proof_hash: bytes) -> dict:
    data_values: list[Any] = [tokens, proof_hash]
    data_types = ["uint256", "bytes32"]
    if market.version is ContractVersion.V2:
        data_values += ["sidecar-proof:aa", "sidecar-records:bb"]
        data_types += ["string", "string"]
    return {
        "address": MARKET,
        "topics": [
            market.proof_submitted_topic,
            job_id.to_bytes(32, "big"),
            bytes(12) + bytes.fromhex(host[2:]),
        ],
        "data": encode(data_types, data_values),
        "transactionHash": b"\xab" * 32,
        "blockNumber": 12,
        "logIndex": 0,
    }


@pytest.mark.parametrize("market", [V1, V2], ids=["v1", "v2"])
def test_decode_proof_submitted(market: Marketplace) -> None:
    p = proof()
    log = proof_log(market, 164, HOST.address, 300, market.event_proof_hash(p))
    event = market.decode_proof_submitted(log)
    assert event is not None
    assert (event.job_id, event.host, event.tokens_claimed) == (164, HOST.address, 300)
    assert event.tx_hash == "0x" + "ab" * 32 and event.block_number == 12
    if market.version is ContractVersion.V2:
        assert (event.proof_cid, event.delta_cid) == ("sidecar-proof:aa", "sidecar-records:bb")
    else:
        assert event.proof_cid is None
    assert market.find_proof([log], p) == event
    assert market.find_proof([log], proof(2)) is None


def test_proof_hash_in_the_event() -> None:
    p = proof()
    assert V1.event_proof_hash(p) == keccak(p.v1_proof)  # v1 hashes the proof bytes
    assert V2.event_proof_hash(p) == p.commitment  # v2 logs the proofHash it was given


def test_logs_of_the_other_version_or_other_events_are_skipped() -> None:
    v1_log = proof_log(V1, 164, HOST.address, 300, b"\x01" * 32)
    assert V2.decode_proof_submitted(v1_log) is None
    other = dict(v1_log, topics=[keccak(text="SessionCompleted(uint256,uint256,uint256,uint256)")])
    assert V1.decode_proof_submitted(other) is None


def test_logs_as_hex_strings() -> None:
    log = proof_log(V1, 5, HOST.address, 100, b"\x02" * 32)
    as_json = {
        **log,
        "topics": ["0x" + t.hex() for t in log["topics"]],
        "data": "0x" + log["data"].hex(),
        "transactionHash": "0x" + "cd" * 32,
    }
    event = V1.decode_proof_submitted(as_json)
    assert event is not None and event.job_id == 5 and event.proof_hash == b"\x02" * 32


def test_proof_submitted_filter() -> None:
    flt = V1.proof_submitted_filter(MARKET.lower(), 164, HOST.address, from_block=7)
    assert flt["address"] == MARKET
    assert flt["fromBlock"] == 7
    assert flt["topics"] == [
        "0x" + V1.proof_submitted_topic.hex(),
        "0x" + (164).to_bytes(32).hex(),
        "0x" + "00" * 12 + HOST.address[2:].lower(),
    ]
    assert len(V2.proof_submitted_filter(MARKET, 164)["topics"]) == 2


# -- reverts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("Session not active", RevertKind.STOP_JOB),
        ("Only host can submit proof", RevertKind.CONFIG_ERROR),
        ("Must claim minimum tokens", RevertKind.BELOW_MINIMUM),
        ("Excessive tokens claimed", RevertKind.WAIT),
        ("Exceeds deposit", RevertKind.EXCEEDS_DEPOSIT),
        ("Proof already submitted", RevertKind.ALREADY_SUBMITTED),
        ("Proof system not set", RevertKind.CONFIG_ERROR),
        ("Invalid proof", RevertKind.CONFIG_ERROR),
        ("Unauthorized", RevertKind.CONFIG_ERROR),
        ("Must wait dispute window", RevertKind.WAIT),
        ("No proof sys", RevertKind.CONFIG_ERROR),
        ("Not active", RevertKind.STOP_JOB),
        ("Not host", RevertKind.CONFIG_ERROR),
        ("Host not active", RevertKind.CONFIG_ERROR),
        ("Min tokens", RevertKind.BELOW_MINIMUM),
        ("Low first", RevertKind.BELOW_MINIMUM),
        ("Too many", RevertKind.WAIT),
        ("Over dep", RevertKind.EXCEEDS_DEPOSIT),
        ("Proof already used", RevertKind.ALREADY_SUBMITTED),
        ("Not depositor or host", RevertKind.CONFIG_ERROR),
        ("Dispute wait", RevertKind.WAIT),
        ("0xd93c0665", RevertKind.WAIT),  # EnforcedPause(): v2 paused
        ("Pausable: paused", RevertKind.WAIT),
        ("something else", RevertKind.UNKNOWN),
        ("", RevertKind.UNKNOWN),
        (None, RevertKind.UNKNOWN),
    ],
)
def test_classify(reason: str | None, kind: RevertKind) -> None:
    assert classify_revert(reason) is kind
    assert V1.classify_revert(reason) is kind


def test_classify_finds_a_reason_inside_a_longer_message() -> None:
    message = "VM Exception while processing transaction: revert Host not active"
    assert classify_revert(message) is RevertKind.CONFIG_ERROR  # not "Not active"
    assert classify_revert("Error: Excessive tokens claimed (tx 0x12)") is RevertKind.WAIT


def error_data(reason: str) -> str:
    return "0x08c379a0" + encode(["string"], [reason]).hex()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ContractLogicError("execution reverted: X", data=error_data("Too many")), "Too many"),
        (ContractLogicError("execution reverted: Not host", data=None), "Not host"),
        (ContractLogicError("execution reverted", data="0x"), None),
        (ContractLogicError("execution reverted", data=None), None),
        (ContractLogicError("reverted", data={"data": error_data("Min tokens")}), "Min tokens"),
        (ContractCustomError("0xd93c0665", data="0xd93c0665"), "0xd93c0665"),
        ("execution reverted: Excessive tokens claimed", "Excessive tokens claimed"),
        ("Error: reverted with reason string 'Exceeds deposit'", "Exceeds deposit"),
        ("nonce too low", None),
    ],
)  # fmt: skip
def test_revert_reason(error: BaseException | str, reason: str | None) -> None:
    assert revert_reason(error) == reason


# -- talking to a node: the start-up checks, against a JSON-RPC fake ----------------------------


class FakeNode:
    """Answers eth_chainId, eth_getCode, eth_call and eth_getLogs the way anvil does, for a
    contract that implements ``implements`` (a version's sessionJobs layout and functions)."""

    def __init__(
        self,
        chain_id: int = 84532,
        code: bytes = b"\x60\x80",
        implements: ContractVersion | None = ContractVersion.V1,
        fallback: bool = False,
        logs: list[dict] | None = None,
        down: bool = False,
    ) -> None:
        self.chain_id = chain_id
        self.code = code
        self.implements = implements
        self.fallback = fallback
        self.logs = logs or []
        self.down = down
        self.calls: list[tuple[str, Any]] = []

    def answer(self, method: str, params: Any) -> dict[str, Any]:
        self.calls.append((method, params))
        if self.down:
            raise ConnectionError("refused: https://base-sepolia.example/v2/SECRET-API-KEY")
        if method == "eth_chainId":
            return {"result": hex(self.chain_id)}
        if method == "eth_getCode":
            return {"result": "0x" + self.code.hex()}
        if method == "eth_getLogs":
            return {"result": self.logs}
        if method == "eth_call":
            return self.call(params[0])
        raise NotImplementedError(method)

    def call(self, tx: dict[str, Any]) -> dict[str, Any]:
        data = bytes.fromhex(tx["data"][2:])
        selector, args = data[:4], data[4:]
        market = None if self.implements is None else marketplace_for(self.implements)
        if market is not None and selector == market.selector("sessionJobs"):
            (job_id,) = decode(["uint256"], args)
            fields = {"id": job_id} if job_id == 777 else {}
            if job_id == 777:
                fields |= {"host": HOST.address, "deposit": 10**16, "pricePerToken": 10**12}
            return {"result": "0x" + job_bytes(market.version, **fields).hex()}
        if market is V2 and selector == V2.selector("disputeWindow"):
            return {"result": "0x" + (30).to_bytes(32).hex()}
        if market is not None and selector == market.selector("submitProofOfWork"):
            sender = tx.get("from", ZERO_ADDRESS)
            assert sender.lower() == PROBE_SENDER.lower()
            return self.revert("Only host can submit proof" if market is V1 else "Not host")
        if market is not None and selector == market.selector("completeSessionJob"):
            return self.revert("Unauthorized" if market is V1 else "Not depositor or host")
        if self.fallback:
            return {"result": "0x"}
        return {"error": {"code": 3, "message": "execution reverted", "data": "0x"}}

    @staticmethod
    def revert(reason: str) -> dict[str, Any]:
        message = f"execution reverted: {reason}"
        return {"error": {"code": 3, "message": message, "data": error_data(reason)}}


class FakeProvider(BaseProvider):
    def __init__(self, node: FakeNode) -> None:
        super().__init__()
        self.node = node

    def make_request(self, method: Any, params: Any) -> Any:
        return {"jsonrpc": "2.0", "id": 1, **self.node.answer(method, params)}


class AsyncFakeProvider(AsyncBaseProvider):
    def __init__(self, node: FakeNode) -> None:
        super().__init__()
        self.node = node

    async def make_request(self, method: Any, params: Any) -> Any:
        return {"jsonrpc": "2.0", "id": 1, **self.node.answer(method, params)}


def web3_for(node: FakeNode) -> Web3:
    return Web3(FakeProvider(node))


@pytest.mark.parametrize("version", list(ContractVersion))
async def test_checks_pass_for_the_right_contract(version: ContractVersion) -> None:
    node = FakeNode(implements=version)
    w3 = web3_for(node)
    market = await check_marketplace(w3, chain_id=84532, address=MARKET, version=version)
    assert market is marketplace_for(version)
    # In order: chain id, code, then the version's getters and functions.
    assert [m for m, _ in node.calls[:2]] == ["eth_chainId", "eth_getCode"]


async def test_checks_work_with_async_web3() -> None:
    w3 = AsyncWeb3(AsyncFakeProvider(FakeNode(implements=ContractVersion.V2)))
    market = await check_marketplace(w3, chain_id=84532, address=MARKET, version="v2")
    assert market is V2
    assert await read_dispute_window(w3, MARKET, V2) == 30


async def test_rpc_down() -> None:
    w3 = web3_for(FakeNode(down=True))
    with pytest.raises(RpcUnreachableError, match="does not answer eth_chainId") as info:
        await check_marketplace(w3, chain_id=84532, address=MARKET, version="v1")
    assert info.value.check == "rpc"
    assert "SECRET-API-KEY" not in str(info.value)  # an RPC URL may carry a key


async def test_wrong_chain_id() -> None:
    w3 = web3_for(FakeNode(chain_id=8453))
    with pytest.raises(ChainIdMismatchError, match=r"serves chain id 8453.*configured.*84532"):
        await check_marketplace(w3, chain_id=84532, address=MARKET, version="v1")


async def test_no_code_at_the_address() -> None:
    w3 = web3_for(FakeNode(code=b""))
    with pytest.raises(NoContractCodeError, match=f"no contract at {MARKET}") as info:
        await check_marketplace(w3, chain_id=84532, address=MARKET.lower(), version="v1")
    assert info.value.check == "code"


@pytest.mark.parametrize(
    ("configured", "actual", "says"),
    [
        ("v1", ContractVersion.V2, r"sessionJobs.*v1 layout.*is it a v2 contract\?"),
        ("v2", ContractVersion.V1, r"sessionJobs.*v2 layout.*is it a v1 contract\?"),
        ("v1", None, r"v1 layout.*nor in the v2 layout: is it a JobMarketplace at all\?"),
    ],
)
async def test_wrong_contract_version(
    configured: str, actual: ContractVersion | None, says: str
) -> None:
    w3 = web3_for(FakeNode(implements=actual))
    with pytest.raises(ContractVersionMismatchError, match=says) as info:
        await check_marketplace(w3, chain_id=84532, address=MARKET, version=configured)
    assert info.value.check == "contract_version"


class HalfV2Node(FakeNode):
    """v1's sessionJobs layout, but not v1's submitProofOfWork: the seed's exact mistake."""

    def call(self, tx: dict[str, Any]) -> dict[str, Any]:
        if bytes.fromhex(tx["data"][2:10]) == V1.selector("submitProofOfWork"):
            if self.fallback:
                return {"result": "0x"}
            return {"error": {"code": 3, "message": "execution reverted", "data": "0x"}}
        return super().call(tx)


@pytest.mark.parametrize("fallback", [False, True], ids=["no-fallback", "fallback"])
async def test_a_missing_function_is_found(fallback: bool) -> None:
    w3 = web3_for(HalfV2Node(implements=ContractVersion.V1, fallback=fallback))
    with pytest.raises(
        ContractVersionMismatchError, match=r"no submitProofOfWork\(uint256,uint256,bytes\)"
    ):
        await check_marketplace(w3, chain_id=84532, address=MARKET, version="v1")


async def test_v2_needs_dispute_window() -> None:
    class NoWindow(FakeNode):
        def call(self, tx: dict[str, Any]) -> dict[str, Any]:
            if bytes.fromhex(tx["data"][2:10]) == V2.selector("disputeWindow"):
                return {"error": {"code": 3, "message": "execution reverted", "data": "0x"}}
            return super().call(tx)

    w3 = web3_for(NoWindow(implements=ContractVersion.V2))
    with pytest.raises(
        ContractVersionMismatchError, match=r"does not answer disputeWindow\(\); is it a v1"
    ):
        await check_marketplace(w3, chain_id=84532, address=MARKET, version="v2")


async def test_read_job_and_window() -> None:
    w3 = web3_for(FakeNode(implements=ContractVersion.V1))
    job = await read_job(w3, MARKET, V1, 777)
    assert job.exists and job.host == HOST.address and V1.budget_tokens(job) == 10_000
    assert not (await read_job(w3, MARKET, V1, 5)).exists
    assert await read_dispute_window(w3, MARKET, V1) is None


async def test_proof_submitted_events_from_the_node() -> None:
    p = proof()
    log = proof_log(V1, 164, HOST.address, 300, V1.event_proof_hash(p))
    rpc_log = {
        "address": MARKET.lower(),
        "topics": ["0x" + t.hex() for t in log["topics"]],
        "data": "0x" + log["data"].hex(),
        "transactionHash": "0x" + "ab" * 32,
        "blockNumber": "0xc",
        "logIndex": "0x0",
        "blockHash": "0x" + "11" * 32,
        "transactionIndex": "0x0",
        "removed": False,
    }
    node = FakeNode(logs=[rpc_log])
    events = await proof_submitted_events(web3_for(node), MARKET, V1, 164, HOST.address)
    assert len(events) == 1 and events[0].block_number == 12
    assert events[0].proof_hash == keccak(p.v1_proof)
    method, params = node.calls[-1]
    assert method == "eth_getLogs"
    assert params[0]["topics"][0] == "0x" + V1.proof_submitted_topic.hex()
