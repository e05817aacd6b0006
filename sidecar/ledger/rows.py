"""Records and claims as database rows, shared by every backend.

A row is a tuple of plain values in the column order below. Job ids travel as canonical decimal
text (a uint256 is wider than any SQL integer type): SQLite stores the text, PostgreSQL casts it to
``NUMERIC(78, 0)`` and selects it back as text, so both backends read rows with the same code.
Counts are checked with :func:`operator.index`, which refuses floats: token counts are money.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from typing import Any, Final

from sidecar.ledger.base import Claim, ClaimKind, ClaimState, JobTotals, RecordState, UsageRecord
from sidecar.metering.types import Source

UINT256_MAX: Final = 2**256 - 1

# The parameters of one upsert, in the order of RECORD_COLUMNS.
RecordRow = tuple[
    str,
    str | None,
    str,
    str | None,
    int | None,
    int,
    int,
    str,
    str,
    int,
    int,
    int,
    int | None,
    int | None,
]

RECORD_COLUMNS: Final = (
    "key, job_id, endpoint, model, prompt_tokens, completion_tokens, billable_tokens,"
    " source, state, status, started_ms, updated_ms, cached_tokens, reasoning_tokens"
)
CLAIM_COLUMNS: Final = (
    "job_id, seq, kind, tokens, first_token, end_token, payload, state, tx_hash, nonce, error,"
    " created_ms, updated_ms, pieces"
)


def job_text(job_id: int | None) -> str | None:
    """A job id as canonical decimal text (None stays None); ValueError beyond a uint256."""
    if job_id is None:
        return None
    value = operator.index(job_id)
    if not 0 <= value <= UINT256_MAX:
        raise ValueError(f"job id {job_id} is not a uint256")
    return str(value)


def optional_int(value: int | None) -> int | None:
    return None if value is None else operator.index(value)


def record_row(record: UsageRecord) -> RecordRow:
    """The upsert parameters of a record; TypeError/ValueError for a malformed one."""
    return (
        str(record.key),
        job_text(record.job_id),
        str(record.endpoint),
        None if record.model is None else str(record.model),
        optional_int(record.prompt_tokens),
        operator.index(record.completion_tokens),
        operator.index(record.billable_tokens),
        Source(record.source).value,
        RecordState(record.state).value,
        operator.index(record.status),
        operator.index(record.started_ms),
        operator.index(record.updated_ms),
        optional_int(record.cached_tokens),
        optional_int(record.reasoning_tokens),
    )


def record_from_row(row: Sequence[Any]) -> UsageRecord:
    key, job_id, endpoint, model, prompt, completion, billable, source, state, status = row[:10]
    t0, t1, cached, reasoning = row[10:14]
    return UsageRecord(
        key=key,
        job_id=None if job_id is None else int(job_id),
        endpoint=endpoint,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        billable_tokens=billable,
        source=Source(source),
        state=RecordState(state),
        status=status,
        started_ms=t0,
        updated_ms=t1,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )


def claim_from_row(row: Sequence[Any]) -> Claim:
    job_id, seq, kind, tokens, first, end, payload, state, tx_hash, nonce, error, t0, t1 = row[:13]
    pieces = row[13]
    return Claim(
        job_id=int(job_id),
        seq=seq,
        kind=ClaimKind(kind),
        tokens=tokens,
        first_token=first,
        end_token=end,
        payload=bytes(payload),
        state=ClaimState(state),
        tx_hash=tx_hash,
        nonce=nonce,
        error=error,
        created_ms=t0,
        updated_ms=t1,
        pieces=None if pieces is None else tuple((str(k), int(t)) for k, t in json.loads(pieces)),
    )


def claim_row(claim: Claim) -> tuple[Any, ...]:
    return (
        job_text(claim.job_id),
        operator.index(claim.seq),
        ClaimKind(claim.kind).value,
        operator.index(claim.tokens),
        operator.index(claim.first_token),
        operator.index(claim.end_token),
        bytes(claim.payload),
        ClaimState(claim.state).value,
        claim.tx_hash,
        optional_int(claim.nonce),
        claim.error,
        operator.index(claim.created_ms),
        operator.index(claim.updated_ms),
        None
        if claim.pieces is None
        else json.dumps([[key, operator.index(tokens)] for key, tokens in claim.pieces]),
    )


def same_claim(stored: Claim, claim: Claim) -> bool:
    """Is ``claim`` the stored one added again (a retry), rather than a different claim?"""
    return (stored.kind, stored.tokens, stored.first_token, stored.end_token, stored.payload) == (
        claim.kind,
        claim.tokens,
        claim.first_token,
        claim.end_token,
        bytes(claim.payload),
    )


def totals_from_row(row: Sequence[Any]) -> JobTotals:
    """A totals row: job, requests, open, prompt, completion, billable, the by-source JSON
    object as text, first, last, cached, reasoning."""
    job_id, requests, open_n, prompt, completion, billable, by_source, first, last = row[:9]
    cached, reasoning = row[9:]
    sources: dict[str, Any] = json.loads(by_source)
    return JobTotals(
        job_id=None if job_id is None else int(job_id),
        requests=int(requests),
        open_requests=int(open_n),
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
        billable_tokens=int(billable),
        billable_by_source={name: int(sources[name]) for name in sorted(sources)},
        first_ms=None if first is None else int(first),
        last_ms=None if last is None else int(last),
        cached_tokens=int(cached or 0),
        reasoning_tokens=int(reasoning or 0),
    )
