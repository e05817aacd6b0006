"""The JobMarketplace contract, one adapter per public version, behind one small interface.

What was verified, and where (all in the public repository Fabstir/fabstir-compute-contracts):

v1 = ``src/JobMarketplaceWithModels.sol`` at commit 0544d5dc5c2c0baccb439a7de71dc574742b9565, the
single-chain version deployed at 0x1273E6358aa52Bb5B160c34Bf2e617B745e4A944 on Base Sepolia (the
repository's deployment notes date it Jan 13, 2025: "Single chain only"):
- ``submitProofOfWork(uint256 jobId, uint256 tokensClaimed, bytes proof)`` (selector 0xc8c664ee),
  its checks and revert strings in order: "Session not active", "Only host can submit proof",
  "Must claim minimum tokens" (MIN_PROVEN_TOKENS = 100), "Excessive tokens claimed"
  (``tokensClaimed <= (now - lastProofTime) * 10 * 2``), "Exceeds deposit"
  (``tokensUsed + tokensClaimed <= deposit / pricePerToken``), "Proof already submitted"
  (keccak256(proof) against every earlier proof of the session), "Proof system not set",
  "Invalid proof". ``ProofSubmitted.proofHash`` is keccak256 of the proof bytes.
- ``completeSessionJob(uint256 jobId, string conversationCID)``: "Session not active",
  "Unauthorized", and for the host "Must wait dispute window" (``startTime + DISPUTE_WINDOW``,
  a 1 h constant at that commit, a constructor argument in later versions).
- ``sessionJobs(uint256)``: the struct's public getter, which leaves out its ``proofs`` array:
  15 values, id .. conversationCID, as in ``client-abis/JobMarketplaceWithModels-CLIENT-ABI.json``
  minus the ``depositor`` field that later versions inserted (commit de6abcc4).
- ``SessionStatus { Active, Completed, TimedOut, Disputed, Abandoned, Cancelled }``; events
  ``ProofSubmitted(uint256 indexed, address indexed, uint256, bytes32)``,
  ``SessionCompleted(uint256 indexed, uint256, uint256, uint256)``,
  ``SessionJobCreated(uint256 indexed, address indexed, address indexed, uint256)``.
- ``src/ProofSystem.sol``: ``verifyEKZL`` accepts a proof of at least 64 bytes whose first 32
  bytes are not already recorded. Its later ECDSA version (``ProofSystemUpgradeable.sol``) wants
  97 bytes, hash || r || s || v, signed over keccak(hash, prover, tokens): proofs.py makes both.

v2 = ``src/JobMarketplaceWithModelsUpgradeable.sol``, the post-audit version (Feb 2026) behind
the proxy 0xD067719Ee4c514B5735d1aC0FfB46FECf2A9adA4 (the repository's deployment notes and
``client-abis/CHANGELOG.md``: "Fresh proxy", "Error string shortened: 'Only host can submit
proof' -> 'Not host'"):
- ``submitProofOfWork(uint256 jobId, uint256 tokensClaimed, bytes32 proofHash, string proofCID,
  string deltaCID)`` (selector 0x7c5cb561), whenNotPaused, checks in order: "No proof sys",
  "Not active", "Not host", "Host not active" (node registry), "Min tokens" (100), "Low first"
  (the first proof must cover ``proofInterval`` tokens), "Too many" (``(now - lastProofTime) *
  ModelRegistry.getModelRateLimit(model)``, 2000 tokens/s by default), "Over dep"
  (``tokensUsed + tokensClaimed <= deposit * 1000 / pricePerToken``, PRICE_PRECISION = 1000),
  "Proof already used" (the ProofSystem rejects a proofHash seen in any session).
- ``ProofSubmitted`` has two more fields than v1's: ``(uint256 indexed jobId, address indexed
  host, uint256 tokensClaimed, bytes32 proofHash, string proofCID, string deltaCID)`` - another
  topic, so v1's event filter finds nothing on v2.
- ``completeSessionJob(uint256, string)``: "Not active", "Not depositor or host", and for the
  host "Dispute wait": ``lastProofTime + disputeWindow`` (from the *last proof*, not the start);
  ``disputeWindow()`` is a public storage variable (30 s by default). Payment
  ``tokensUsed * price / 1000``, at least ``proofInterval`` tokens once any proof was made.
- ``sessionJobs(uint256)``: 18 values: id, depositor, host, paymentToken, deposit,
  pricePerToken, tokensUsed, maxDuration, startTime, lastProofTime, proofInterval,
  proofTimeoutWindow, status, withdrawnByHost, refundedToUser, conversationCID, lastProofHash,
  lastProofCID. ``SessionStatus { Active, Completed, TimedOut }``. Timeout after
  ``lastProofTime + proofTimeoutWindow`` (300 s when 0) or ``startTime + maxDuration``.
- ``createSessionJobForModel(address host, bytes32 modelId, uint256 pricePerToken,
  uint256 maxDuration, uint256 proofInterval, uint256 proofTimeoutWindow)`` payable.
- Pausing reverts with OpenZeppelin 5's custom error ``EnforcedPause()``.

Earlier intermediate v2 deployments used the long strings; the revert table knows both.

Everything here is pure (encoding, decoding, budgets, windows, revert classes): what talks to a
node is in ``rpc``, what sends transactions in ``sender``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar, cast

from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError
from eth_typing import HexStr
from eth_utils import (
    event_abi_to_log_topic,
    function_abi_to_4byte_selector,
    keccak,
    to_checksum_address,
)

from sidecar.chain import policy
from sidecar.chain.proofs import ClaimProof

if TYPE_CHECKING:  # web3 itself is not needed to encode and decode
    from eth_typing import ABIEvent, ABIFunction
    from web3 import Web3
    from web3.contract import Contract
    from web3.contract.contract import ContractFunction
    from web3.types import FilterParams

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
V2_PRICE_PRECISION = 1000
V2_DEFAULT_PROOF_TIMEOUT = 300

# Who the start-up probes call from: an address that is host of nothing, so the probed function
# reaches its own revert ("Only host ..."/"Not host") instead of doing anything.
PROBE_SENDER = "0x000000000000000000000000000000000000dEaD"

AbiEntry = dict[str, Any]


class ContractVersion(StrEnum):
    V1 = "v1"
    V2 = "v2"


class SessionStatus(IntEnum):
    # v2 keeps the first three with the same numbers.
    ACTIVE = 0
    COMPLETED = 1
    TIMED_OUT = 2
    DISPUTED = 3
    ABANDONED = 4
    CANCELLED = 5


class RevertKind(StrEnum):
    WAIT = "wait"  # the rate cap, the dispute window, a paused contract: try again later
    STOP_JOB = "stop_job"  # the session is over: stop claiming for this job
    CONFIG_ERROR = "config_error"  # wrong key, host not registered...: an operator must act
    ALREADY_SUBMITTED = "already_submitted"  # this exact proof is on-chain: confirm from logs
    BELOW_MINIMUM = "below_minimum"  # under the minimum claim (a policy bug)
    EXCEEDS_DEPOSIT = "exceeds_deposit"  # beyond the deposit (a stale budget)
    UNKNOWN = "unknown"


_REVERTS: dict[str, RevertKind] = {
    # v1 submitProofOfWork, in the contract's order
    "Session not active": RevertKind.STOP_JOB,
    "Only host can submit proof": RevertKind.CONFIG_ERROR,
    "Must claim minimum tokens": RevertKind.BELOW_MINIMUM,
    "Excessive tokens claimed": RevertKind.WAIT,
    "Exceeds deposit": RevertKind.EXCEEDS_DEPOSIT,
    "Proof already submitted": RevertKind.ALREADY_SUBMITTED,
    "Proof system not set": RevertKind.CONFIG_ERROR,
    "Invalid proof": RevertKind.CONFIG_ERROR,  # our proof format and the ProofSystem disagree
    # v1 completeSessionJob
    "Unauthorized": RevertKind.CONFIG_ERROR,
    "Must wait dispute window": RevertKind.WAIT,
    # v2 submitProofOfWork, in the contract's order
    "No proof sys": RevertKind.CONFIG_ERROR,
    "Not active": RevertKind.STOP_JOB,
    "Not host": RevertKind.CONFIG_ERROR,
    "Host not active": RevertKind.CONFIG_ERROR,
    "Min tokens": RevertKind.BELOW_MINIMUM,
    "Low first": RevertKind.BELOW_MINIMUM,
    "Too many": RevertKind.WAIT,
    "Over dep": RevertKind.EXCEEDS_DEPOSIT,
    "Proof already used": RevertKind.ALREADY_SUBMITTED,
    # v2 completeSessionJob
    "Not depositor or host": RevertKind.CONFIG_ERROR,
    "Dispute wait": RevertKind.WAIT,
    # intermediate v2 deployments (before the strings were shortened)
    "Only depositor or host can complete": RevertKind.CONFIG_ERROR,
    "Invalid proof signature": RevertKind.CONFIG_ERROR,
    # pausing: OpenZeppelin 4's string, 5's custom error (by selector)
    "Pausable: paused": RevertKind.WAIT,
    "0x" + keccak(text="EnforcedPause()")[:4].hex(): RevertKind.WAIT,
}
# Longest first, so a reason found inside a longer message matches its most specific entry.
_REVERTS_BY_LENGTH = sorted(_REVERTS, key=len, reverse=True)

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_REASON_PATTERNS = (
    re.compile(r"reverted with reason string '(.*)'", re.S),  # hardhat
    re.compile(r"execution reverted: (.*)", re.S),  # geth, anvil, web3.py
    re.compile(r"revert(?:ed)? (.*)", re.S),  # ganache and others
)


def classify_revert(reason: str | None) -> RevertKind:
    """The sender's reaction to a revert reason (as given by :func:`revert_reason`)."""
    if not reason:
        return RevertKind.UNKNOWN
    kind = _REVERTS.get(reason.strip())
    if kind is not None:
        return kind
    for known in _REVERTS_BY_LENGTH:
        if known in reason:
            return _REVERTS[known]
    return RevertKind.UNKNOWN


