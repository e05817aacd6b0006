"""The PostgreSQL ledger: one database shared by several sidecar replicas.

The same contract as the SQLite ledger (sidecar/ledger/base.py), on asyncio connections of
psycopg 3, each with one job so none waits behind another's kind of work:

- the **writer** task owns one connection. ``submit`` puts a record on a queue and returns a future;
  the writer takes whatever is queued (up to :data:`MAX_BATCH`), upserts it in one transaction and
  commits (one WAL flush for the batch: group commit). Only then are the futures resolved, so a
  resolved future means the record is in PostgreSQL's WAL on disk.
- one connection for **reads** (totals, a job's tokens, records), one for the **outbox** and the
  small writes that answer at once (bindings, settlement requests, holds);
- one **presence** connection holds this replica's advisory lock for as long as the process lives:
  a replica that finds another's lock free knows that replica is gone, and closes its OPEN
  records (``close_interrupted``). Nothing guesses from timestamps: a slow stream is never closed.

Per-job totals come from a trigger that adds each record's delta under the job's row lock, so
replicas writing for the same job at once still add up exactly. What requests in flight hold of a
job's deposit is in ``job_holds``, granted under a per-job transaction lock, so one deposit is
never handed out twice by two replicas (:meth:`PostgresLedger.hold`).
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

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
from sidecar.ledger.lease import SubmitterLease
from sidecar.ledger.pg_queries import (
    CLAIM_ORDER,
    SELECT_CLAIM,
    SELECT_RECORD,
    TOTALS,
    UPSERT,
)
from sidecar.ledger.pg_schema import (
    LOCK_JOB_HOLDS,
    LOCK_REPLICA,
    lock_key,
    migrate,
)
from sidecar.ledger.rows import (
    CLAIM_COLUMNS,
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

log = logging.getLogger(__name__)

MAX_BATCH: Final = 512
DEFAULT_HOLD_TTL_MS: Final = 15 * 60 * 1000  # a hold outlives no request; a dead replica's expire
PRESENCE_CHECK_S: Final = 5.0

_Conn = psycopg.AsyncConnection[tuple[Any, ...]]

# A record's fault, not the database's: such a batch is retried record by record, so one bad
# record cannot fail its neighbours. Anything else (connection, disk) fails the whole batch.
_PER_RECORD_ERRORS: Final = (
    pg_errors.IntegrityError,
    pg_errors.DataError,
    OverflowError,
    TypeError,
    ValueError,
)


def describe_url(url: str) -> str:
    """The database a URL names, without its password (for logs and errors)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user, host = info.get("user") or "", info.get("host") or "localhost"
    return f"postgresql://{user}@{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


@dataclass(slots=True)
class _Pending:
    row: RecordRow | None  # None: a flush marker
    future: asyncio.Future[None]


def _params(row: RecordRow, replica: str) -> tuple[Any, ...]:
    return (*row, replica)


