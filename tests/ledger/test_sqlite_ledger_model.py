"""Random submit sequences against a model of the upsert rule: a key's first record is stored,
later ones replace it only while the stored one is open, and started_ms never changes."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.ledger import RecordState, UsageRecord
from sidecar.ledger.sqlite import SQLiteLedger
from sidecar.metering.types import Source

# (key, state, completion tokens, source, await it before the next submit?)
Op = tuple[str, RecordState, int, Source, bool]

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(list(RecordState)),
        st.integers(min_value=0, max_value=10**12),
        st.sampled_from(list(Source)),
        st.booleans(),  # awaiting splits the sequence into separate batches
    ),
    max_size=40,
)


def record(index: int, op: Op) -> UsageRecord:
    key, state, completion, source, _ = op
    return UsageRecord(
        key=key,
        job_id=1,
        endpoint="chat",
        model=None,
        prompt_tokens=None if index % 3 == 0 else index,
        completion_tokens=completion,
        billable_tokens=completion + index,
        source=source,
        state=state,
        status=200,
        started_ms=index,
        updated_ms=index,
    )


def model(ops: list[Op]) -> dict[str, UsageRecord]:
    stored: dict[str, UsageRecord] = {}
    for index, op in enumerate(ops):
        new = record(index, op)
        old = stored.get(new.key)
        if old is None:
            stored[new.key] = new
        elif old.state is RecordState.OPEN:
            stored[new.key] = dataclasses.replace(new, started_ms=old.started_ms)
    return stored


async def run(path: Path, ops: list[Op]) -> None:
    ledger = SQLiteLedger(path)
    await ledger.open()
    try:
        pending = []
        for index, op in enumerate(ops):
            future = ledger.submit(record(index, op))
            pending.append(future)
            if op[4]:
                await future
        await asyncio.gather(*pending)

        expected = model(ops)
        assert {r.key: r for r in await ledger.records(1)} == expected
        totals = await ledger.job(1)
        if not expected:
            assert totals is None
            return
        assert totals is not None
        assert totals.requests == len(expected)
        assert totals.open_requests == sum(r.state is RecordState.OPEN for r in expected.values())
        assert totals.prompt_tokens == sum(r.prompt_tokens or 0 for r in expected.values())
        assert totals.completion_tokens == sum(r.completion_tokens for r in expected.values())
        assert totals.billable_tokens == sum(r.billable_tokens for r in expected.values())
        by_source: dict[str, int] = {}
        for r in expected.values():
            by_source[r.source.value] = by_source.get(r.source.value, 0) + r.billable_tokens
        assert totals.billable_by_source == by_source
        assert totals.first_ms == min(r.started_ms for r in expected.values())
        assert totals.last_ms == max(r.updated_ms for r in expected.values())
    finally:
        await ledger.close()


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy)
def test_random_submit_sequences_match_the_model(ops: list[Op]) -> None:
    # A fresh file per example (tmp_path is per test, not per example).
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(run(Path(folder) / "ledger.db", ops))