def _hex_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    text = value[2:] if value[:2] in ("0x", "0X") else value
    return bytes.fromhex(text)


def _reason_from_data(data: object) -> str | None:
    if isinstance(data, Mapping):  # some nodes nest it: {"message": ..., "data": "0x..."}
        data = data.get("data")
    if not isinstance(data, str | bytes):
        return None
    try:
        raw = _hex_bytes(data)
    except ValueError:
        return None
    if raw[:4] == _ERROR_STRING_SELECTOR:
        try:
            (reason,) = decode(["string"], raw[4:])
        except Exception:  # malformed revert data: fall back to the message
            return None
        return str(reason)
    if len(raw) >= 4:
        return "0x" + raw[:4].hex()  # a custom error: its selector
    return None


def revert_reason(error: BaseException | str) -> str | None:
    """The revert reason in an error or message from web3 (or a node), None if it has none."""
    if isinstance(error, BaseException):
        reason = _reason_from_data(getattr(error, "data", None))
        if reason is not None:
            return reason
        message = getattr(error, "message", None) or (str(error.args[0]) if error.args else "")
    else:
        message = error
    for pattern in _REASON_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1).strip() or None
    return None


# -- values read from the contract --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OnChainJob:
    """A decoded ``sessionJobs(id)``. ``requester`` is v2's ``depositor`` (it gets the refund)."""

    job_id: int
    requester: str
    host: str
    payment_token: str
    deposit: int
    price_per_token: int
    tokens_used: int
    max_duration: int
    start_time: int
    last_proof_time: int
    proof_interval: int
    status: SessionStatus
    conversation_cid: str
    proof_timeout_window: int = 0  # v2 only

    @property
    def exists(self) -> bool:
        # A job id never created reads as zeros, and status 0 is Active: only host tells.
        return self.host != ZERO_ADDRESS

    @property
    def is_active(self) -> bool:
        return self.exists and self.status is SessionStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class ProofSubmittedEvent:
    job_id: int
    host: str
    tokens_claimed: int
    proof_hash: bytes
    proof_cid: str | None  # v2 only
    delta_cid: str | None  # v2 only
    tx_hash: str | None
    block_number: int | None
    log_index: int | None


