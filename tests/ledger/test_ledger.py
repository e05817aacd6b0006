"""The ledger on every backend (tests taking ``ledger``: SQLite and PostgreSQL), and the SQLite
file's own properties (tests taking ``db_path``): upsert semantics, totals, job ids, schema
migrations, concurrent readers, failures and lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.ledger import JobTotals, Ledger, RecordState, UsageRecord, open_ledger
from sidecar.ledger.base import LedgerClosedError
from sidecar.ledger.schema import MIGRATIONS, SCHEMA_VERSION, SchemaError, migrate
from sidecar.ledger.sqlite import SQLiteLedger, _open_writer
from sidecar.metering.types import Endpoint, Source
from tests.ledger.conftest import LedgerStore

OPEN, FINAL, ABORTED = RecordState.OPEN, RecordState.FINAL, RecordState.ABORTED
UINT256_MAX = 2**256 - 1


def rec(
    key: str,
    job_id: int | None = 1,
    *,
    state: RecordState = OPEN,
    prompt: int | None = 10,
    completion: int = 1,
    billable: int | None = None,
    source: Source = Source.COUNTED,
    started_ms: int = 1_000,
    updated_ms: int | None = None,
    status: int = 200,
) -> UsageRecord:
    return UsageRecord(
        key=key,
        job_id=job_id,
        endpoint=Endpoint.CHAT.value,
        model="tiny",
        prompt_tokens=prompt,
        completion_tokens=completion,
        billable_tokens=(prompt or 0) + completion if billable is None else billable,
        source=source,
        state=state,
        status=status,
        started_ms=started_ms,
        updated_ms=started_ms if updated_ms is None else updated_ms,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "folder" / "ledger.db"


@pytest.fixture
async def sqlite_ledger(db_path: Path) -> AsyncIterator[SQLiteLedger]:
    ledger = SQLiteLedger(db_path)
    await ledger.open()
    yield ledger
    await ledger.close()


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection, as another process (the jobs CLI) would have."""
    return sqlite3.connect(path, isolation_level=None, timeout=30)


async def stored(ledger: Ledger, key: str, job_id: int | None = 1) -> UsageRecord:
    matches = [r for r in await ledger.records(job_id) if r.key == key]
    assert len(matches) == 1, matches
    return matches[0]


# --- opening, schema, migrations ------------------------------------------------------------


