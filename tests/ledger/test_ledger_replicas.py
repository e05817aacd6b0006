"""What several processes sharing one ledger rely on: exact totals when they write the same jobs
at once, holds of one deposit that no two replicas hand out twice, one submitter at a time, and
settlement requests any of them takes. Each runs on both backends where it applies (SQLite's
processes share one machine and a lock file; PostgreSQL's share a server)."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.ledger import Ledger, RecordState, UsageRecord
from sidecar.metering.types import Endpoint, Source
from tests.ledger.conftest import LedgerStore


def record(key: str, job_id: int, billable: int, state: RecordState) -> UsageRecord:
    return UsageRecord(
        key=key,
        job_id=job_id,
        endpoint=Endpoint.CHAT.value,
        model="tiny",
        prompt_tokens=1,
        completion_tokens=billable,
        billable_tokens=billable,
        source=Source.REPORTED,
        state=state,
        status=200,
        started_ms=1,
        updated_ms=1,
    )


async def test_replicas_writing_the_same_jobs_at_once_add_up_exactly(
    ledger_store: LedgerStore,
) -> None:
    replicas = [ledger_store() for _ in range(3)]
    for replica in replicas:
        await replica.open()
    try:

        async def serve(index: int, replica: Ledger) -> None:
            for n in range(60):
                key = f"r{index}-{n}"
                job = 1 + n % 3
                # progress, then the final count: only the final one counts in the end
                replica.submit(record(key, job, 1, RecordState.OPEN))
                await replica.submit(record(key, job, 1 + n % 5, RecordState.FINAL))

        await asyncio.gather(*(serve(i, r) for i, r in enumerate(replicas)))
        expected = {job: 0 for job in (1, 2, 3)}
        for n in range(60):
            expected[1 + n % 3] += 3 * (1 + n % 5)
        reader = replicas[0]
        assert await reader.billable_by_job() == expected
        for job, tokens in expected.items():
            assert await reader.job_tokens(job) == tokens
            totals = await reader.job(job)
            assert totals is not None and totals.billable_tokens == tokens
            assert totals.requests == 60 and totals.open_requests == 0
    finally:
        for replica in replicas:
            await replica.close()


async def test_one_submitter_at_a_time_and_a_successor_after_release(
    ledger_store: LedgerStore,
) -> None:
    first, second = ledger_store(), ledger_store()
    await first.open()
    await second.open()
    try:
        a = first.submitter_lease("0xHost", takeover_s=1)
        b = second.submitter_lease("0xHost", takeover_s=1)
        other_host = second.submitter_lease("0xOther", takeover_s=1)
        assert await a.try_acquire()
        assert not await b.try_acquire()
        assert await other_host.try_acquire()  # one lease per host key
        assert await a.still_held() and not await b.still_held()
        await a.release()
        await asyncio.wait_for(b.acquire(), timeout=10)
        assert await b.still_held()
        assert not await a.try_acquire()
        await b.release()
        await other_host.release()
    finally:
        await first.close()
        await second.close()


async def test_settlement_requests_are_shared_and_end_with_the_settlement(
    ledger_store: LedgerStore,
) -> None:
    from sidecar.ledger import Claim, ClaimKind, ClaimState

    asker, submitter = ledger_store(), ledger_store()
    await asker.open()
    await submitter.open()
    try:
        await asker.request_settlement(164, now_ms=1)
        await asker.request_settlement(164, now_ms=2)  # again: a no-op
        await asker.request_settlement(2**200, now_ms=3)
        assert await submitter.settlement_requests() == [164, 2**200]
        settle = Claim(164, 1, ClaimKind.SETTLE, 0, 0, 0, b"cid", ClaimState.PENDING)
        await submitter.add_claim(settle)
        assert await submitter.settlement_requests() == [164, 2**200]
        await submitter.update_claim(164, 1, ClaimState.CONFIRMED, now_ms=4, tx_hash="0x1")
        assert await asker.settlement_requests() == [2**200]
    finally:
        await asker.close()
        await submitter.close()


async def test_a_postgres_submitter_cut_off_loses_the_lease_to_another(postgres: Any) -> None:
    from sidecar.ledger.postgres import PostgresLedger

    url = postgres.new_database()
    first, second = PostgresLedger(url), PostgresLedger(url)
    await first.open()
    await second.open()
    try:
        a = first.submitter_lease("0xHost", takeover_s=1)
        b = second.submitter_lease("0xHost", takeover_s=1)
        assert await a.try_acquire() and not await b.try_acquire()
        postgres.kill_connections(url)  # the holder's connection ends (a crash, a network cut)
        assert not await a.still_held()  # it stops sending at its next check...
        await asyncio.wait_for(b.acquire(), timeout=10)  # ...and the other takes over
        assert not await a.try_acquire()
        await b.release()
    finally:
        await first.close()
        await second.close()


async def test_postgres_holds_never_grant_one_deposit_twice(postgres: Any) -> None:
    from sidecar.ledger.postgres import PostgresLedger

    url = postgres.new_database()
    replicas = [PostgresLedger(url) for _ in range(3)]
    for replica in replicas:
        await replica.open()
    try:
        # A deposit of 1000 tokens, 100 already metered: 900 left, asked for 50 at a time by 30
        # requests spread over three replicas at once.
        await replicas[0].write(record("metered", 9, 100, RecordState.FINAL))
        grants = await asyncio.gather(
            *(replicas[n % 3].hold(9, 1000, 0, 50, now_ms=1) for n in range(30))
        )
        granted = [tokens for _, tokens in grants]
        assert sum(granted) == 900 and granted.count(50) == 18 and granted.count(0) == 12
        # The chain's own count is a floor: it outweighs a smaller metered count.
        assert (await replicas[1].hold(10, 1000, 990, 50, now_ms=1))[1] == 10
        first_id = next(hold_id for hold_id, tokens in grants if tokens)
        assert first_id is not None
        replicas[0].release_hold(first_id)
        await replicas[0].close()  # waits for the release
        hold_id, tokens = await replicas[1].hold(9, 1000, 0, 80, now_ms=2)
        assert (hold_id is not None, tokens) == (True, 50)
        # A hold past its expiry no longer counts (a replica that died holding it).
        _, tokens = await replicas[2].hold(9, 1000, 0, 2000, now_ms=10**15)
        assert tokens == 900
    finally:
        for replica in replicas:
            await replica.close()
