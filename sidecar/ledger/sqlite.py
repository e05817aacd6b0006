"""The embedded SQLite ledger, the default backend.

Threads, not the event loop, touch the file:

- one **writer thread** owns the only write connection. ``submit`` (on the loop thread) puts the
  record on a queue and returns a future. The writer blocks for the first queued record, drains
  whatever else is already queued (up to :data:`MAX_BATCH`), applies all of them in one
  transaction and commits: one fsync for the whole batch (group commit). Only then are the batch's
  futures resolved, on their loop, so a resolved future means the record survives a kill -9 or a
  power cut (``synchronous=FULL``).
- one **reader thread** owns a read-only connection. WAL lets it read a consistent snapshot while
  the writer commits, so reads never wait behind the write queue; other processes (the
  ``sidecar jobs`` CLI) read the same file the same way.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from sidecar.ledger.base import (
    TERMINAL_CLAIM_STATES,
    Claim,
    ClaimConflictError,
    ClaimState,
    JobTotals,
    Ledger,
    LedgerClosedError,
    MarketplaceIdentity,
    UsageRecord,
)
from sidecar.ledger.lease import FileLease, SubmitterLease
from sidecar.ledger.rows import (
    CLAIM_COLUMNS,
    RECORD_COLUMNS,
    RecordRow,
    claim_from_row,
    claim_row,
    job_text,
    optional_int,
    record_from_row,
    record_row,
    same_claim,
    totals_from_row,
)
from sidecar.ledger.schema import migrate

log = logging.getLogger(__name__)

# Bounds one transaction, so one huge burst cannot hold the write lock (and delay every future of
# the burst) for long; the rest of the burst simply goes in the next batch.
MAX_BATCH: Final = 512
DEFAULT_BUSY_TIMEOUT_MS: Final = 5_000

_T = TypeVar("_T")

# Only an open row may change: a final or aborted row is what the client was served, and a
# replayed final record (a retry after an unknown outcome) must be a no-op. started_ms keeps the
# first value seen: the response began when its first record was written.
_UPSERT: Final = f"""
INSERT INTO usage_records ({RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    job_id = excluded.job_id,
    endpoint = excluded.endpoint,
    model = excluded.model,
    prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens,
    billable_tokens = excluded.billable_tokens,
    source = excluded.source,
    state = excluded.state,
    status = excluded.status,
    updated_ms = excluded.updated_ms,
    cached_tokens = excluded.cached_tokens,
    reasoning_tokens = excluded.reasoning_tokens
WHERE usage_records.state = 'open'
"""

# Totals per (job, source) first, then per job: one statement, so one consistent snapshot, and
# the by-source breakdown comes out as a JSON object next to the sums.
_TOTALS: Final = """
SELECT job_id, SUM(n), SUM(open_n), SUM(prompt), SUM(completion), SUM(billable),
       json_group_object(source, billable), MIN(first_ms), MAX(last_ms), SUM(cached),
       SUM(reasoning)
FROM (
    SELECT job_id, source,
           COUNT(*) AS n,
           SUM(state = 'open') AS open_n,
           COALESCE(SUM(prompt_tokens), 0) AS prompt,
           SUM(completion_tokens) AS completion,
           SUM(billable_tokens) AS billable,
           MIN(started_ms) AS first_ms,
           MAX(updated_ms) AS last_ms,
           COALESCE(SUM(cached_tokens), 0) AS cached,
           COALESCE(SUM(reasoning_tokens), 0) AS reasoning
    FROM usage_records
    {where}
    GROUP BY job_id, source
)
GROUP BY job_id
-- job_id is canonical decimal, so (length, text) is numeric order; NULL (unattributed) last.
ORDER BY job_id IS NULL, length(job_id), job_id
"""
_JOB_TOTALS: Final = _TOTALS.format(where="WHERE job_id IS ?")
_ALL_TOTALS: Final = _TOTALS.format(where="")

_CLAIM_ORDER: Final = "ORDER BY length(job_id), job_id, seq"
_CLAIMS_OF_JOB: Final = f"SELECT {CLAIM_COLUMNS} FROM claims WHERE job_id = ? {_CLAIM_ORDER}"
_ALL_CLAIMS: Final = f"SELECT {CLAIM_COLUMNS} FROM claims {_CLAIM_ORDER}"
_UNFINISHED_CLAIMS: Final = (
    f"SELECT {CLAIM_COLUMNS} FROM claims WHERE state IN ('pending', 'sent') {_CLAIM_ORDER}"
)

_RECORDS: Final = f"""
SELECT {RECORD_COLUMNS} FROM usage_records WHERE job_id IS ? ORDER BY started_ms, rowid
"""

# Errors that belong to one record (a constraint, a value SQLite cannot bind): a batch failing
# with one of these is retried record by record so that one bad record cannot fail its
# neighbours. Anything else (locked, disk full, I/O) would fail every record again, so the whole
# batch fails at once instead of waiting out the busy timeout once per record.
_PER_RECORD_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    OverflowError,
    TypeError,
    ValueError,
)


@dataclass(slots=True)
class _Pending:
    row: RecordRow | None  # None: a flush marker, resolved once everything before it is applied
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


def _apply(conn: sqlite3.Connection, rows: Sequence[RecordRow]) -> None:
    """Upsert ``rows`` in order in one transaction and commit (the one fsync of the batch)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_UPSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (e.g. SQLITE_BUSY) can leave the transaction open; an I/O error may
        # already have rolled it back. Either way the connection must be clean for the next batch.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("ledger: rollback failed")
        raise


def _commit(conn: sqlite3.Connection, rows: Sequence[RecordRow]) -> list[BaseException | None]:
    """Commit a batch; the outcome of each row (None: durable)."""
    try:
        _apply(conn, rows)
        return [None] * len(rows)
    except Exception as exc:
        if len(rows) == 1 or not isinstance(exc, _PER_RECORD_ERRORS):
            return [exc] * len(rows)
    outcomes: list[BaseException | None] = []
    for row in rows:
        try:
            _apply(conn, (row,))
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _resolve(outcomes: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    """Runs on the loop thread. A future is already done when its awaiter was cancelled: the
    record was written all the same, there is just nobody left to tell."""
    for future, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every BEGIN/COMMIT here is explicit.
    # check_same_thread=False: each connection is created on the loop's helper thread and then
    # used only by its one owning thread, never by two at once.
    return sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        check_same_thread=False,
    )


def _open_writer(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path, busy_timeout_ms)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # Without WAL a reader (the jobs CLI) would block the writer and vice versa.
            raise sqlite3.OperationalError(
                f"{path}: cannot use WAL journal mode (got {mode!r}); use a local filesystem"
            )
        # FULL: a commit fsyncs the WAL, so a resolved future survives a power cut too.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _open_reader(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = _connect(path, busy_timeout_ms)
    # A guard, not a permission: this connection only ever runs SELECTs.
    conn.execute("PRAGMA query_only = ON")
    return conn


class SQLiteLedger(Ledger):
    """A ledger in one SQLite file (created, with its folder, on first open)."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        self.path = Path(path).expanduser()
        self.busy_timeout_ms = busy_timeout_ms
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        # Outbox rows are few (a claim per 100+ tokens): their own connection and thread, so a
        # claim never waits behind a burst of usage records and vice versa (WAL + busy timeout).
        self._claims: ThreadPoolExecutor | None = None
        self._claims_conn: sqlite3.Connection | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._blocking_lock = threading.Lock()
        self._blocking_conn: sqlite3.Connection | None = None  # write_blocking's, made on use

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    async def open(self) -> None:
        async with self._open_lock:
            if self._closed:
                raise LedgerClosedError(f"{self!r} is closed; create a new ledger to reopen it")
            if self._writer is not None:
                return
            # Creating the file, migrating and the first fsyncs are blocking I/O: off the loop.
            write_conn = await asyncio.to_thread(_open_writer, self.path, self.busy_timeout_ms)
            reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-reader")
            try:
                loop = asyncio.get_running_loop()
                read_conn = await loop.run_in_executor(
                    reader, _open_reader, self.path, self.busy_timeout_ms
                )
            except BaseException:
                reader.shutdown(wait=False)
                write_conn.close()
                raise
            self._reader, self._read_conn = reader, read_conn
            claims = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-claims")
            loop = asyncio.get_running_loop()
            self._claims_conn = await loop.run_in_executor(
                claims, _open_writer, self.path, self.busy_timeout_ms
            )
            self._claims = claims
            # daemon: an interpreter exiting without close() must not hang on the queue. What
            # it drops was never reported durable (no future resolved), as after a kill -9.
            self._writer = threading.Thread(
                target=self._write_loop, args=(write_conn,), name="ledger-writer", daemon=True
            )
            self._writer.start()

    async def close(self) -> None:
        async with self._open_lock:
            if self._closed:
                return
            self._closed = True  # from here on submit() refuses, so the stop marker is last
            writer, self._writer = self._writer, None
            if writer is not None:
                self._queue.put(None)
                await asyncio.to_thread(writer.join)
            claims, claims_conn = self._claims, self._claims_conn
            self._claims = self._claims_conn = None
            if claims is not None:
                if claims_conn is not None:
                    await asyncio.get_running_loop().run_in_executor(claims, claims_conn.close)
                claims.shutdown(wait=True)
            with self._blocking_lock:
                blocking, self._blocking_conn = self._blocking_conn, None
            if blocking is not None:
                blocking.close()
            reader, read_conn = self._reader, self._read_conn
            self._reader = self._read_conn = None
            if reader is not None:
                if read_conn is not None:
                    await asyncio.get_running_loop().run_in_executor(reader, read_conn.close)
                reader.shutdown(wait=False)

    async def close_interrupted(self, now_ms: int) -> int:
        if self._writer is None:
            raise LedgerClosedError(f"{self!r} is not open: await open() first")

        def update() -> int:
            conn = _connect(self.path, self.busy_timeout_ms)
            try:
                with conn:
                    cursor = conn.execute(
                        "UPDATE usage_records SET state = 'aborted', updated_ms = ? "
                        "WHERE state = 'open'",
                        (now_ms,),
                    )
                return cursor.rowcount
            finally:
                conn.close()

        return await asyncio.to_thread(update)

    def submit(self, record: UsageRecord) -> asyncio.Future[None]:
        if self._closed:
            raise LedgerClosedError(f"{self!r} is closed: record {record.key!r} was not accepted")
        if self._writer is None:
            raise LedgerClosedError(f"{self!r} is not open: await open() before submit()")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        try:
            row = record_row(record)
        except (TypeError, ValueError) as exc:
            # Same channel as a database error: awaiting the future tells the caller.
            future.set_exception(exc)
            return future
        self._queue.put(_Pending(row, future, loop))
        return future

    def write_blocking(self, record: UsageRecord) -> None:
        if self._closed or self._writer is None:
            raise LedgerClosedError(f"{self!r} is not open: record {record.key!r} not written")
        row = record_row(record)  # checked before the lock
        with self._blocking_lock:
            if self._blocking_conn is None:  # its own: SQLite's write lock orders it with the
                # writer thread's, and a late progress row never overwrites a final one
                self._blocking_conn = _open_writer(self.path, self.busy_timeout_ms)
            _apply(self._blocking_conn, [row])

    async def flush(self) -> None:
        if self._writer is None:
            raise LedgerClosedError(f"{self!r} is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Pending(None, future, loop))
        await future

    async def job(self, job_id: int | None) -> JobTotals | None:
        job_key = job_text(job_id)
        rows = await self._read(lambda conn: conn.execute(_JOB_TOTALS, (job_key,)).fetchall())
        return totals_from_row(rows[0]) if rows else None

    async def job_tokens(self, job_id: int) -> int:
        job_key = job_text(job_id)
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT billable_tokens FROM job_totals WHERE job_id = ?", (job_key,)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    async def billable_by_job(self) -> dict[int, int]:
        rows = await self._read(
            lambda conn: conn.execute("SELECT job_id, billable_tokens FROM job_totals").fetchall()
        )
        return {int(job): int(tokens) for job, tokens in rows}

    async def jobs(self) -> list[JobTotals]:
        rows = await self._read(lambda conn: conn.execute(_ALL_TOTALS).fetchall())
        return [totals_from_row(row) for row in rows]

    async def records(self, job_id: int | None) -> list[UsageRecord]:
        job_key = job_text(job_id)
        rows = await self._read(lambda conn: conn.execute(_RECORDS, (job_key,)).fetchall())
        return [record_from_row(row) for row in rows]

    # -- the on-chain outbox ---------------------------------------------------------------

    async def add_claim(self, claim: Claim) -> None:
        row = claim_row(claim)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                existing = conn.execute(
                    f"SELECT {CLAIM_COLUMNS} FROM claims WHERE job_id = ? AND seq = ?",
                    (row[0], row[1]),
                ).fetchone()
                if existing is None:
                    conn.execute(
                        f"INSERT INTO claims ({CLAIM_COLUMNS}) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if existing is not None:
                stored = claim_from_row(existing)
                # The same claim added again (a retry) is fine; anything else is a bug upstream.
                same = same_claim(stored, claim)
                if not same:
                    raise ClaimConflictError(
                        f"job {claim.job_id} already has a different claim #{claim.seq}"
                    )

        await self._write_claims(insert)

    async def update_claim(
        self,
        job_id: int,
        seq: int,
        state: ClaimState,
        *,
        now_ms: int,
        tx_hash: str | None = None,
        nonce: int | None = None,
        error: str | None = None,
    ) -> None:
        params = (
            ClaimState(state).value,
            tx_hash,
            optional_int(nonce),
            error,
            operator.index(now_ms),
            job_text(job_id),
            operator.index(seq),
            *sorted(s.value for s in TERMINAL_CLAIM_STATES),
        )

        def update(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "UPDATE claims SET state = ?, tx_hash = COALESCE(?, tx_hash),"
                    " nonce = COALESCE(?, nonce), error = ?, updated_ms = ?"
                    " WHERE job_id = ? AND seq = ? AND state NOT IN (?, ?)",
                    params,
                )

        await self._write_claims(update)

    async def claims(self, job_id: int | None = None) -> list[Claim]:
        if job_id is None:
            rows = await self._read(lambda conn: conn.execute(_ALL_CLAIMS).fetchall())
        else:
            job_key = job_text(job_id)
            rows = await self._read(
                lambda conn: conn.execute(_CLAIMS_OF_JOB, (job_key,)).fetchall()
            )
        return [claim_from_row(row) for row in rows]

    async def unfinished_claims(self) -> list[Claim]:
        rows = await self._read(lambda conn: conn.execute(_UNFINISHED_CLAIMS).fetchall())
        return [claim_from_row(row) for row in rows]

    # -- job bindings ----------------------------------------------------------------------

    async def bind_job(self, job_id: int, address: str, proof: str, now_ms: int) -> str:
        params = (job_text(job_id), address.lower(), proof, operator.index(now_ms))
        bound: list[str] = []

        def bind(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "INSERT INTO job_bindings (job_id, address, proof, bound_ms)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
                    params,
                )
                row = conn.execute(
                    "SELECT address FROM job_bindings WHERE job_id = ?", (params[0],)
                ).fetchone()
            bound.append(str(row[0]))

        await self._write_claims(bind)
        return bound[0]

    async def binding(self, job_id: int) -> str | None:
        params = (job_text(job_id),)
        query = "SELECT address FROM job_bindings WHERE job_id = ?"
        row = await self._read(lambda conn: conn.execute(query, params).fetchone())
        return None if row is None else str(row[0])

    async def bind_marketplace(
        self, identity: MarketplaceIdentity, now_ms: int
    ) -> MarketplaceIdentity:
        params = (
            operator.index(identity.chain_id),
            identity.marketplace,
            identity.contract_version,
            operator.index(now_ms),
        )

        def bind(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "INSERT INTO ledger_marketplace (singleton, chain_id, marketplace,"
                    " contract_version, bound_ms) VALUES (1, ?, ?, ?, ?)"
                    " ON CONFLICT (singleton) DO NOTHING",
                    params,
                )

        await self._write_claims(bind)
        bound = await self.marketplace()
        assert bound is not None  # inserted or already there
        return bound

    async def marketplace(self) -> MarketplaceIdentity | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT chain_id, marketplace, contract_version FROM ledger_marketplace"
            ).fetchone()
        )
        return None if row is None else MarketplaceIdentity(int(row[0]), str(row[1]), str(row[2]))

    async def request_settlement(self, job_id: int, now_ms: int) -> None:
        params = (job_text(job_id), operator.index(now_ms))

        def insert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "INSERT INTO settle_requests (job_id, requested_ms) VALUES (?, ?)"
                    " ON CONFLICT (job_id) DO NOTHING",
                    params,
                )

        await self._write_claims(insert)

    async def settlement_requests(self) -> list[int]:
        """Every job whose settlement was requested and is not confirmed yet, in job order."""
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT job_id FROM settle_requests AS r WHERE NOT EXISTS (SELECT 1 FROM"
                " claims AS c WHERE c.job_id = r.job_id AND c.kind = 'settle'"
                " AND c.state = 'confirmed') ORDER BY length(job_id), job_id"
            ).fetchall()
        )
        return [int(row[0]) for row in rows]

    def submitter_lease(self, name: str, takeover_s: float) -> SubmitterLease:
        # A lock file beside the database: the processes sharing a SQLite file share a machine.
        lock = self.path.with_name(f"{self.path.name}.submitter-{name.lower()}.lock")
        return FileLease(lock, name, poll_interval=max(0.2, takeover_s / 5))

    async def _write_claims(self, op: Callable[[sqlite3.Connection], None]) -> None:
        executor, conn = self._claims, self._claims_conn
        if executor is None or conn is None:
            state = "closed" if self._closed else "not open"
            raise LedgerClosedError(f"{self!r} is {state}")
        await asyncio.get_running_loop().run_in_executor(executor, op, conn)

    async def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        reader, conn = self._reader, self._read_conn
        if reader is None or conn is None:
            state = "closed" if self._closed else "not open"
            raise LedgerClosedError(f"{self!r} is {state}")
        return await asyncio.get_running_loop().run_in_executor(reader, query, conn)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        """The writer thread: batches until the stop marker, then closes its connection."""
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True  # commit what came before the marker, then stop
                        break
                    batch.append(item)
                self._write_batch(conn, batch)
        finally:
            conn.close()

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        rows = [item.row for item in batch if item.row is not None]
        row_outcomes = iter(_commit(conn, rows) if rows else [])
        outcomes = [None if item.row is None else next(row_outcomes) for item in batch]
        failed = [
            (item, error) for item, error in zip(batch, outcomes, strict=True) if error is not None
        ]
        if failed:
            first_item, first_error = failed[0]
            log.error(
                "ledger %s: %d of %d record(s) not committed (first: key %r)",
                self.path,
                len(failed),
                len(batch),
                first_item.row[0] if first_item.row is not None else None,
                exc_info=first_error,
            )
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]
        ] = {}
        for item, error in zip(batch, outcomes, strict=True):
            by_loop.setdefault(item.loop, []).append((item.future, error))
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:
                # The loop is closed: nobody can await these futures any more. The rows are
                # committed (or logged above as failed) regardless.
                pass