async def test_open_creates_folder_wal_and_current_schema(
    sqlite_ledger: SQLiteLedger, db_path: Path
) -> None:
    assert await asyncio.to_thread(db_path.is_file)
    conn = raw(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "usage_records" in tables
    conn.close()


def test_writer_connection_is_durable_and_waits_when_busy(tmp_path: Path) -> None:
    conn = _open_writer(tmp_path / "l.db", busy_timeout_ms=1_234)
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1_234
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_open_ledger_url_and_reopen_keeps_version_and_data(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    first = open_ledger(f"sqlite:///{path}")
    assert isinstance(first, SQLiteLedger)
    await first.open()
    await first.write(rec("a", 7, state=FINAL, completion=5))
    await first.close()

    second = open_ledger(f"sqlite:///{path}")
    await second.open()
    try:
        assert raw(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [r.key for r in await second.records(7)] == ["a"]
        totals = await second.job(7)
        assert totals is not None and totals.completion_tokens == 5
    finally:
        await second.close()


def test_migrations_run_in_order_once_each(tmp_path: Path) -> None:
    # CREATE TABLE without IF NOT EXISTS fails if a migration ever runs twice.
    one = (("CREATE TABLE a (x INTEGER)",),)
    three = (*one, ("CREATE TABLE b (x INTEGER)",), ("INSERT INTO a VALUES (42)",))
    conn = raw(tmp_path / "m.db")
    assert migrate(conn, one) == 0
    assert migrate(conn, one) == 1  # re-open: nothing to do, version kept
    assert migrate(conn, three) == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert conn.execute("SELECT x FROM a").fetchall() == [(42,)]
    assert migrate(conn, three) == 3


def test_failed_migration_leaves_file_at_its_old_version(tmp_path: Path) -> None:
    good = (("CREATE TABLE a (x INTEGER)",),)
    bad = (*good, ("CREATE TABLE b (x INTEGER)", "THIS IS NOT SQL"))
    conn = raw(tmp_path / "m.db")
    migrate(conn, good)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, bad)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"a"}  # b was rolled back with the failed step
    assert not conn.in_transaction


async def test_file_from_a_newer_sidecar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    conn = raw(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    ledger = SQLiteLedger(path)
    with pytest.raises(SchemaError, match="newer"):
        await ledger.open()
    await ledger.close()


# --- upsert semantics -----------------------------------------------------------------------


async def test_progress_updates_an_open_record_then_final_freezes_it(
    ledger: Ledger,
) -> None:
    await ledger.write(rec("r", state=OPEN, completion=1, started_ms=100, updated_ms=100))
    await ledger.write(rec("r", state=OPEN, completion=7, started_ms=100, updated_ms=150))
    progress = await stored(ledger, "r")
    assert (progress.state, progress.completion_tokens, progress.updated_ms) == (OPEN, 7, 150)

    final = rec(
        "r", state=FINAL, completion=9, source=Source.REPORTED, started_ms=100, updated_ms=200
    )
    await ledger.write(final)
    assert await stored(ledger, "r") == final

    # Anything after the final record (a late progress write, a changed final) is ignored.
    await ledger.write(rec("r", state=OPEN, completion=50, started_ms=100, updated_ms=300))
    await ledger.write(rec("r", state=FINAL, completion=51, started_ms=100, updated_ms=301))
    await ledger.write(rec("r", state=ABORTED, completion=52, started_ms=100, updated_ms=302))
    assert await stored(ledger, "r") == final


async def test_replayed_final_record_is_a_no_op(ledger: Ledger) -> None:
    final = rec("r", state=FINAL, completion=3)
    for _ in range(3):
        await ledger.write(final)
    assert await ledger.records(1) == [final]
    totals = await ledger.job(1)
    assert totals is not None and totals.requests == 1 and totals.completion_tokens == 3


async def test_aborted_record_is_immutable(ledger: Ledger) -> None:
    aborted = rec("r", state=ABORTED, completion=4, status=200)
    await ledger.write(aborted)
    await ledger.write(rec("r", state=FINAL, completion=100))
    assert await stored(ledger, "r") == aborted


async def test_started_ms_is_kept_from_the_first_record(ledger: Ledger) -> None:
    await ledger.write(rec("r", started_ms=100))
    await ledger.write(rec("r", state=FINAL, started_ms=999, updated_ms=1_000))
    row = await stored(ledger, "r")
    assert (row.started_ms, row.updated_ms, row.state) == (100, 1_000, FINAL)


async def test_many_submits_of_one_key_apply_in_submit_order(ledger: Ledger) -> None:
    # Submitted back to back without awaiting, so they share batches: order must still hold.
    futures = [ledger.submit(rec("r", completion=n, updated_ms=n)) for n in range(1, 301)]
    futures.append(ledger.submit(rec("r", state=FINAL, completion=301, updated_ms=301)))
    futures += [ledger.submit(rec("r", completion=n, updated_ms=n)) for n in range(302, 400)]
    await asyncio.gather(*futures)
    row = await stored(ledger, "r")
    assert (row.state, row.completion_tokens) == (FINAL, 301)

    futures = [ledger.submit(rec("s", completion=n)) for n in range(1, 1_500)]  # > MAX_BATCH
    await asyncio.gather(*futures)
    assert (await stored(ledger, "s")).completion_tokens == 1_499


async def test_not_awaiting_and_cancelling_the_awaiter_still_writes(ledger: Ledger) -> None:
    ledger.submit(rec("fire-and-forget", state=FINAL))

    task = asyncio.create_task(ledger.write(rec("cancelled", state=FINAL)))
    await asyncio.sleep(0)  # let the task submit
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.write(rec("after"))  # committed after both, in FIFO order
    assert {r.key for r in await ledger.records(1)} == {"fire-and-forget", "cancelled", "after"}


# --- totals and job ids ---------------------------------------------------------------------


async def test_totals_sum_in_sql_and_group_billable_by_source(ledger: Ledger) -> None:
    table = [  # key, state, prompt, completion, billable, source, started_ms, updated_ms
        ("a", FINAL, 10, 20, 30, Source.REPORTED, 1_000, 1_500),
        ("b", FINAL, None, 7, 7, Source.COUNTED, 2_000, 2_100),
        ("c", ABORTED, 3, 2, 5, Source.COUNTED, 900, 950),
        ("d", OPEN, 1, 0, 1, Source.ESTIMATED, 3_000, 3_000),
    ]
    futures = [
        ledger.submit(
            rec(
                key,
                5,
                state=state,
                prompt=p,
                completion=c,
                billable=b,
                source=source,
                started_ms=t0,
                updated_ms=t1,
            )
        )
        for key, state, p, c, b, source, t0, t1 in table
    ]
    futures.append(ledger.submit(rec("other", 6, state=FINAL, completion=1000)))
    await asyncio.gather(*futures)
    totals = await ledger.job(5)
    assert totals == JobTotals(
        job_id=5,
        requests=4,
        open_requests=1,
        prompt_tokens=14,  # None counts as nothing known, not as an error
        completion_tokens=29,
        billable_tokens=43,
        billable_by_source={"counted": 12, "estimated": 1, "reported": 30},
        first_ms=900,
        last_ms=3_000,
    )
    assert totals.total_tokens == 43
    for value in (totals.requests, totals.prompt_tokens, totals.billable_tokens, totals.first_ms):
        assert type(value) is int
    assert all(type(v) is int for v in totals.billable_by_source.values())
    assert totals.as_json()["job_id"] == "5"


async def test_unknown_job_has_no_totals(ledger: Ledger) -> None:
    assert await ledger.job(123) is None
    assert await ledger.job(None) is None
    assert await ledger.jobs() == []
    assert await ledger.records(123) == []


async def test_unattributed_records_are_their_own_job_listed_last(ledger: Ledger) -> None:
    await ledger.write(rec("u1", None, state=FINAL, completion=2))
    await ledger.write(rec("u2", None, state=FINAL, completion=3))
    await ledger.write(rec("j", 0, state=FINAL, completion=1))
    unattributed = await ledger.job(None)
    assert unattributed is not None
    assert unattributed.job_id is None
    assert (unattributed.requests, unattributed.completion_tokens) == (2, 5)
    assert [t.job_id for t in await ledger.jobs()] == [0, None]
    assert [r.key for r in await ledger.records(None)] == ["u1", "u2"]
    assert [r.key for r in await ledger.records(0)] == ["j"]


async def test_uint256_job_ids_round_trip_and_sort_numerically(ledger: Ledger) -> None:
    ids: list[int | None] = [UINT256_MAX, None, 10, 9, 2**64, 2**63, 2**63 - 1, 0, 100, 11]
    await asyncio.gather(*(ledger.submit(rec(f"k{i}", job)) for i, job in enumerate(ids)))
    numeric = sorted(j for j in ids if j is not None)
    assert [t.job_id for t in await ledger.jobs()] == [*numeric, None]
    biggest = await ledger.job(UINT256_MAX)
    assert biggest is not None and biggest.as_json()["job_id"] == str(UINT256_MAX)
    assert (await ledger.records(UINT256_MAX))[0].job_id == UINT256_MAX


async def test_sqlite_stores_job_ids_as_text(sqlite_ledger: SQLiteLedger, db_path: Path) -> None:
    await asyncio.gather(*(sqlite_ledger.submit(rec(f"k{j}", j)) for j in (UINT256_MAX, None)))
    conn = raw(db_path)
    types = {r[0] for r in conn.execute("SELECT DISTINCT typeof(job_id) FROM usage_records")}
    assert types == {"text", "null"}  # never an INTEGER that could overflow
    conn.close()


@pytest.mark.parametrize("job_id", [-1, 2**256])
async def test_job_ids_outside_uint256_are_refused(ledger: Ledger, job_id: int) -> None:
    with pytest.raises(ValueError, match="uint256"):
        await ledger.submit(rec("bad", job_id))
    with pytest.raises(ValueError, match="uint256"):
        await ledger.job(job_id)
    assert await ledger.jobs() == []


async def test_non_integer_token_counts_are_refused(ledger: Ledger) -> None:
    bad = dataclasses.replace(rec("float"), completion_tokens=1.5)
    with pytest.raises(TypeError):
        await ledger.submit(bad)
    assert await ledger.records(1) == []


# --- concurrency ----------------------------------------------------------------------------


async def test_another_connection_reads_while_the_ledger_writes(
    sqlite_ledger: SQLiteLedger, db_path: Path
) -> None:
    await sqlite_ledger.write(rec("before", state=FINAL))
    reader = raw(db_path)
    # An open read transaction (as a slow `sidecar jobs` would hold) pins its snapshot...
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == 1
    # ...and does not stop the ledger from committing (WAL: readers never block the writer).
    await asyncio.gather(*(sqlite_ledger.submit(rec(f"w{i}", state=FINAL)) for i in range(200)))
    assert reader.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == 1
    reader.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == 201
    reader.close()


async def test_a_reader_thread_polls_throughout_a_write_burst(
    sqlite_ledger: SQLiteLedger, db_path: Path
) -> None:
    stop = threading.Event()
    counts: list[int] = []

    def poll() -> None:
        conn = raw(db_path)
        try:
            while not stop.is_set():
                counts.append(conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0])
        finally:
            conn.close()

    poller = asyncio.create_task(asyncio.to_thread(poll))
    for wave in range(5):
        await asyncio.gather(*(sqlite_ledger.submit(rec(f"{wave}-{i}", 2)) for i in range(100)))
    stop.set()
    await poller  # no "database is locked" on either side
    assert counts == sorted(counts)  # commits only ever add rows, and whole batches at a time
    assert counts and counts[-1] <= 500
    totals = await sqlite_ledger.job(2)
    assert totals is not None and totals.requests == 500


async def test_reads_do_not_wait_behind_a_stuck_writer(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = SQLiteLedger(path, busy_timeout_ms=60_000)
    await ledger.open()
    try:
        await ledger.write(rec("committed", state=FINAL, completion=3))
        blocker = raw(path)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the writer thread waits
        pending = ledger.submit(rec("pending", state=FINAL, completion=4))
        totals = await ledger.job(1)
        records = await ledger.records(1)
        assert not pending.done()  # the reads above did not queue behind it
        assert totals is not None and totals.completion_tokens == 3
        assert [r.key for r in records] == ["committed"]
        blocker.execute("ROLLBACK")
        blocker.close()
        await pending
        assert [r.key for r in await ledger.records(1)] == ["committed", "pending"]
    finally:
        await ledger.close()


# --- failures -------------------------------------------------------------------------------


async def test_a_locked_database_fails_the_batch_and_the_writer_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "l.db"
    ledger = SQLiteLedger(path, busy_timeout_ms=50)
    await ledger.open()
    try:
        blocker = raw(path)
        blocker.execute("BEGIN IMMEDIATE")
        with caplog.at_level(logging.ERROR, logger=type(ledger).__module__):
            futures = [ledger.submit(rec(f"k{i}", state=FINAL)) for i in range(3)]
            results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert "not committed" in caplog.text
        blocker.execute("ROLLBACK")
        blocker.close()

        await ledger.write(rec("later", state=FINAL))  # the writer thread survived
        assert [r.key for r in await ledger.records(1)] == ["later"]
    finally:
        await ledger.close()


async def test_a_failing_record_fails_alone_not_its_batch(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger=type(ledger).__module__):
        futures = [
            ledger.submit(rec("good-1", state=FINAL)),
            ledger.submit(rec("negative", state=FINAL, completion=-1)),  # CHECK constraint
            ledger.submit(rec("good-2", state=FINAL)),
            ledger.submit(rec("too-big", state=FINAL, completion=2**63)),  # beyond INTEGER
            ledger.submit(rec("good-3", state=FINAL)),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] is None and results[2] is None and results[4] is None
    # The database's own refusals: a CHECK constraint, then a value beyond its 64-bit integers.
    assert isinstance(results[1], sqlite3.IntegrityError | psycopg.errors.IntegrityError)
    assert isinstance(results[3], OverflowError | psycopg.errors.DataError)
    assert "not committed" in caplog.text
    assert [r.key for r in await ledger.records(1)] == ["good-1", "good-2", "good-3"]
    await ledger.write(rec("after", state=FINAL))
    assert len(await ledger.records(1)) == 4


# --- lifecycle ------------------------------------------------------------------------------


async def test_close_flushes_everything_submitted(db_path: Path) -> None:
    ledger = SQLiteLedger(db_path)
    await ledger.open()
    futures = [ledger.submit(rec(f"k{i}", state=FINAL)) for i in range(1_000)]
    await ledger.close()
    assert all(f.done() and f.exception() is None for f in futures)

    conn = raw(db_path)
    assert conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == 1_000
    conn.close()


async def test_lifecycle_is_idempotent_and_misuse_is_refused(db_path: Path) -> None:
    ledger = SQLiteLedger(db_path)
    with pytest.raises(LedgerClosedError, match="not open"):
        ledger.submit(rec("early"))
    with pytest.raises(LedgerClosedError, match="not open"):
        await ledger.jobs()
    await ledger.open()
    await ledger.open()  # no second writer, no error
    await ledger.write(rec("k"))
    await ledger.close()
    await ledger.close()
    with pytest.raises(LedgerClosedError, match="closed"):
        ledger.submit(rec("late"))
    with pytest.raises(LedgerClosedError, match="closed"):
        await ledger.job(1)
    with pytest.raises(LedgerClosedError, match="closed"):
        await ledger.open()
    assert isinstance(LedgerClosedError("x"), RuntimeError)


async def test_close_without_open_is_harmless(db_path: Path) -> None:
    ledger = SQLiteLedger(db_path)
    await ledger.close()
    assert not await asyncio.to_thread(db_path.exists)


async def test_close_interrupted_aborts_only_open_records(
    ledger: Ledger, ledger_store: LedgerStore
) -> None:
    """The OPEN records of a process that is gone are closed with their persisted counts."""
    gone = ledger_store()
    await gone.open()
    await gone.write(rec("cut", state=OPEN, completion=64, started_ms=100))
    await gone.write(rec("done", state=FINAL, completion=9, started_ms=200))
    await gone.close()
    assert await ledger.close_interrupted(now_ms=5_000) == 1
    cut = await stored(ledger, "cut")
    assert (cut.state, cut.completion_tokens, cut.updated_ms) == (ABORTED, 64, 5_000)
    assert (await stored(ledger, "done")).state is FINAL
    assert await ledger.close_interrupted(now_ms=6_000) == 0
    totals = await ledger.job(1)
    assert totals is not None and totals.open_requests == 0


async def test_a_running_replicas_open_records_are_never_closed(postgres: Any) -> None:
    """PostgreSQL: replicas share the ledger, so one's sweep must leave a live one's streams
    alone however long they run, and close them once that replica's presence lock is free."""
    from sidecar.ledger.postgres import PostgresLedger

    url = postgres.new_database()
    live, other = PostgresLedger(url), PostgresLedger(url)
    await live.open()
    await other.open()
    try:
        await live.write(rec("slow-stream", state=OPEN, completion=5))
        assert await other.close_interrupted(now_ms=9_000) == 0
        assert (await stored(other, "slow-stream")).state is OPEN
        # The server drops the dead replica's locks with its connections (as after kill -9).
        assert postgres.kill_connections(url) >= 8
        await asyncio.sleep(0.2)
        reopened = PostgresLedger(url)
        await reopened.open()
        try:
            assert await reopened.close_interrupted(now_ms=9_500) == 1
            assert (await stored(reopened, "slow-stream")).state is ABORTED
        finally:
            await reopened.close()
    finally:
        await live.close()
        await other.close()


async def test_flush_waits_for_records_submitted_without_waiting(ledger: Ledger) -> None:
    for n in range(50):
        ledger.submit(rec(f"k{n}", state=FINAL, completion=1))  # nobody awaits these
    await ledger.flush()
    # A fresh reader sees them all: flush resolved only after their commit.
    assert len(await ledger.records(1)) == 50


async def test_job_tokens_follow_every_write_as_the_aggregate_does(ledger: Ledger) -> None:
    """The per-job totals the receipts read (kept by triggers) equal the sum over records,
    through progress updates, a final record, refused downgrades and unattributed records."""
    big = UINT256_MAX
    writes = [
        rec("a", 1, billable=3),
        rec("a", 1, billable=40),  # progress of an open stream
        rec("b", 2, billable=7, state=FINAL),
        rec("a", 1, billable=64, state=FINAL),
        rec("a", 1, billable=99, state=OPEN),  # a final record never changes again
        rec("c", None, billable=11, state=FINAL),
        rec("d", big, billable=5, state=ABORTED),
        rec("e", 1, billable=0, state=FINAL),
    ]
    for record in writes:
        await ledger.write(record)
        for job in (1, 2, big):
            totals = await ledger.job(job)
            assert await ledger.job_tokens(job) == (0 if totals is None else totals.billable_tokens)
    assert [await ledger.job_tokens(j) for j in (1, 2, big, 3)] == [64, 7, 5, 0]


async def test_migration_4_adds_up_the_records_already_there(tmp_path: Path) -> None:
    """A ledger written before the totals table gets them from its records when it opens."""
    path = tmp_path / "old.db"
    conn = raw(path)
    migrate(conn, MIGRATIONS[:3])
    ledger = SQLiteLedger(path)
    for version in (3,):
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    conn.execute(
        "INSERT INTO usage_records VALUES ('k1', '5', 'chat', 'm', 1, 9, 9, 'counted', 'final',"
        " 200, 1, 1), ('k2', '5', 'chat', 'm', 1, 4, 4, 'counted', 'open', 200, 1, 1)"
    )
    conn.close()
    await ledger.open()
    try:
        assert await ledger.job_tokens(5) == 13
        await ledger.write(rec("k2", 5, billable=6, state=FINAL))
        assert await ledger.job_tokens(5) == 15
    finally:
        await ledger.close()


async def test_the_ledger_is_bound_to_the_first_marketplace(ledger_store) -> None:
    from sidecar.ledger import MarketplaceIdentity

    ledger = ledger_store()
    await ledger.open()
    try:
        assert await ledger.marketplace() is None
        here = MarketplaceIdentity(84532, "0x" + "Ab" * 20, "v1")
        assert await ledger.bind_marketplace(here, 10) == here
        assert here.marketplace == "0x" + "ab" * 20  # an address, without case
        other = MarketplaceIdentity(84532, "0x" + "cd" * 20, "v1")
        assert await ledger.bind_marketplace(other, 20) == here  # the first binding stands
        assert await ledger.bind_marketplace(here, 30) == here
    finally:
        await ledger.close()
    reopened = ledger_store()
    await reopened.open()
    try:
        assert await reopened.marketplace() == here
        assert str(here) == f"v1 marketplace {'0x' + 'ab' * 20} on chain 84532"
    finally:
        await reopened.close()