# -- the adapters -------------------------------------------------------------------------------


@cache
def load_abi(version: ContractVersion) -> tuple[AbiEntry, ...]:
    text = resources.files("sidecar.chain").joinpath("abi", f"{version.value}.json").read_text()
    return tuple(json.loads(text))


def decode_exact(types: list[str], data: bytes) -> tuple[Any, ...]:
    """ABI-decode ``data`` as ``types``, refusing anything but their canonical encoding."""
    try:
        values = decode(types, bytes(data))
    except DecodingError as exc:
        raise ValueError(f"not an encoding of ({','.join(types)}): {exc}") from None
    if encode(types, list(values)) != bytes(data):
        raise ValueError(f"not the canonical encoding of ({','.join(types)})")
    return tuple(values)


def _topic_value(value: str | bytes) -> bytes:
    raw = _hex_bytes(value)
    if len(raw) != 32:
        raise ValueError("a log topic is 32 bytes")
    return raw


class Marketplace(ABC):
    """One contract version: how its calls are encoded and its answers decoded."""

    version: ClassVar[ContractVersion]
    # Tokens per second the claim-rate cap allows (policy.rate_cap applies it).
    default_rate: ClassVar[int]
    price_precision: ClassVar[int]  # payment = tokens * price / price_precision

    # -- the ABI --
    @property
    def abi(self) -> list[AbiEntry]:
        return [dict(entry) for entry in load_abi(self.version)]

    def entry(self, name: str) -> AbiEntry:
        for entry in load_abi(self.version):
            if entry["name"] == name:
                return entry
        raise KeyError(f"{name} is not in the {self.version} ABI")

    def _inputs(self, name: str) -> list[str]:
        return [p["type"] for p in self.entry(name)["inputs"]]

    def _outputs(self, name: str) -> list[str]:
        return [p["type"] for p in self.entry(name)["outputs"]]

    def selector(self, name: str) -> bytes:
        # The ABI files hold plain JSON: the entry of a function name is a function's.
        return function_abi_to_4byte_selector(cast("ABIFunction", self.entry(name)))

    def calldata(self, name: str, args: Sequence[Any]) -> bytes:
        return self.selector(name) + encode(self._inputs(name), list(args))

    # -- claims and settlement --
    @abstractmethod
    def claim_args(self, job_id: int, tokens: int, proof: ClaimProof) -> tuple[Any, ...]:
        """The arguments of ``submitProofOfWork``, in ABI order."""

    def claim_calldata(self, job_id: int, tokens: int, proof: ClaimProof) -> bytes:
        return self.calldata("submitProofOfWork", self.claim_args(job_id, tokens, proof))

    def settle_args(self, job_id: int, conversation_cid: str) -> tuple[Any, ...]:
        return (job_id, conversation_cid)

    def settle_calldata(self, job_id: int, conversation_cid: str) -> bytes:
        return self.calldata("completeSessionJob", self.settle_args(job_id, conversation_cid))

    @abstractmethod
    def event_proof_hash(self, proof: ClaimProof) -> bytes:
        """The ``proofHash`` that ``ProofSubmitted`` will carry for this proof."""

    # -- web3 objects, for the sender (gas estimates, transactions) --
    def contract(self, w3: Web3, address: str) -> Contract:
        return w3.eth.contract(address=to_checksum_address(address), abi=self.abi)

    def claim_function(
        self, contract: Contract, job_id: int, tokens: int, proof: ClaimProof
    ) -> ContractFunction:
        return contract.functions.submitProofOfWork(*self.claim_args(job_id, tokens, proof))

    def settle_function(
        self, contract: Contract, job_id: int, conversation_cid: str
    ) -> ContractFunction:
        return contract.functions.completeSessionJob(*self.settle_args(job_id, conversation_cid))

    # -- sessionJobs --
    def decode_job(self, job_id: int, values: Sequence[Any]) -> OnChainJob:
        """Decode the getter's values (as web3 returns them, in ABI order)."""
        outputs = self.entry("sessionJobs")["outputs"]
        if len(values) != len(outputs):
            raise ValueError(
                f"sessionJobs returned {len(values)} values; the {self.version} layout has "
                f"{len(outputs)}"
            )
        fields = {p["name"]: v for p, v in zip(outputs, values, strict=True)}
        try:
            status = SessionStatus(fields["status"])
        except ValueError:
            raise ValueError(f"unknown session status {fields['status']!r}") from None
        return OnChainJob(
            job_id=job_id,
            requester=to_checksum_address(fields.get("requester", fields.get("depositor"))),
            host=to_checksum_address(fields["host"]),
            payment_token=to_checksum_address(fields["paymentToken"]),
            deposit=fields["deposit"],
            price_per_token=fields["pricePerToken"],
            tokens_used=fields["tokensUsed"],
            max_duration=fields["maxDuration"],
            start_time=fields["startTime"],
            last_proof_time=fields["lastProofTime"],
            proof_interval=fields["proofInterval"],
            status=status,
            conversation_cid=fields["conversationCID"],
            proof_timeout_window=fields.get("proofTimeoutWindow", 0),
        )

    def decode_job_return(self, job_id: int, data: bytes) -> OnChainJob:
        """Decode the raw return data of ``sessionJobs(id)``, strictly.

        The data must be exactly the canonical encoding of this version's layout: a v2 answer
        read with v1's types decodes without error (the extra words are ignored), so a lenient
        decode would hide a contract of the wrong version.
        """
        try:
            values = decode_exact(self._outputs("sessionJobs"), data)
        except ValueError:
            raise ValueError(f"sessionJobs did not answer in the {self.version} layout") from None
        return self.decode_job(job_id, values)

    # -- budget, cap, windows --
    def max_tokens(self, job: OnChainJob) -> int:
        """All the tokens the deposit pays for, as the contract computes it."""
        if job.price_per_token == 0:
            return 0
        return job.deposit * self.price_precision // job.price_per_token

    def budget_tokens(self, job: OnChainJob) -> int:
        """Tokens the deposit still covers beyond what is proven."""
        return max(0, self.max_tokens(job) - job.tokens_used)

    def host_payment(self, job: OnChainJob) -> int:
        """What settling now pays for proven work, before the treasury fee (in token units)."""
        return job.tokens_used * job.price_per_token // self.price_precision

    def rate_cap(self, job: OnChainJob, now: int, rate: int | None = None) -> int:
        """The most tokens a claim mined at chain time ``now`` may carry."""
        return policy.rate_cap(job.last_proof_time, now, rate or self.default_rate)

    @abstractmethod
    def settle_not_before(self, job: OnChainJob, dispute_window: int) -> int:
        """The chain time from which the host may call ``completeSessionJob``."""

    def min_first_claim(self, job: OnChainJob) -> int:
        """The least the first proof of a job may claim beyond policy.MIN_CLAIM_TOKENS (0: none)."""
        return 0

    @abstractmethod
    def timeout_after(self, job: OnChainJob) -> int:
        """Anyone may time the session out once chain time exceeds this (claims then fail)."""

    # -- ProofSubmitted --
    @property
    def proof_submitted_topic(self) -> bytes:
        return event_abi_to_log_topic(cast("ABIEvent", self.entry("ProofSubmitted")))

    def proof_submitted_filter(
        self, address: str, job_id: int, host: str | None = None, from_block: int = 0
    ) -> FilterParams:
        """An ``eth_getLogs`` filter for this job's ``ProofSubmitted`` (optionally by host)."""
        topics: list[HexStr | None] = [
            HexStr("0x" + self.proof_submitted_topic.hex()),
            HexStr("0x" + job_id.to_bytes(32, "big").hex()),
            None
            if host is None
            else HexStr("0x" + bytes(12).hex() + to_checksum_address(host)[2:].lower()),
        ]
        while topics[-1] is None:
            topics.pop()
        return {
            "address": to_checksum_address(address),
            "topics": topics,
            "fromBlock": from_block,
            "toBlock": "latest",
        }

    def decode_proof_submitted(self, log: Mapping[str, Any]) -> ProofSubmittedEvent | None:
        """Decode one log; None when it is not this version's ``ProofSubmitted``."""
        topics = [_topic_value(t) for t in log.get("topics", ())]
        if len(topics) != 3 or topics[0] != self.proof_submitted_topic:
            return None
        data_types = [p["type"] for p in self.entry("ProofSubmitted")["inputs"] if not p["indexed"]]
        values = decode(data_types, _hex_bytes(log.get("data", b"")))
        tx_hash = log.get("transactionHash")
        return ProofSubmittedEvent(
            job_id=int.from_bytes(topics[1], "big"),
            host=to_checksum_address(topics[2][12:]),
            tokens_claimed=values[0],
            proof_hash=bytes(values[1]),
            proof_cid=values[2] if len(values) > 2 else None,
            delta_cid=values[3] if len(values) > 3 else None,
            tx_hash=None if tx_hash is None else "0x" + _hex_bytes(tx_hash).hex(),
            block_number=log.get("blockNumber"),
            log_index=log.get("logIndex"),
        )

    def find_proof(
        self, logs: Sequence[Mapping[str, Any]], proof: ClaimProof
    ) -> ProofSubmittedEvent | None:
        """The ``ProofSubmitted`` among ``logs`` that carries ``proof``, if any."""
        expected = self.event_proof_hash(proof)
        for log in logs:
            event = self.decode_proof_submitted(log)
            if event is not None and event.proof_hash == expected:
                return event
        return None

    def classify_revert(self, reason: str | None) -> RevertKind:
        return classify_revert(reason)

    # -- the version's getters, for the start-up check --
    def probe_calls(self) -> list[tuple[str, bytes]]:
        """(signature, calldata) of calls that must revert *with a reason* on job 0."""
        dummy = ClaimProof(bytes(32), bytes(65), bytes(32))
        claim = self.entry("submitProofOfWork")
        settle = self.entry("completeSessionJob")
        return [
            (_signature(claim), self.claim_calldata(0, policy.MIN_CLAIM_TOKENS, dummy)),
            (_signature(settle), self.settle_calldata(0, "")),
        ]


