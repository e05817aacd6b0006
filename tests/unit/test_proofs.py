"""Proof material: deterministic, distinct per claim, in the shapes each contract takes."""

from __future__ import annotations

import dataclasses

import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import keccak, to_canonical_address
from hypothesis import given
from hypothesis import strategies as st

from sidecar.chain.proofs import (
    GENESIS,
    PAYLOAD_LENGTH,
    ClaimProof,
    ClaimSpec,
    build_claim_proof,
    chain_step,
    conversation_cid,
    hash_chain,
    record_leaf,
    records_root,
    signed_hash,
    verify_claim_proof,
)

HOST = Account.from_key("0x" + "42" * 32)
OTHER = Account.from_key("0x" + "43" * 32)
MARKET = "0x1273E6358aa52Bb5B160c34Bf2e617B745e4A944"
ROWS = [("req-a", 120), ("req-b", 0), ("req-c", 95), ("req-d", 300)]


def spec(**changes: object) -> ClaimSpec:
    base = ClaimSpec(
        chain_id=84532,
        marketplace=MARKET,
        job_id=164,
        seq=1,
        first_token=0,
        end_token=215,
        records_root=records_root(ROWS, 215),
    )
    return dataclasses.replace(base, **changes)


# -- the hash chain -----------------------------------------------------------------------------


def test_leaf_is_the_documented_abi_encoding() -> None:
    expected = keccak(encode(["string", "string", "uint256"], ["sidecar.record.v1", "req-a", 120]))
    assert record_leaf("req-a", 120) == expected


def test_chain_is_the_documented_fold() -> None:
    head = GENESIS
    for key, tokens in ROWS:
        head = keccak(head + record_leaf(key, tokens))
    assert hash_chain(ROWS) == head
    assert hash_chain([]) == GENESIS
    # A chain continues from any head: the settlement's chain extends every claim's prefix.
    assert hash_chain(ROWS[2:], hash_chain(ROWS[:2])) == hash_chain(ROWS)


def test_chain_commits_to_order_keys_and_counts() -> None:
    heads = {
        hash_chain(ROWS),
        hash_chain(list(reversed(ROWS))),
        hash_chain([("req-a", 121), *ROWS[1:]]),
        hash_chain([("req-x", 120), *ROWS[1:]]),
        hash_chain(ROWS[:-1]),
        hash_chain([*ROWS, ("req-e", 0)]),  # a zero-token response is still a row
    }
    assert len(heads) == 6


def test_leaf_encoding_is_unambiguous() -> None:
    # Packed encodings would let ("a1", 1) and ("a", 11...) collide; the ABI encoding cannot.
    assert record_leaf("a1", 1) != record_leaf("a", 11)
    assert record_leaf("1", 10) != record_leaf("11", 0)


def test_records_root_is_the_shortest_covering_prefix() -> None:
    assert records_root(ROWS, 1) == hash_chain(ROWS[:1])
    assert records_root(ROWS, 120) == hash_chain(ROWS[:1])
    # Token 121 lies in req-c (req-b holds none), so the prefix runs through req-c.
    assert records_root(ROWS, 121) == hash_chain(ROWS[:3])
    assert records_root(ROWS, 515) == hash_chain(ROWS)
    assert records_root(ROWS, 0) == GENESIS
    # Rows recorded later do not change an earlier claim's root.
    assert records_root([*ROWS, ("req-e", 50)], 215) == records_root(ROWS, 215)


def test_records_root_refuses_unmetered_tokens() -> None:
    with pytest.raises(ValueError, match="515 billable tokens, fewer than 516"):
        records_root(ROWS, 516)


@pytest.mark.parametrize(
    ("key", "tokens"), [("", 1), ("k", -1), ("k", 2**256), ("k", True), (None, 1)]
)
def test_leaf_refuses_bad_rows(key: object, tokens: object) -> None:
    with pytest.raises(ValueError):
        record_leaf(key, tokens)  # type: ignore[arg-type]


def test_chain_step_needs_32_byte_values() -> None:
    with pytest.raises(ValueError):
        chain_step(b"\x00" * 31, GENESIS)


def test_conversation_cid() -> None:
    cid = conversation_cid(ROWS)
    assert cid == "sidecar-ledger:" + hash_chain(ROWS).hex()
    assert len(cid) == len("sidecar-ledger:") + 64
    assert conversation_cid([]) == "sidecar-ledger:" + "00" * 32


# -- claims ---------------------------------------------------------------------------------


def test_commitment_is_the_documented_abi_encoding() -> None:
    s = spec()
    expected = keccak(
        encode(
            ["string", "uint256", "address", "uint256", "uint256", "uint256", "uint256", "bytes32"],
            ["sidecar.claim.v1", 84532, MARKET, 164, 1, 0, 215, s.records_root],
        )
    )
    assert s.commitment() == expected
    assert s.tokens == 215


def test_same_claim_same_bytes() -> None:
    # RFC 6979: the signature is a function of key and message, so a resend is byte-identical.
    first = build_claim_proof(spec(), HOST)
    again = build_claim_proof(spec(marketplace=MARKET.lower()), HOST)
    assert first == again
    assert first.to_payload() == again.to_payload()


