"""Deterministic proof material of a claim, and the hash chain of a job's ledger records.

Pure functions: bytes in, bytes out, no chain and no clock. A claim's bytes depend only on what it
claims, so a resend after an unknown outcome sends exactly the same bytes and the contract answers
"Proof already submitted" (v1) / "Proof already used" (v2) instead of paying twice.

Canonical encoding (version 1), reproducible in Solidity or any language with an ABI encoder;
``abi.encode`` is Solidity's, ``||`` is byte concatenation, ``keccak`` is Ethereum's keccak-256:

- Ledger row (one metered response): its record key (the idempotency key the client also gets as
  ``X-Sidecar-Request-Id``) and its billable tokens, so a client can audit from its own receipts::

      leaf = keccak(abi.encode(string "sidecar.record.v1", string key, uint256 billable_tokens))

- Hash chain over a job's rows in ledger order (oldest first)::

      head_0 = bytes32(0);   head_i = keccak(head_{i-1} || leaf_i)     (64 bytes hashed)

- A claim of the job's billable tokens ``[first_token, end_token)`` commits to its *pieces*: in
  ledger order, what each row holds beyond what the job's earlier confirmed claims committed of
  it (``(key, tokens)``, the last piece cut to what the claim needs; a stream still running is in
  with the tokens it has so far, and its later tokens go into a later claim's pieces). Its
  ``records_root`` chains them from the previous confirmed claim's root (``bytes32(0)`` for the
  first), so the roots of a job's claims form one chain; the outbox keeps each claim's pieces,
  and an auditor recomputes every root from them and checks that no row's pieces add up to more
  than its final count::

      records_root_n = hash_chain(pieces_n, head = records_root_{n-1})

  The commitment::

      commitment = keccak(abi.encode(string "sidecar.claim.v1", uint256 chain_id,
                                     address marketplace, uint256 job_id, uint256 seq,
                                     uint256 first_token, uint256 end_token,
                                     bytes32 records_root))

- The host signs it the way the public ProofSystem's ECDSA variant checks a proof (EIP-191
  ``personal_sign`` of a 32-byte hash; RFC 6979 nonces, so the signature is deterministic)::

      signed = keccak(commitment || host address (20 bytes) || uint256 tokens)  (abi.encodePacked)

- v1 proof bytes (97): ``commitment || r || s || v``. At least 64 bytes, first 32 unique per
  claim, as the deployed ProofSystem requires; the same layout its later ECDSA version verifies.
- v2: ``proofHash = commitment``; ``proofCID = "sidecar-proof:" + hex(commitment || signature)``;
  ``deltaCID = "sidecar-records:" + hex(records_root)`` (the records the claim covers).
- Settlement: ``conversationCID = "sidecar-ledger:" + hex(head over all the job's rows)``.

Hex is lowercase without ``0x``. Distinct claims differ in at least one committed field (chain,
contract, job, sequence number or range), so their commitments differ unless keccak collides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, keccak, to_canonical_address, to_checksum_address

RECORD_DOMAIN = "sidecar.record.v1"
CLAIM_DOMAIN = "sidecar.claim.v1"
GENESIS = bytes(32)  # the head of an empty chain

PROOF_CID_PREFIX = "sidecar-proof:"
DELTA_CID_PREFIX = "sidecar-records:"
LEDGER_CID_PREFIX = "sidecar-ledger:"

SIGNATURE_LENGTH = 65  # r (32) || s (32) || v (1), v in {27, 28}
V1_PROOF_LENGTH = 32 + SIGNATURE_LENGTH
PAYLOAD_LENGTH = V1_PROOF_LENGTH + 32  # what the outbox stores: the v1 proof || records_root

_UINT256_MAX = 2**256 - 1
_CLAIM_TYPES = [
    "string",  # CLAIM_DOMAIN
    "uint256",  # chain id
    "address",  # marketplace
    "uint256",  # job id
    "uint256",  # seq
    "uint256",  # first token
    "uint256",  # end token
    "bytes32",  # records root
]

LedgerRow = tuple[str, int]  # (record key, billable tokens), the fields the chain commits to


def _uint(name: str, value: int) -> int:
    # bool is an int in Python; a True job id is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _UINT256_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**256), got {value!r}")
    return value


def _bytes32(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
    return value


# -- the ledger's hash chain -------------------------------------------------------------------


def record_leaf(key: str, billable_tokens: int) -> bytes:
    """The 32-byte hash of one ledger row."""
    if not isinstance(key, str) or not key:
        raise ValueError("a record key must be a non-empty string")
    _uint("billable_tokens", billable_tokens)
    return keccak(encode(["string", "string", "uint256"], [RECORD_DOMAIN, key, billable_tokens]))


def chain_step(head: bytes, leaf: bytes) -> bytes:
    return keccak(_bytes32("head", head) + _bytes32("leaf", leaf))


def hash_chain(rows: Iterable[LedgerRow], head: bytes = GENESIS) -> bytes:
    """The chain head after ``rows`` (in ledger order), continuing from ``head``."""
    for key, tokens in rows:
        head = chain_step(head, record_leaf(key, tokens))
    return head


def claim_pieces(
    rows: Iterable[LedgerRow], committed: Mapping[str, int], tokens: int
) -> tuple[LedgerRow, ...]:
    """The pieces a claim of ``tokens`` more tokens commits to: in ``rows``' order, what each row
    holds beyond ``committed`` (per key, by earlier claims), the last piece cut to what the claim
    needs. Raises ValueError when the rows hold fewer: a claim never covers an unmetered token."""
    _uint("tokens", tokens)
    pieces: list[LedgerRow] = []
    need = tokens
    for key, row_tokens in rows:
        if need == 0:
            break
        spare = row_tokens - committed.get(key, 0)
        if spare > 0:
            take = min(spare, need)
            pieces.append((key, take))
            need -= take
    if need:
        raise ValueError(f"the rows hold {tokens - need} unclaimed tokens, fewer than {tokens}")
    return tuple(pieces)


def pieces_root(previous_root: bytes, pieces: Iterable[LedgerRow]) -> bytes:
    """A claim's records root: its pieces chained from the previous confirmed claim's root."""
    return hash_chain(pieces, _bytes32("previous_root", previous_root))


def committed_by_pieces(claims_pieces: Iterable[Iterable[LedgerRow]]) -> dict[str, int]:
    """Per record key, the tokens the given claims' pieces committed."""
    committed: dict[str, int] = {}
    for pieces in claims_pieces:
        for key, tokens in pieces:
            committed[key] = committed.get(key, 0) + tokens
    return committed