def _signature(entry: AbiEntry) -> str:
    return f"{entry['name']}({','.join(p['type'] for p in entry['inputs'])})"


class V1Marketplace(Marketplace):
    version = ContractVersion.V1
    default_rate = 20  # 10 tokens/s, times 2
    price_precision = 1

    def claim_args(self, job_id: int, tokens: int, proof: ClaimProof) -> tuple[Any, ...]:
        return (job_id, tokens, proof.v1_proof)

    def event_proof_hash(self, proof: ClaimProof) -> bytes:
        return keccak(proof.v1_proof)

    def settle_not_before(self, job: OnChainJob, dispute_window: int) -> int:
        return job.start_time + dispute_window

    def timeout_after(self, job: OnChainJob) -> int:
        return min(job.start_time + job.max_duration, job.last_proof_time + 3 * job.proof_interval)


class V2Marketplace(Marketplace):
    version = ContractVersion.V2
    default_rate = 2000  # ModelRegistry's default per-model limit; models may set their own
    price_precision = V2_PRICE_PRECISION

    def claim_args(self, job_id: int, tokens: int, proof: ClaimProof) -> tuple[Any, ...]:
        return (job_id, tokens, proof.proof_hash, proof.proof_cid, proof.delta_cid)

    def event_proof_hash(self, proof: ClaimProof) -> bytes:
        return proof.proof_hash

    def settle_not_before(self, job: OnChainJob, dispute_window: int) -> int:
        return job.last_proof_time + dispute_window

    def min_first_claim(self, job: OnChainJob) -> int:
        return job.proof_interval if job.tokens_used == 0 else 0

    def host_payment(self, job: OnChainJob) -> int:
        # v2 bills at least proofInterval tokens once any proof was made (every proof is >= 100).
        billable = max(job.tokens_used, job.proof_interval) if job.tokens_used else 0
        return billable * job.price_per_token // self.price_precision

    def timeout_after(self, job: OnChainJob) -> int:
        window = job.proof_timeout_window or V2_DEFAULT_PROOF_TIMEOUT
        return min(job.start_time + job.max_duration, job.last_proof_time + window)


_ADAPTERS: dict[ContractVersion, Marketplace] = {
    ContractVersion.V1: V1Marketplace(),
    ContractVersion.V2: V2Marketplace(),
}


def marketplace_for(version: str | ContractVersion) -> Marketplace:
    try:
        return _ADAPTERS[ContractVersion(version)]
    except ValueError:
        raise ValueError(f"unknown contract version {version!r}: use v1 or v2") from None