class PostgresLedger(Ledger):
    """A ledger in a PostgreSQL database (the schema is created or migrated on first open)."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        replica: str | None = None,
        hold_ttl_ms: int = DEFAULT_HOLD_TTL_MS,
        connect_timeout: int = 10,
    ) -> None:
        self.url = url
        self.replica = replica or os.urandom(8).hex()
        self.hold_ttl_ms = hold_ttl_ms
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": connect_timeout,
            "application_name": "sidecar",
        }
        if password is not None:
            self._connect_kwargs["password"] = password
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._write_conn: _Conn | None = None
        self._read_conn: _Conn | None = None
        self._claims_conn: _Conn | None = None
        self._presence_conn: _Conn | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._read_lock = asyncio.Lock()
        self._claims_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False
        self._releases: set[asyncio.Task[None]] = set()
        self._blocking_lock = threading.Lock()
        self._blocking_conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def __repr__(self) -> str:
        return f"PostgresLedger({describe_url(self.url)!r})"

    # -- connections -----------------------------------------------------------------------

    async def connect(self) -> _Conn:
        """A new autocommit connection to the ledger's database."""
        return await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs)

    async def _live(self, conn: _Conn | None) -> _Conn:
        """``conn``, or a new connection where it broke (the server restarted, a network cut)."""
        if self._closed or not self._opened:
            raise LedgerClosedError(f"{self!r} is {'closed' if self._closed else 'not open'}")
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        return await self.connect()

    async def _read(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._read_lock:
            conn = self._read_conn = await self._live(self._read_conn)
            cursor = await conn.execute(query.encode(), params)
            return await cursor.fetchall()

    async def _write(self, op: Callable[[_Conn], Awaitable[Any]]) -> Any:
        """Run ``op`` on the outbox connection (one at a time in this process)."""
        async with self._claims_lock:
            conn = self._claims_conn = await self._live(self._claims_conn)
            return await op(conn)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._closed:
                raise LedgerClosedError(f"{self!r} is closed; create a new ledger to reopen it")
            if self._opened:
                return
            conns: list[_Conn] = []
            try:
                for _ in range(4):
                    conns.append(await self.connect())
                await migrate(conns[0])
                self._write_conn, self._read_conn, self._claims_conn = conns[:3]
                await self._announce(conns[3])
            except BaseException:
                for conn in conns:
                    await conn.close()
                raise
            self._presence_conn = conns[3]
            self._opened = True
            self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")
            self._presence_task = asyncio.create_task(self._keep_presence(), name="ledger-presence")

    async def _announce(self, conn: _Conn) -> None:
        """Register this replica and hold its lock on ``conn`` for the process's life."""
        await conn.execute(
            "INSERT INTO ledger_replicas (replica, started_ms) VALUES (%s, %s)"
            " ON CONFLICT (replica) DO NOTHING",
            (self.replica, _now_ms()),
        )
        await conn.execute(
            "SELECT pg_advisory_lock(%s, %s)", (LOCK_REPLICA, lock_key(self.replica))
        )

    async def _keep_presence(self) -> None:
        """Put the presence lock back when its connection broke (a database restart)."""
        while True:
            await asyncio.sleep(PRESENCE_CHECK_S)
            conn = self._presence_conn
            try:
                if conn is not None and not conn.broken and not conn.closed:
                    await conn.execute("SELECT 1")
                    continue
            except psycopg.Error:
                pass
            try:
                fresh = await self.connect()
                await self._announce(fresh)
            except psycopg.Error as exc:
                log.warning("ledger %r: presence lost, retrying: %s", self, type(exc).__name__)
                continue
            self._presence_conn = fresh
            log.warning("ledger %r: reconnected; this replica's presence lock is back", self)

    async def close(self) -> None:
        async with self._open_lock:
            if self._closed:
                return
            if self._releases:  # holds being dropped: while the connections are still there
                await asyncio.gather(*self._releases, return_exceptions=True)
            self._closed = True
            if self._writer is not None:
                self._queue.put_nowait(None)
                await self._writer
                self._writer = None
            if self._presence_task is not None:
                self._presence_task.cancel()
                await asyncio.gather(self._presence_task, return_exceptions=True)
            with self._blocking_lock:
                blocking, self._blocking_conn = self._blocking_conn, None
            if blocking is not None:
                blocking.close()
            presence = self._presence_conn
            if presence is not None and not presence.broken and not presence.closed:
                try:  # a clean exit: nothing of ours is open, so nobody needs to sweep
                    await presence.execute(
                        "DELETE FROM ledger_replicas WHERE replica = %s"
                        " AND NOT EXISTS (SELECT 1 FROM usage_records"
                        " WHERE replica = %s AND state = 'open')",
                        (self.replica, self.replica),
                    )
                except psycopg.Error:
                    log.warning("ledger %r: could not deregister this replica", self)
            for conn in (self._write_conn, self._read_conn, self._claims_conn, presence):
                if conn is not None:
                    await conn.close()
            self._write_conn = self._read_conn = self._claims_conn = self._presence_conn = None

    async def close_interrupted(self, now_ms: int) -> int:
        """Close the OPEN records of every replica that is gone (its presence lock is free),
        and forget it; a running replica's streams are never touched."""

        async def sweep(conn: _Conn) -> int:
            cursor = await conn.execute(
                "SELECT replica FROM ledger_replicas WHERE replica <> %s", (self.replica,)
            )
            others = [str(row[0]) for row in await cursor.fetchall()]
            closed = 0
            for replica in others:
                key = lock_key(replica)
                cursor = await conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_REPLICA, key)
                )
                row = await cursor.fetchone()
                if row is None or not row[0]:
                    continue  # it is running
                try:
                    async with conn.transaction():
                        cursor = await conn.execute(
                            "UPDATE usage_records SET state = 'aborted', updated_ms = %s"
                            " WHERE state = 'open' AND replica = %s",
                            (now_ms, replica),
                        )
                        closed += max(0, cursor.rowcount)
                        await conn.execute("DELETE FROM job_holds WHERE replica = %s", (replica,))
                        await conn.execute(
                            "DELETE FROM ledger_replicas WHERE replica = %s", (replica,)
                        )
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_REPLICA, key))
            return closed

        return int(await self._write(sweep))

    # -- usage records -----------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> asyncio.Future[None]:
        if self._closed:
            raise LedgerClosedError(f"{self!r} is closed: record {record.key!r} was not accepted")
        if not self._opened:
            raise LedgerClosedError(f"{self!r} is not open: await open() before submit()")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            row = record_row(record)
        except (TypeError, ValueError) as exc:
            future.set_exception(exc)
            return future
        self._queue.put_nowait(_Pending(row, future))
        return future

    def write_blocking(self, record: UsageRecord) -> None:
        if self._closed or not self._opened:
            raise LedgerClosedError(f"{self!r} is not open: record {record.key!r} not written")
        params = _params(record_row(record), self.replica)
        with self._blocking_lock:
            conn = self._blocking_conn
            if conn is None or conn.closed or conn.broken:
                conn = self._blocking_conn = psycopg.connect(self.url, **self._connect_kwargs)
            with conn.transaction():
                conn.execute(UPSERT.encode(), params)

    async def flush(self) -> None:
        if not self._opened or self._closed:
            raise LedgerClosedError(f"{self!r} is not open")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(None, future))
        await future

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is None:
                    stopping = True  # commit what came before the marker, then stop
                    break
                batch.append(item)
            await self._write_batch(batch)
        if self._write_conn is not None:
            await self._write_conn.close()

    async def _write_batch(self, batch: list[_Pending]) -> None:
        rows = [item.row for item in batch if item.row is not None]
        row_outcomes = iter(await self._commit(rows) if rows else [])
        outcomes = [None if item.row is None else next(row_outcomes) for item in batch]
        failed = [(item, error) for item, error in zip(batch, outcomes, strict=True) if error]
        if failed:
            first_item, first_error = failed[0]
            log.error(
                "ledger %r: %d of %d record(s) not committed (first: key %r): %s",
                self,
                len(failed),
                len(batch),
                first_item.row[0] if first_item.row is not None else None,
                first_error,
            )
        for item, error in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue  # its awaiter was cancelled; the row is written all the same
            if error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(error)

    async def _commit(self, rows: Sequence[RecordRow]) -> list[BaseException | None]:
        try:
            await self._apply(rows)
            return [None] * len(rows)
        except Exception as exc:
            if len(rows) == 1 or not isinstance(exc, _PER_RECORD_ERRORS):
                return [exc] * len(rows)
        outcomes: list[BaseException | None] = []
        for row in rows:
            try:
                await self._apply((row,))
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _apply(self, rows: Sequence[RecordRow]) -> None:
        try:
            conn = self._write_conn = await self._live_writer()
        except psycopg.Error as exc:
            raise pg_errors.OperationalError(f"ledger {self!r} unreachable: {exc}") from None
        params = [_params(row, self.replica) for row in rows]
        async with conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(UPSERT.encode(), params)

    async def _live_writer(self) -> _Conn:
        conn = self._write_conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        return await self.connect()

    # -- reads -------------------------------------------------------------------------------

    async def job(self, job_id: int | None) -> JobTotals | None:
        text = job_text(job_id)
        if text is None:
            rows = await self._read(TOTALS.format(where="WHERE job_id IS NULL"))
        else:
            rows = await self._read(TOTALS.format(where="WHERE job_id = %s::numeric"), (text,))
        return totals_from_row(rows[0]) if rows else None

    async def job_tokens(self, job_id: int) -> int:
        rows = await self._read(
            "SELECT billable_tokens FROM job_totals WHERE job_id = %s::numeric",
            (job_text(job_id),),
        )
        return int(rows[0][0]) if rows else 0

    async def billable_by_job(self) -> dict[int, int]:
        rows = await self._read("SELECT job_id::text, billable_tokens FROM job_totals")
        return {int(job): int(tokens) for job, tokens in rows}

    async def jobs(self) -> list[JobTotals]:
        return [totals_from_row(row) for row in await self._read(TOTALS.format(where=""))]

    async def records(self, job_id: int | None) -> list[UsageRecord]:
        text = job_text(job_id)
        where = "job_id IS NULL" if text is None else "job_id = %s::numeric"
        rows = await self._read(
            f"SELECT {SELECT_RECORD} FROM usage_records WHERE {where} ORDER BY started_ms, seq",
            () if text is None else (text,),
        )
        return [record_from_row(row) for row in rows]

    # -- the on-chain outbox -----------------------------------------------------------------

    async def add_claim(self, claim: Claim) -> None:
        row = claim_row(claim)
        values = ", ".join(["%s::numeric", *["%s"] * (len(row) - 1)])

        async def insert(conn: _Conn) -> Claim | None:
            cursor = await conn.execute(
                f"INSERT INTO claims ({CLAIM_COLUMNS}) VALUES ({values})"
                " ON CONFLICT (job_id, seq) DO NOTHING RETURNING seq",
                row,
            )
            if await cursor.fetchone() is not None:
                return None
            cursor = await conn.execute(
                f"SELECT {SELECT_CLAIM} FROM claims WHERE job_id = %s::numeric AND seq = %s",
                (row[0], row[1]),
            )
            existing = await cursor.fetchone()
            return None if existing is None else claim_from_row(existing)

        stored = await self._write(insert)
        if stored is not None and not same_claim(stored, claim):
            raise ClaimConflictError(
                f"job {claim.job_id} already has a different claim #{claim.seq}"
            )

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
            optional_int(now_ms),
            job_text(job_id),
            optional_int(seq),
            [s.value for s in TERMINAL_CLAIM_STATES],
        )

        async def update(conn: _Conn) -> None:
            await conn.execute(
                "UPDATE claims SET state = %s, tx_hash = COALESCE(%s, tx_hash),"
                " nonce = COALESCE(%s, nonce), error = %s, updated_ms = %s"
                " WHERE job_id = %s::numeric AND seq = %s AND state <> ALL(%s)",
                params,
            )

        await self._write(update)

    async def claims(self, job_id: int | None = None) -> list[Claim]:
        if job_id is None:
            rows = await self._read(f"SELECT {SELECT_CLAIM} FROM claims {CLAIM_ORDER}")
        else:
            rows = await self._read(
                f"SELECT {SELECT_CLAIM} FROM claims WHERE job_id = %s::numeric {CLAIM_ORDER}",
                (job_text(job_id),),
            )
        return [claim_from_row(row) for row in rows]

    async def unfinished_claims(self) -> list[Claim]:
        rows = await self._read(
            f"SELECT {SELECT_CLAIM} FROM claims WHERE state IN ('pending', 'sent') {CLAIM_ORDER}"
        )
        return [claim_from_row(row) for row in rows]

    # -- bindings and settlement requests ------------------------------------------------------

    async def bind_job(self, job_id: int, address: str, proof: str, now_ms: int) -> str:
        params = (job_text(job_id), address.lower(), proof, optional_int(now_ms))

        async def bind(conn: _Conn) -> str:
            await conn.execute(
                "INSERT INTO job_bindings (job_id, address, proof, bound_ms)"
                " VALUES (%s::numeric, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING",
                params,
            )
            cursor = await conn.execute(
                "SELECT address FROM job_bindings WHERE job_id = %s::numeric", (params[0],)
            )
            row = await cursor.fetchone()
            assert row is not None  # inserted or already there
            return str(row[0])

        return str(await self._write(bind))

    async def binding(self, job_id: int) -> str | None:
        rows = await self._read(
            "SELECT address FROM job_bindings WHERE job_id = %s::numeric", (job_text(job_id),)
        )
        return str(rows[0][0]) if rows else None

    async def bind_marketplace(
        self, identity: MarketplaceIdentity, now_ms: int
    ) -> MarketplaceIdentity:
        params = (
            str(operator.index(identity.chain_id)),
            identity.marketplace,
            identity.contract_version,
            optional_int(now_ms),
        )

        async def bind(conn: _Conn) -> None:
            await conn.execute(
                "INSERT INTO ledger_marketplace (singleton, chain_id, marketplace,"
                " contract_version, bound_ms) VALUES (1, %s::numeric, %s, %s, %s)"
                " ON CONFLICT (singleton) DO NOTHING",
                params,
            )

        await self._write(bind)
        bound = await self.marketplace()
        assert bound is not None  # inserted or already there
        return bound

    async def marketplace(self) -> MarketplaceIdentity | None:
        rows = await self._read(
            "SELECT chain_id::text, marketplace, contract_version FROM ledger_marketplace", ()
        )
        if not rows:
            return None
        chain_id, address, version = rows[0]
        return MarketplaceIdentity(int(str(chain_id)), str(address), str(version))

    async def request_settlement(self, job_id: int, now_ms: int) -> None:
        params = (job_text(job_id), optional_int(now_ms))

        async def insert(conn: _Conn) -> None:
            await conn.execute(
                "INSERT INTO settle_requests (job_id, requested_ms) VALUES (%s::numeric, %s)"
                " ON CONFLICT (job_id) DO NOTHING",
                params,
            )

        await self._write(insert)

    async def settlement_requests(self) -> list[int]:
        rows = await self._read(
            "SELECT r.job_id::text AS job_text FROM settle_requests AS r"
            " WHERE NOT EXISTS (SELECT 1 FROM claims AS c WHERE c.job_id = r.job_id"
            " AND c.kind = 'settle'"
            " AND c.state = 'confirmed') ORDER BY r.job_id"
        )
        return [int(row[0]) for row in rows]

    # -- the deposit's holds, across replicas ---------------------------------------------------

    async def hold(
        self, job_id: int, deposit_tokens: int, floor: int, want: int, now_ms: int
    ) -> tuple[int | None, int]:
        """Hold up to ``want`` of the tokens the deposit still covers (``deposit_tokens`` less
        the larger of what is metered and ``floor``, less every replica's holds), atomically
        under the job's lock; return the hold's id (None: nothing held) and its tokens."""
        text = job_text(job_id)

        async def grant(conn: _Conn) -> tuple[int | None, int]:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_JOB_HOLDS, lock_key(str(text)))
                )
                await conn.execute(
                    "DELETE FROM job_holds WHERE job_id = %s::numeric AND expires_ms < %s",
                    (text, now_ms),
                )
                cursor = await conn.execute(
                    "SELECT (SELECT COALESCE(MAX(billable_tokens), 0) FROM job_totals"
                    " WHERE job_id = %s::numeric),"
                    " (SELECT COALESCE(SUM(tokens), 0) FROM job_holds WHERE job_id = %s::numeric)",
                    (text, text),
                )
                row = await cursor.fetchone()
                assert row is not None
                metered, held = int(row[0]), int(row[1])
                left = deposit_tokens - max(metered, floor) - held
                tokens = max(0, min(want, left))
                if not tokens:
                    return None, 0
                cursor = await conn.execute(
                    "INSERT INTO job_holds (job_id, tokens, replica, expires_ms)"
                    " VALUES (%s::numeric, %s, %s, %s) RETURNING id",
                    (text, tokens, self.replica, now_ms + self.hold_ttl_ms),
                )
                inserted = await cursor.fetchone()
                assert inserted is not None
                return int(inserted[0]), tokens

        held: tuple[int | None, int] = await self._write(grant)
        return held

    def release_hold(self, hold_id: int) -> None:
        """Drop a hold (its request's record is committed, or it never ran), in the background;
        a hold that cannot be dropped expires."""

        async def drop(conn: _Conn) -> None:
            await conn.execute("DELETE FROM job_holds WHERE id = %s", (hold_id,))

        async def run() -> None:
            try:
                await self._write(drop)
            except (psycopg.Error, LedgerClosedError) as exc:
                log.warning("ledger %r: hold %s left to expire: %s", self, hold_id, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    # -- the submitter lease ---------------------------------------------------------------------

    def submitter_lease(self, name: str, takeover_s: float) -> SubmitterLease:
        from sidecar.ledger.pg_lease import PostgresLease

        return PostgresLease(self.connect, name, takeover_s)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