def records_root(rows: Iterable[LedgerRow], end_token: int) -> bytes:
    """The head of the shortest prefix of ``rows`` holding at least ``end_token`` billable tokens:
    the records root of a claim made before claims kept their pieces (ledger schema 7 and older),
    each from genesis. Raises ValueError when the rows hold fewer tokens.
    """
    _uint("end_token", end_token)
    head, total = GENESIS, 0
    for key, tokens in rows:
        if total >= end_token:
            break
        head = chain_step(head, record_leaf(key, tokens))
        total += tokens
    if total < end_token:
        raise ValueError(f"the rows hold {total} billable tokens, fewer than {end_token}")
    return head


def conversation_cid(rows: Iterable[LedgerRow]) -> str:
    """The settlement's conversationCID: a commitment to every ledger row of the job."""
    return LEDGER_CID_PREFIX + hash_chain(rows).hex()


# -- a claim ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    """What one claim commits to. ``seq`` is the job's claim number (the ledger's, from 1)."""

    chain_id: int
    marketplace: str
    job_id: int
    seq: int
    first_token: int
    end_token: int
    records_root: bytes

    def __post_init__(self) -> None:
        for name in ("chain_id", "job_id", "seq", "first_token", "end_token"):
            _uint(name, getattr(self, name))
        if self.end_token <= self.first_token:
            raise ValueError(f"empty token range [{self.first_token}, {self.end_token})")
        if not isinstance(self.marketplace, str) or not is_address(self.marketplace):
            raise ValueError(f"not an address: {self.marketplace!r}")
        _bytes32("records_root", self.records_root)
        # Checksummed, so two spellings of one address are one spec.
        object.__setattr__(self, "marketplace", to_checksum_address(self.marketplace))

    @property
    def tokens(self) -> int:
        return self.end_token - self.first_token

    def commitment(self) -> bytes:
        return keccak(
            encode(
                _CLAIM_TYPES,
                [
                    CLAIM_DOMAIN,
                    self.chain_id,
                    self.marketplace,
                    self.job_id,
                    self.seq,
                    self.first_token,
                    self.end_token,
                    self.records_root,
                ],
            )
        )


