"""The on-chain outbox in the SQLite ledger: rows written before sending, moved only forward."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from sidecar.ledger import Claim, ClaimConflictError, ClaimKind, ClaimState
from sidecar.ledger.schema import SCHEMA_VERSION
from sidecar.ledger.sqlite import SQLiteLedger

BIG_JOB = 2**256 - 1


def claim(job: int = 7, seq: int = 1, tokens: int = 100, first: int = 0, **kw) -> Claim:
    return Claim(
        job_id=job,
        seq=seq,
        kind=kw.pop("kind", ClaimKind.PROOF),
        tokens=tokens,
        first_token=first,
        end_token=first + tokens,
        payload=kw.pop("payload", b"p" * 64),
        state=kw.pop("state", ClaimState.PENDING),
        created_ms=1,
        updated_ms=1,
        **kw,
    )


async def test_claims_move_forward_and_terminal_rows_never_change(ledger) -> None:
    await ledger.add_claim(claim())
    await ledger.update_claim(7, 1, ClaimState.SENT, now_ms=5, tx_hash="0xaa", nonce=3)
    await ledger.update_claim(7, 1, ClaimState.SENT, now_ms=6, tx_hash="0xbb")  # resent
    [sent] = await ledger.unfinished_claims()
    assert (sent.state, sent.tx_hash, sent.nonce, sent.updated_ms) == (
        ClaimState.SENT,
        "0xbb",
        3,
        6,
    )
    await ledger.update_claim(7, 1, ClaimState.CONFIRMED, now_ms=7)
    await ledger.update_claim(7, 1, ClaimState.FAILED, now_ms=8, error="late")
    [done] = await ledger.claims(7)
    assert (done.state, done.tx_hash, done.error) == (ClaimState.CONFIRMED, "0xbb", None)
    assert await ledger.unfinished_claims() == []


async def test_adding_the_same_claim_twice_is_a_no_op_but_a_different_one_conflicts(
    ledger,
) -> None:
    await ledger.add_claim(claim())
    await ledger.add_claim(claim())
    assert len(await ledger.claims(7)) == 1
    with pytest.raises(ClaimConflictError, match="claim #1"):
        await ledger.add_claim(claim(tokens=101))
    with pytest.raises(ClaimConflictError):
        await ledger.add_claim(claim(payload=b"q" * 64))


async def test_claims_are_ordered_by_job_then_seq(ledger) -> None:
    for job, seq in ((BIG_JOB, 1), (10, 2), (9, 1), (10, 1)):
        await ledger.add_claim(claim(job=job, seq=seq, first=100 * (seq - 1)))
    assert [(c.job_id, c.seq) for c in await ledger.claims()] == [
        (9, 1),
        (10, 1),
        (10, 2),
        (BIG_JOB, 1),
    ]
    assert [c.seq for c in await ledger.claims(10)] == [1, 2]


async def test_remainders_and_settlements_are_rows_too(ledger) -> None:
    await ledger.add_claim(claim(seq=1, tokens=100))
    await ledger.add_claim(claim(seq=2, tokens=42, first=100, state=ClaimState.UNCLAIMABLE))
    await ledger.add_claim(
        claim(seq=3, tokens=0, first=142, kind=ClaimKind.SETTLE, payload=b"sidecar-ledger:abc")
    )
    rows = await ledger.claims(7)
    assert [(c.kind, c.state, c.tokens) for c in rows] == [
        (ClaimKind.PROOF, ClaimState.PENDING, 100),
        (ClaimKind.PROOF, ClaimState.UNCLAIMABLE, 42),
        (ClaimKind.SETTLE, ClaimState.PENDING, 0),
    ]
    assert [c.seq for c in await ledger.unfinished_claims()] == [1, 3]
    assert rows[1].as_json()["token_range"] == [100, 142]


async def test_bad_claims_are_refused_by_the_schema(ledger) -> None:
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.IntegrityError)):
        await ledger.add_claim(replace(claim(), end_token=5))  # range disagrees with tokens
    with pytest.raises(TypeError):
        await ledger.add_claim(replace(claim(), tokens=1.5))  # type: ignore[arg-type]


async def test_claims_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    first = SQLiteLedger(path)
    await first.open()
    await first.add_claim(claim())
    await first.update_claim(7, 1, ClaimState.SENT, now_ms=2, tx_hash="0x01", nonce=0)
    await first.close()
    second = SQLiteLedger(path)
    await second.open()
    try:
        [row] = await second.unfinished_claims()
        assert (row.state, row.tx_hash, row.payload) == (ClaimState.SENT, "0x01", b"p" * 64)
    finally:
        await second.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


async def test_a_claims_pieces_are_kept(ledger_store) -> None:
    ledger = ledger_store()
    await ledger.open()
    pieces = (("k1-1", 100), ("k1-2", 7), ("a" * 200, 2**200))
    try:
        await ledger.add_claim(claim(9, 1, tokens=107, pieces=pieces))
        await ledger.add_claim(claim(9, 2, tokens=5))  # a settlement or an older claim: none
    finally:
        await ledger.close()
    reopened = ledger_store()
    await reopened.open()
    try:
        first, second = await reopened.claims(9)
        assert first.pieces == pieces and second.pieces is None
        assert first.as_json()["pieces"] == [list(p) for p in pieces]
    finally:
        await reopened.close()