@pytest.mark.parametrize(
    "change",
    [
        {"chain_id": 8453},
        {"marketplace": "0xD067719Ee4c514B5735d1aC0FfB46FECf2A9adA4"},
        {"job_id": 165},
        {"seq": 2},
        {"first_token": 1},
        {"end_token": 214, "records_root": records_root(ROWS, 214)},
        {"records_root": hash_chain(ROWS)},
    ],
)
def test_every_field_is_committed(change: dict[str, object]) -> None:
    assert spec(**change).commitment() != spec().commitment()
    assert (
        build_claim_proof(spec(**change), HOST).v1_proof[:32]
        != build_claim_proof(spec(), HOST).v1_proof[:32]
    )


@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # job
            st.integers(1, 1000),  # seq
            st.integers(0, 10**6),  # first token
            st.integers(1, 10**4),  # tokens
        ),
        min_size=2,
        max_size=20,
        unique=True,
    )
)
def test_distinct_claims_never_collide(claims: list[tuple[int, int, int, int]]) -> None:
    commitments = {
        spec(job_id=job, seq=seq, first_token=first, end_token=first + n).commitment()
        for job, seq, first, n in claims
    }
    assert len(commitments) == len(claims)


def test_v1_proof_layout_matches_the_ecdsa_proof_system() -> None:
    proof = build_claim_proof(spec(), HOST)
    assert len(proof.v1_proof) == 97  # >= 64 for the deployed ProofSystem
    assert proof.v1_proof[:32] == spec().commitment()
    r, s, v = proof.signature[:32], proof.signature[32:64], proof.signature[64]
    assert v in (27, 28)
    # What ProofSystemUpgradeable recomputes: keccak(abi.encodePacked(hash, prover, tokens)),
    # under the "\x19Ethereum Signed Message:\n32" prefix.
    data_hash = keccak(proof.commitment + to_canonical_address(HOST.address) + (215).to_bytes(32))
    assert signed_hash(proof.commitment, HOST.address, 215) == data_hash
    message_hash = keccak(b"\x19Ethereum Signed Message:\n32" + data_hash)
    recovered = Account._recover_hash(message_hash, vrs=(v, int.from_bytes(r), int.from_bytes(s)))
    assert recovered == HOST.address


def test_v2_shapes() -> None:
    proof = build_claim_proof(spec(), HOST)
    assert proof.proof_hash == spec().commitment()
    assert proof.proof_cid == "sidecar-proof:" + proof.v1_proof.hex()
    assert proof.delta_cid == "sidecar-records:" + records_root(ROWS, 215).hex()


def test_payload_round_trip() -> None:
    proof = build_claim_proof(spec(), HOST)
    payload = proof.to_payload()
    assert len(payload) == PAYLOAD_LENGTH == 129
    assert ClaimProof.from_payload(payload) == proof
    with pytest.raises(ValueError, match="129 bytes"):
        ClaimProof.from_payload(payload[:-1])


def test_verify() -> None:
    proof = build_claim_proof(spec(), HOST)
    assert verify_claim_proof(spec(), proof, HOST.address)
    assert not verify_claim_proof(spec(), proof, OTHER.address)
    assert not verify_claim_proof(spec(seq=2), proof, HOST.address)
    # Another key's signature over the very same claim is not the host's.
    forged = dataclasses.replace(proof, signature=build_claim_proof(spec(), OTHER).signature)
    assert not verify_claim_proof(spec(), forged, HOST.address)
    garbage = dataclasses.replace(proof, signature=b"\x00" * 64 + b"\x05")
    assert not verify_claim_proof(spec(), garbage, HOST.address)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"first_token": 215}, "empty token range"),
        ({"end_token": 10, "first_token": 20}, "empty token range"),
        ({"marketplace": "0x1234"}, "not an address"),
        ({"records_root": b"\x00" * 31}, "32 bytes"),
        ({"job_id": -1}, "job_id"),
        ({"chain_id": 2**256}, "chain_id"),
        ({"seq": True}, "seq"),
    ],
)
def test_spec_refuses(change: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        spec(**change)


def test_proof_refuses_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        ClaimProof(b"\x00" * 32, b"\x00" * 64, b"\x00" * 32)
    with pytest.raises(ValueError):
        ClaimProof(b"\x00" * 33, b"\x00" * 65, b"\x00" * 32)


def test_the_key_never_shows() -> None:
    proof = build_claim_proof(spec(), HOST)
    key_hex = HOST.key.hex().removeprefix("0x")
    assert key_hex not in repr(proof) and key_hex not in repr(spec())
    assert key_hex not in proof.to_payload().hex()


def test_claim_pieces_continue_where_the_confirmed_claims_stopped() -> None:
    from sidecar.chain.proofs import GENESIS, claim_pieces, committed_by_pieces, pieces_root

    rows = [("a", 100), ("b", 50), ("c", 80)]
    first = claim_pieces(rows, {}, 120)
    assert first == (("a", 100), ("b", 20))
    # "a" was a stream still running: it grew to 130 before the next claim.
    grown = [("a", 130), ("b", 50), ("c", 80)]
    committed = committed_by_pieces([first])
    second = claim_pieces(grown, committed, 100)
    assert second == (("a", 30), ("b", 30), ("c", 40))
    root_1 = pieces_root(GENESIS, first)
    root_2 = pieces_root(root_1, second)
    assert root_1 == hash_chain(first) and root_2 == hash_chain(second, root_1)
    # Every row's pieces add up to at most its final count, whatever the order of claims.
    total = committed_by_pieces([first, second])
    assert all(total[key] <= tokens for key, tokens in grown)
    with pytest.raises(ValueError, match="fewer than"):
        claim_pieces(grown, total, 41)  # only c's last 40 tokens are unclaimed
    assert claim_pieces(grown, total, 0) == ()