@dataclass(frozen=True, slots=True)
class ClaimProof:
    """The signed proof material of one claim, in the shapes each contract version takes."""

    commitment: bytes
    signature: bytes
    records_root: bytes

    def __post_init__(self) -> None:
        _bytes32("commitment", self.commitment)
        _bytes32("records_root", self.records_root)
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_LENGTH:
            raise ValueError(f"a signature is {SIGNATURE_LENGTH} bytes")

    @property
    def v1_proof(self) -> bytes:
        """``submitProofOfWork(uint256,uint256,bytes)``'s proof: commitment || r || s || v."""
        return self.commitment + self.signature

    @property
    def proof_hash(self) -> bytes:
        """v2's ``proofHash``: unique per claim, so also across sessions as v2 requires."""
        return self.commitment

    @property
    def proof_cid(self) -> str:
        return PROOF_CID_PREFIX + self.v1_proof.hex()

    @property
    def delta_cid(self) -> str:
        return DELTA_CID_PREFIX + self.records_root.hex()

    def to_payload(self) -> bytes:
        """The bytes the outbox stores: everything needed to resend either version's call."""
        return self.v1_proof + self.records_root

    @classmethod
    def from_payload(cls, payload: bytes) -> ClaimProof:
        if len(payload) != PAYLOAD_LENGTH:
            raise ValueError(f"a claim payload is {PAYLOAD_LENGTH} bytes, got {len(payload)}")
        return cls(payload[:32], payload[32:V1_PROOF_LENGTH], payload[V1_PROOF_LENGTH:])


def signed_hash(commitment: bytes, host: str, tokens: int) -> bytes:
    """The hash the host signs: keccak(commitment || host || uint256 tokens), packed."""
    _bytes32("commitment", commitment)
    _uint("tokens", tokens)
    return keccak(commitment + to_canonical_address(host) + tokens.to_bytes(32, "big"))


def build_claim_proof(spec: ClaimSpec, host: LocalAccount) -> ClaimProof:
    """Sign ``spec`` with the host key. The same spec and key always give the same bytes."""
    commitment = spec.commitment()
    message = encode_defunct(primitive=signed_hash(commitment, host.address, spec.tokens))
    signature = bytes(host.sign_message(message).signature)
    return ClaimProof(commitment, signature, spec.records_root)


def verify_claim_proof(spec: ClaimSpec, proof: ClaimProof, host: str) -> bool:
    """Does ``proof`` commit to ``spec`` and carry ``host``'s signature? (For audits and tests.)"""
    if proof.commitment != spec.commitment() or proof.records_root != spec.records_root:
        return False
    message = encode_defunct(primitive=signed_hash(proof.commitment, host, spec.tokens))
    try:
        signer = Account.recover_message(message, signature=proof.signature)
    except ValueError:  # a malformed signature (bad v, s out of range) proves nothing
        return False
    return bool(signer == to_checksum_address(host))
